"""Inference backends (issue 5): output voxels/s at the default block size, and accuracy.

Every backend predicts the same real patches (default patch shape of ``ssn-deploy infer``, from
the unlabelled 520³ volume), interleaved round by round so machine load hits all alike; max |Δ|
is taken against torch eager fp32 on the CPU (the reference, also the speed baseline).

Output voxels/s at the default block = model voxels/s ÷ ``PatchGrid.cost(block)``, the model
voxels the engine evaluates per output voxel of an interior block (patches straddling block
faces included). ``--full-block`` also *measures* it: ``predict_block`` on one interior block
of the 520³ volume per backend (slow on a CPU).

Rows: torch eager fp32 / bf16 autocast on the module as trained (BatchNorms unfolded, default
layout: the torch backend before it ran the inference form), the torch backend's inference form
(BatchNorms folded into the convolutions, channels-last activations; ``ssn_deploy.models.fold``)
in fp32 and bf16 (bf16 in that form is what ``--precision auto`` runs on CPUs with native
bf16), ``torch.compile`` fp32 (its compile time, i.e. the first call, is reported apart),
onnxruntime CPU fp32 and the fp16 graph of ``ssn-deploy export --fp16``; and GPU rows (torch
fp32/fp16/bf16, ``torch.compile``, ``torch.compile`` with CUDA graphs, onnxruntime CUDA
fp32/fp16, ssn-deploy's own TensorRT fp16 engine, and TensorRT through onnxruntime's
provider), measured only with ``--device cuda`` and otherwise recorded as "not measured" with
the reason. A backend that fails records its error text.

    python benchmarks/backends.py [--quick] [--device cpu|cuda] [--checkpoint PATH]
        [--threads N] [--full-block] [--no-compile] [--skip TEXT ...] [--data DIR]
        [--output PATH]

Writes benchmarks/results/backends.json (``--quick``: backends_quick.json).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as c
import numpy as np
import torch

from ssn_deploy.geometry import Box
from ssn_deploy.inference import PatchGrid, predict_block
from ssn_deploy.inference.loader import load_predictor
from ssn_deploy.inference.predictor import ModelSpec, Predictor, SpecGeometry
from ssn_deploy.models import load_checkpoint
from ssn_deploy.pipeline import default_geometry
from ssn_deploy.volumes import open_volume

QUICK_PATCH = (32, 32, 32)
QUICK_BLOCK = (32, 32, 64)
REFERENCE = "torch eager fp32"
GPU_REFERENCE = "torch cuda fp32"
COMPILES = {"first_call_compiles": True}  # compile_s = first call − median call


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    c.add_common_arguments(parser)
    parser.add_argument(
        "--full-block",
        action="store_true",
        help="also time predict_block on one interior default block per backend",
    )
    parser.add_argument("--no-compile", action="store_true", help="= --skip torch.compile")
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        metavar="TEXT",
        help="record rows whose name contains TEXT as skipped (repeatable; e.g. bf16 on a CPU "
        "without AVX512-BF16, where bf16 runs on a slow emulation path)",
    )
    parser.add_argument("--output", type=Path, help="results JSON (default: benchmarks/results)")
    args = parser.parse_args()
    if args.no_compile:
        args.skip.append("torch.compile")
    args.patches = args.patches or (2 if args.quick else 3)
    args.repeats = args.repeats or (2 if args.quick else 3)
    name = "backends_quick.json" if args.quick else "backends.json"
    args.output = args.output or c.RESULTS / name
    return args


def geometry(checkpoint: Path, quick: bool) -> dict[str, Any]:
    """Default patch, margin and block of ``ssn-deploy infer`` for this model at its voxel size."""
    ckpt = load_checkpoint(checkpoint)
    spec = ModelSpec.from_checkpoint(ckpt)
    g = default_geometry(c.NullPredictor(spec), ckpt.voxel_size)
    patch, block = (QUICK_PATCH, QUICK_BLOCK) if quick else (g.patch_shape, g.block_shape)
    margin = g.margin
    if quick:  # the same rule as default_geometry: an eighth of the patch, capped by the context
        margin = tuple(min(x, p // 8) for x, p in zip(spec.context, patch, strict=True))
    grid = PatchGrid.plan(patch, margin, g.overlap, spec.granularity)
    return {
        "patch_shape": list(patch),
        "margin": list(margin),
        "overlap": list(g.overlap),
        "block_shape": list(block),
        "stride": list(grid.stride),
        "patches_per_interior_block": len(grid.cores_for(Box(block, block))),
        "model_voxels_per_output_voxel": grid.cost(block),
        "grid": grid,
    }


# --- GPU-only backends ------------------------------------------------------------------------


def _cuda_graphs_predictor(files: c.ModelFiles, precision: str, threads: int) -> Predictor:
    """TorchPredictor whose forward is ``torch.compile(mode="reduce-overhead")`` (CUDA graphs).

    TorchPredictor's ``compile=True`` takes no mode, so the benchmark swaps the forward of an
    eager predictor: the same predict path (autocast, copy back) with CUDA graphs underneath.
    """
    predictor = load_predictor(
        files.checkpoint, "torch", device="cuda", precision=precision, threads=threads
    )
    predictor._forward = torch.compile(predictor._model, mode="reduce-overhead")  # type: ignore[attr-defined]
    return predictor


class AsTrainedPredictor(SpecGeometry):
    """The checkpoint's module exactly as trained (BatchNorms unfolded, contiguous layout) under
    autocast: what the torch backend ran before its inference form, kept as the speed baseline."""

    def __init__(self, checkpoint: Path, precision: str, threads: int) -> None:
        loaded = load_checkpoint(checkpoint)
        self.spec = ModelSpec.from_checkpoint(loaded)
        self._model = loaded.model.eval()
        self._dtype = {"fp32": None, "bf16": torch.bfloat16}[precision]
        self._precision = precision
        torch.set_num_threads(threads)

    @property
    def provenance(self) -> dict[str, Any]:
        return {"model": "checkpoint as trained", "backend": "torch", "precision": self._precision}

    def predict(self, batch: np.ndarray) -> np.ndarray:
        dtype = self._dtype
        with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            return self._model(torch.from_numpy(np.ascontiguousarray(batch))).float().numpy()


class SessionPredictor(SpecGeometry):
    """An onnxruntime session on explicit providers (for the TensorRT provider, which the
    product's OnnxPredictor does not offer); fails if the first provider did not start."""

    def __init__(self, path: Path, providers: list[Any]) -> None:
        import onnxruntime as ort

        self._session = ort.InferenceSession(str(path), providers=providers)
        wanted = providers[0][0] if isinstance(providers[0], tuple) else providers[0]
        if self._session.get_providers()[0] != wanted:
            raise RuntimeError(f"{wanted} did not start (running {self._session.get_providers()})")
        meta = self._session.get_modelmeta().custom_metadata_map
        self.spec = ModelSpec.from_metadata(meta, str(path))
        self._input = self._session.get_inputs()[0].name

    @property
    def provenance(self) -> dict[str, Any]:
        return {"model": "onnx", "backend": "onnxruntime-tensorrt", "precision": "fp16"}

    def predict(self, batch: np.ndarray) -> np.ndarray:
        (out,) = self._session.run(None, {self._input: np.ascontiguousarray(batch)})
        return np.asarray(out, dtype=np.float32)


def _tensorrt_predictor(files: c.ModelFiles, tmp: Path, patch_shape: c.Triple) -> Predictor:
    """ssn-deploy's own engine (export.tensorrt): fp16, profile up to one default patch."""
    from ssn_deploy.export.tensorrt import EngineCache, profile_for
    from ssn_deploy.inference.tensorrt_backend import TensorRTPredictor

    onnx = c.export_onnx_once(files, tmp)
    spec = ModelSpec.from_checkpoint(load_checkpoint(files.checkpoint))
    engine = EngineCache(tmp / "trt-cache").get_or_build(
        onnx, profile_for(spec, patch_shape), fp16=True
    )
    return TensorRTPredictor(engine)


def _ort_tensorrt_predictor(files: c.ModelFiles, tmp: Path) -> Predictor:
    options = {
        "trt_fp16_enable": True,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(tmp / "ort-trt-cache"),
    }
    onnx = c.export_onnx_once(files, tmp)
    return SessionPredictor(onnx, [("TensorrtExecutionProvider", options), "CUDAExecutionProvider"])


def _tensorrt_missing() -> str | None:
    """Why ssn-deploy's TensorRT engines cannot be built here, or None."""
    from ssn_deploy.errors import ConfigError
    from ssn_deploy.export.tensorrt import require_tensorrt

    try:
        require_tensorrt()
    except ConfigError as exc:
        return f"package not installed: {exc}"
    return None


def _ort_tensorrt_missing() -> str | None:
    """Why onnxruntime's TensorRT provider cannot run here, or None."""
    if "TensorrtExecutionProvider" in c.onnxruntime_providers():
        return None
    return (
        "package not installed: onnxruntime has no TensorrtExecutionProvider (onnxruntime-gpu "
        "with TensorRT libraries needed)"
    )


def gpu_backends(
    args: argparse.Namespace, files: c.ModelFiles, tmp: Path, patch_shape: c.Triple
) -> list[c.Backend]:
    """GPU rows; without ``--device cuda`` each is a "not measured" row with its reason."""
    dev, threads = "cuda", args.threads
    rows = [
        c.torch_backend(
            "torch cuda fp32",
            files,
            dev,
            "fp32",
            threads,
            note="cuDNN convolutions may use TF32 (see machine.gpu)",
        ),
        c.torch_backend("torch cuda fp16", files, dev, "fp16", threads),
        c.torch_backend("torch cuda bf16", files, dev, "bf16", threads),
        c.torch_backend(
            "torch.compile cuda fp32",
            files,
            dev,
            "fp32",
            threads,
            compile=True,
            warmup=2,
            note="first warm-up call compiles (cold on-disk cache)",
            extra=COMPILES,
        ),
        c.Backend(
            "torch.compile cuda graphs fp16",
            functools.partial(_cuda_graphs_predictor, files, "fp16", threads),
            "fp16",
            device=dev,
            warmup=3,
            note="mode=reduce-overhead; first call compiles (cold on-disk cache)",
            extra=COMPILES,
        ),
        c.onnx_backend("onnxruntime cuda fp32", files, tmp, dev, threads),
        c.onnx_backend("onnxruntime cuda fp16", files, tmp, dev, threads, fp16=True),
        c.Backend(
            "tensorrt fp16 (ssn-deploy engine)",
            functools.partial(_tensorrt_predictor, files, tmp, patch_shape),
            "fp16",
            device=dev,
            skip=_tensorrt_missing(),
            note="engine built (cached) when the predictor is made, before timing",
        ),
        c.Backend(
            "tensorrt fp16 (onnxruntime provider)",
            functools.partial(_ort_tensorrt_predictor, files, tmp),
            "fp16",
            device=dev,
            warmup=2,
            skip=_ort_tensorrt_missing(),
            note="first call builds the TensorRT engine (compile_s)",
            extra=COMPILES,
        ),
    ]
    if args.device != "cuda":
        for row in rows:
            reason = "no GPU in this run (--device cpu"
            reason += "; torch sees no CUDA GPU)" if not torch.cuda.is_available() else ")"
            row.skip = reason + (f"; also {row.skip}" if row.skip else "")
    return rows


def cold_compile_caches(tmp: Path) -> None:
    """Point torch.compile's on-disk caches at an empty folder: the compile time reported is a
    fresh worker's (a warm cache made a 28 s compile take 3 s here)."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp / "inductor-cache")
    os.environ["TRITON_CACHE_DIR"] = str(tmp / "gpu-kernel-cache")


def cpu_backends(args: argparse.Namespace, files: c.ModelFiles, tmp: Path) -> list[c.Backend]:
    threads = args.threads

    def as_trained(precision: str) -> Any:
        return functools.partial(AsTrainedPredictor, files.checkpoint, precision, threads)

    return [
        c.Backend(REFERENCE, as_trained("fp32"), "fp32"),
        c.Backend("torch eager bf16", as_trained("bf16"), "bf16"),
        c.torch_backend("torch inference form fp32", files, "cpu", "fp32", threads),
        c.torch_backend(
            "torch inference form bf16",
            files,
            "cpu",
            "bf16",
            threads,
            note="what --precision auto (the default) runs on CPUs with native bf16",
        ),
        c.torch_backend(
            "torch.compile fp32",
            files,
            "cpu",
            "fp32",
            threads,
            compile=True,
            warmup=2,
            note="first warm-up call compiles (compile_s; cold on-disk cache)",
            extra=COMPILES,
        ),
        c.onnx_backend("onnxruntime cpu fp32", files, tmp, "cpu", threads),
        c.onnx_backend("onnxruntime cpu fp16", files, tmp, "cpu", threads, fp16=True),
    ]


# --- derived and measured block throughput ----------------------------------------------------


def add_block_rates(rows: dict[str, dict[str, Any]], geo: dict[str, Any]) -> None:
    """Output voxels/s at the default block (from patch times), compile time, GPU ratios."""
    cost = geo["model_voxels_per_output_voxel"]
    gpu_base = rows.get(GPU_REFERENCE, {}).get("s_per_patch_best")
    for row in rows.values():
        if "s_per_patch_best" not in row:
            continue
        row["output_mvox_per_s"] = row["model_mvox_per_s"] / cost
        row["output_mvox_per_s_median"] = row["model_mvox_per_s_median"] / cost
        if row.get("warmup_s") and row.get("first_call_compiles"):
            row["compile_s"] = row["warmup_s"][0] - row["s_per_patch_median"]
        if gpu_base and row["device"] == "cuda":
            row["speed_vs_torch_cuda_fp32"] = gpu_base / row["s_per_patch_best"]


def full_block(
    args: argparse.Namespace,
    predictors: dict[str, Predictor],
    rows: dict[str, dict[str, Any]],
    geo: dict[str, Any],
) -> None:
    """``predict_block`` on the interior block at index (1, 1, 1) of the 520³ volume.

    Uses the warm predictors of the patch comparison (a compiled model is not compiled again).
    """
    raw = open_volume(f"{args.data / c.RAW_520}:volumes/raw")
    block = list(geo["block_shape"])
    box = Box(tuple(block), tuple(block)).intersect(Box.from_shape(raw.shape))
    for name, predictor in predictors.items():
        if rows[name].get("status") != "measured":
            continue
        c.sync(rows[name]["device"])
        start = time.perf_counter()
        predict_block(raw, box, predictor, geo["grid"])
        seconds = time.perf_counter() - start
        rows[name]["full_block"] = {
            "box": [list(box.begin), list(box.end)],
            "seconds": seconds,
            "output_mvox_per_s": box.size / seconds / 1e6,
        }


# --- report -----------------------------------------------------------------------------------


def print_report(report: dict[str, Any]) -> None:
    m, geo = report["machine"], report["geometry"]
    flags = [f for f, on in m["cpu"]["flags"].items() if on]
    print(
        f"\nmachine: {m['cores_usable']} cores ({m['cpu']['model']}; {' '.join(flags)}), "
        f"{m['threads']} threads, load {m['load_average_1min_start']:.2f} → "
        f"{report['load_average_1min_end']:.2f}; torch {m['torch']}, "
        f"onnxruntime {m['onnxruntime']}; model: {report['model']['weights']}"
    )
    print(
        f"patches {geo['patch_shape']} margin {geo['margin']} stride {geo['stride']}; block "
        f"{geo['block_shape']}: {geo['patches_per_interior_block']} patches, "
        f"{geo['model_voxels_per_output_voxel']:.2f} model voxels per output voxel"
    )
    header = (
        "backend;device;out Mvox/s;median;vs eager fp32;s/patch;"
        "compile s;GFLOP/s;of peak;max|Δ|;core max|Δ|;block Mvox/s"
    ).split(";")
    lines = []
    for name, r in report["backends"].items():
        if "s_per_patch_best" not in r:
            continue
        peak = r.get("fraction_of_peak")
        lines.append(
            [
                name,
                r["device"],
                c.fmt(r["output_mvox_per_s"]),
                c.fmt(r["output_mvox_per_s_median"]),
                f"{r['speed_vs_reference']:.2f}x",
                c.fmt(r["s_per_patch_best"]),
                c.fmt(r.get("compile_s"), ".1f"),
                c.fmt(r["gflops"]),
                f"{peak:.0%} {r['peak']}" if peak else "-",
                c.fmt(r["max_abs_diff"], ".2g"),
                c.fmt(r["max_abs_diff_core"], ".2g"),
                c.fmt(r.get("full_block", {}).get("output_mvox_per_s")),
            ]
        )
    c.print_table(header, lines)
    print("\n".join(["not measured:", *c.not_measured(report["backends"])]))
    print(f"elapsed {report['elapsed_s']:.0f} s; peak RSS {report['max_rss_mib']:.0f} MiB")


def main() -> None:
    args = parse_args()
    c.require_device(args.device)
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)  # the matmul peak runs with the model's thread count
    machine = c.machine_info(args.threads, args.device)
    with tempfile.TemporaryDirectory(prefix="ssn-bench-") as tmp_name, c.RssSampler() as sampler:
        tmp = Path(tmp_name)
        cold_compile_caches(tmp)
        files = c.prepare_checkpoint(args.checkpoint, tmp, args.seed)
        geo = geometry(files.checkpoint, args.quick)
        flops = c.conv_flops(files.checkpoint, geo["patch_shape"])
        backends = cpu_backends(args, files, tmp) + gpu_backends(
            args, files, tmp, geo["patch_shape"]
        )
        for backend in backends:
            skipped = [text for text in args.skip if text in backend.name]
            if skipped and not backend.skip:
                backend.skip = f"skipped (--skip {skipped[0]})"
        measured = {b.peak for b in backends if not b.skip}
        peaks = c.matmul_peaks(args.device, args.quick, measured)
        if "onnxruntime" in " ".join(b.name for b in backends if not b.skip):
            c.try_export_onnx(files, tmp)
        patches = c.read_patches(args.data, geo["patch_shape"], args.patches, args.seed)
        predictors: dict[str, Predictor] = {}
        rows = c.compare_backends(
            backends,
            patches,
            reference=REFERENCE,
            repeats=args.repeats,
            margin=geo["margin"],
            sampler=sampler,
            keep=predictors,
        )
        c.add_flop_rates(rows, flops["flops_per_patch"], peaks)
        add_block_rates(rows, geo)
        if args.full_block:
            full_block(args, predictors, rows, geo)
    report = {
        "benchmark": "backends",
        "quick": args.quick,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "seed": args.seed,
        "machine": machine,
        "model": {"weights": files.weights, **flops},
        "geometry": {k: v for k, v in geo.items() if k != "grid"},
        "patches": args.patches,
        "repeats": args.repeats,
        "matmul_peak": peaks,
        "reference": REFERENCE,
        "backends": rows,
        "max_rss_mib": c.max_rss_mib(),
        "load_average_1min_end": os.getloadavg()[0],
        "elapsed_s": time.perf_counter() - start,
        "notes": "output Mvox/s = model Mvox/s (best patch time) / model voxels per output "
        "voxel of an interior default block; full_block, where present, is measured",
    }
    print_report(report)
    c.write_json(args.output, report)


if __name__ == "__main__":
    main()
