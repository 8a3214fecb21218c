"""Export with evidence: every artefact is run on a real EM block and compared with torch fp32.

Each artefact runs through the same :class:`~ssn_deploy.inference.predictor.Predictor` that
``ssn-deploy infer`` would build for it, on a block of the bundled sample (a crop of the
``fib_medulla_250`` test region), and is compared with torch fp32 twice: affinities (max and
mean |Δ|) and segmentations at the model's threshold (each one's VOI against the ground truth,
and the VOI between the two). A variant passes when its max |Δ| and the difference of the two
ground-truth VOIs are within tolerance; the VOI between the segmentations is reported, not
gated, because merge decisions near the threshold flip on any rounding and cascade.
``parity.json`` records everything, including artefacts that could not be run here and why.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ssn_deploy import __version__
from ssn_deploy.agglomeration import segment_affinities
from ssn_deploy.errors import SsnDeployError
from ssn_deploy.export.package import ONNX, ONNX_FP16, PARITY, TENSORRT, export_model
from ssn_deploy.inference.engine import encode_affinities
from ssn_deploy.inference.loader import load_predictor
from ssn_deploy.inference.predictor import Predictor
from ssn_deploy.metrics import evaluate
from ssn_deploy.models.spec import Triple
from ssn_deploy.pipeline import default_geometry, is_anisotropic, model_threshold

PARITY_BLOCK = (64, 128, 128)
SAMPLE = "bundled sample (fib_medulla_250 test region crop), first block"


@dataclass(frozen=True)
class Tolerance:
    """Largest accepted |Δ affinity| and |VOI(variant, gt) − VOI(torch, gt)|."""

    max_abs_diff: float
    voi_difference: float = 0.01


TOLERANCES = {"fp32": Tolerance(1e-4), "fp16": Tolerance(1e-2)}


class ParityError(SsnDeployError):
    """An exported artefact does not compute what the torch model computes."""


@dataclass(frozen=True)
class Variant:
    """One artefact to check: how to load its predictor and which tolerance applies."""

    name: str
    path: Path
    load: Callable[[], Predictor]
    precision: str


def parity_block(granularity: Triple) -> tuple[np.ndarray, np.ndarray]:
    """Raw (uint8) and labels of the sample's first block, cropped to the granularity."""
    from ssn_deploy.sample import load_sample

    sample = load_sample()
    shape = [
        max(g, min(n, b) // g * g)
        for n, b, g in zip(sample["raw"].shape, PARITY_BLOCK, granularity, strict=True)
    ]
    region = tuple(slice(0, s) for s in shape)
    return sample["raw"][region], sample["labels"][region]


def _voi(seg: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    report = evaluate(seg, reference)
    return {key: report[key] for key in ("voi_split", "voi_merge", "voi")}


def _predict(predictor: Predictor, x: np.ndarray) -> tuple[np.ndarray, float]:
    """Affinities and the seconds of this one call (lazy initialisation included: the figure
    is for orientation; benchmarks/backends.py measures speed)."""
    start = time.perf_counter()
    out = predictor.predict(x)
    return out, time.perf_counter() - start


def compare(
    reference: Predictor,
    variants: Sequence[Variant],
    raw: np.ndarray,
    labels: np.ndarray,
    *,
    threshold: float,
    anisotropic: bool,
) -> dict[str, Any]:
    """Run ``reference`` and each variant on ``raw``; affinity and segmentation differences."""
    x = reference.normalization(raw)[None, None].astype(np.float32)

    def segment(affs: np.ndarray) -> np.ndarray:
        return segment_affinities(
            affs, threshold, offsets=reference.offsets, anisotropic=anisotropic
        )

    ref_affs, ref_s = _predict(reference, x)
    ref_seg = segment(ref_affs[0])
    report: dict[str, Any] = {
        "reference": {
            **reference.provenance,
            "seconds": ref_s,
            "to_ground_truth": _voi(ref_seg, labels),
        },
        "variants": {},
    }
    for variant in variants:
        tolerance = TOLERANCES[variant.precision]
        entry: dict[str, Any] = {"file": str(variant.path), "precision": variant.precision}
        try:
            predictor = variant.load()
            affs, seconds = _predict(predictor, x)
        except SsnDeployError as exc:  # e.g. no CUDA provider, a block outside an engine profile
            report["variants"][variant.name] = entry | {"not_run": str(exc)}
            continue
        diff = np.abs(affs - ref_affs)
        seg = segment(affs[0])
        between = _voi(seg, ref_seg)
        to_truth = _voi(seg, labels)
        voi_difference = abs(to_truth["voi"] - report["reference"]["to_ground_truth"]["voi"])
        entry |= {
            "provenance": predictor.provenance,
            "seconds": seconds,
            "max_abs_diff": float(diff.max()),
            "mean_abs_diff": float(diff.mean()),
            "uint8_changed_fraction": float(
                np.mean(encode_affinities(affs, "uint8") != encode_affinities(ref_affs, "uint8"))
            ),
            "segmentation_vs_reference": between,
            "segmentations_identical": bool(np.array_equal(seg, ref_seg)),
            "to_ground_truth": to_truth,
            "voi_difference": voi_difference,
            "tolerance": {
                "max_abs_diff": tolerance.max_abs_diff,
                "voi_difference": tolerance.voi_difference,
            },
        }
        entry["ok"] = entry["max_abs_diff"] <= tolerance.max_abs_diff and (
            voi_difference <= tolerance.voi_difference
        )
        report["variants"][variant.name] = entry
    return report


def _variants(files: Mapping[str, Path], device: str) -> list[Variant]:
    found = []
    for name, key in (("onnxruntime fp32", ONNX), ("onnxruntime fp16", ONNX_FP16)):
        if key in files:
            load = functools.partial(load_predictor, files[key], "onnxruntime", device=device)
            found.append(Variant(name, files[key], load, name.split()[-1]))
    if TENSORRT in files:
        from ssn_deploy.export.tensorrt import read_sidecar

        engine = files[TENSORRT]
        precision = "fp16" if read_sidecar(engine)["fp16"] else "fp32"
        load = functools.partial(load_predictor, engine, "tensorrt", device="cuda")
        found.append(Variant(f"tensorrt {precision}", engine, load, precision))
    return found


def export_with_parity(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    tensorrt: bool = False,
    fp16: bool = False,
    opset: int = 17,
    simplify: bool = True,
    patch_shape: Triple | None = None,
    max_batch: int = 1,
    device: str = "cpu",
    bioimageio: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Export (see :func:`~ssn_deploy.export.export_model`), then write ``parity.json``.

    Raises :class:`ParityError` after writing the report if a variant is out of tolerance.
    ``patch_shape`` defaults to the patch ``ssn-deploy infer`` uses for this model.
    """
    reference = load_predictor(checkpoint, "torch", device="cpu")
    if patch_shape is None and tensorrt:
        patch_shape = default_geometry(reference, reference.voxel_size).patch_shape
    files = export_model(
        checkpoint,
        out_dir,
        tensorrt=tensorrt,
        fp16=fp16,
        opset=opset,
        simplify=simplify,
        patch_shape=patch_shape,
        max_batch=max_batch,
        bioimageio=bioimageio,
        overwrite=overwrite,
    )
    raw, labels = parity_block(reference.granularity)
    threshold = model_threshold(reference)
    anisotropic = is_anisotropic(reference.voxel_size)
    report = {
        "input": SAMPLE,
        "shape": [1, 1, *raw.shape],
        "threshold": threshold,
        "anisotropic_fragments": anisotropic,
        **compare(
            reference,
            _variants(files, device),
            raw,
            labels,
            threshold=threshold,
            anisotropic=anisotropic,
        ),
        "ssn_deploy": __version__,
    }
    out = Path(out_dir) / PARITY
    out.write_text(json.dumps(report, indent=2) + "\n")
    files[PARITY] = out
    failed = [n for n, v in report["variants"].items() if v.get("ok") is False]
    if failed:
        raise ParityError(f"{', '.join(failed)} out of tolerance against torch fp32; see {out}")
    return {"files": files, "parity": report}
