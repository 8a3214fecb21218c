"""A bioimage.io model package (``model.bioimageio.zip``) of an exported affinity model.

Built with the ``bioimageio.spec`` API (model description format 0.5, the one
``bioimageio.core`` tests and runs), the package holds:

- weights: ``pytorch_state_dict`` (the architecture is ``ssn_deploy.models.registry.build_model``
  with the model's configuration, so it needs ssn-deploy installed) and, converted from it,
  ``onnx`` (the graph ``ssn-deploy export`` wrote: self-contained);
- one input ``raw`` (uint8 EM intensities; the preprocessing is the model's global
  normalisation ``(raw/255 − mean)/std`` as ``scale_linear``) and one output ``affinities``
  (float32 in [0, 1], one channel per offset), axes batch, channel, z, y, x with the voxel
  size in nm; z, y, x are multiples of the model's granularity and the output has the input's
  shape;
- test tensors: a real crop of the bundled sample raw and the affinities onnxruntime predicts
  for it (through the same predictor as ``ssn-deploy infer``);
- ``config.ssn_deploy``: offsets, context, granularity, normalisation, voxel size and the decoder
  (fragments + agglomeration, with the threshold the model carries);
- documentation: the model card (for a packaged model) or a card generated from the checkpoint,
  with the package's validation, decoding and attribution sections; license, authors and the
  citation of the method's paper.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ssn_deploy import __version__
from ssn_deploy.errors import ConfigError, OutputExistsError
from ssn_deploy.models.spec import ModelSpec, Triple
from ssn_deploy.pipeline import DEFAULT_THRESHOLD, is_anisotropic

if TYPE_CHECKING:
    from ssn_deploy.models.checkpoint import Checkpoint

INPUT_ID = "raw"
OUTPUT_ID = "affinities"
TEST_SHAPE = (32, 64, 64)
"""z, y, x of the test tensors (cropped to the granularity)."""

PAPER = {
    "text": (
        "Zhang, Zhai, Guo, Liu, Xie, Han: A distribution-aware semi-supervised pipeline for "
        "cost-effective neuron segmentation. iScience (2025)"
    ),
    "doi": "10.1016/j.isci.2025.114507",
}
DATA_PAPER = (
    "Parag, Chakraborty, Plaza, Scheffer: A context-aware delayed agglomeration framework for "
    "electron microscopy segmentation. PLoS ONE (2015)"
)
DATA = {
    "text": f"{DATA_PAPER} (FlyEM NeuroProof examples: training data and test tensors, CC BY 3.0)",
    "doi": "10.1371/journal.pone.0125825",
}
AUTHORS = ("ssn-deploy developers",)
LICENSE = "MIT"
INSTALL_HINT = "pip install 'ssn-deploy[bioimageio]'"


def require_bioimageio() -> None:
    """Fail before anything is written when ``bioimageio.spec`` is not installed."""
    try:
        import bioimageio.spec  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"--format bioimageio needs the bioimageio.spec package: {INSTALL_HINT}"
        ) from None


def sample_crop(granularity: Triple, shape: Triple = TEST_SHAPE) -> np.ndarray:
    """A ``shape`` crop (rounded down to ``granularity``) of the bundled sample's raw: of the
    windows on a 16-voxel grid, the one holding the most ground-truth neurons (most boundaries
    to show in the test tensors and the cover)."""
    from ssn_deploy.sample import load_sample

    sample = load_sample()
    raw, labels = sample["raw"], sample["labels"]
    size = [
        max(g, min(s, n) // g * g) for s, n, g in zip(shape, raw.shape, granularity, strict=True)
    ]
    if any(s > n for s, n in zip(size, raw.shape, strict=True)):
        raise ConfigError(
            f"the model's granularity {tuple(granularity)} exceeds the bundled sample "
            f"{raw.shape}: no test tensor can be cut from it"
        )

    def window(origin: tuple[int, ...]) -> tuple[slice, ...]:
        return tuple(slice(a, a + s) for a, s in zip(origin, size, strict=True))

    starts = [range(0, n - s + 1, 16) for n, s in zip(raw.shape, size, strict=True)]
    origins = ((z, y, x) for z in starts[0] for y in starts[1] for x in starts[2])
    region = window(max(origins, key=lambda o: len(np.unique(labels[window(o)]))))
    return np.ascontiguousarray(raw[region])


def _channel_name(offset: Triple) -> str:
    """A Python identifier per offset: ``aff_z`` for (-1, 0, 0) (the nearest neighbour before,
    as ssn-deploy's affinities are defined), ``aff_zm2_xp1`` for (-2, 0, 1)."""
    parts = [
        axis if v == -1 else f"{axis}{'m' if v < 0 else 'p'}{abs(v)}"
        for axis, v in zip("zyx", offset, strict=True)
        if v
    ]
    return "aff_" + "_".join(parts or ["0"])


def decoder_config(spec: ModelSpec) -> dict[str, Any]:
    """What turns the affinities into neurons: ``ssn_deploy.agglomeration.segment_affinities``."""
    anisotropic = is_anisotropic(spec.voxel_size)
    return {
        "function": "ssn_deploy.agglomeration.segment_affinities",
        "fragments": (
            "seeded watershed of 1 - mean affinity, "
            + ("per z-section (in-plane channels)" if anisotropic else "in 3D (all channels)")
        ),
        "anisotropic": anisotropic,
        "agglomeration": "hierarchical region merging by median boundary affinity "
        "(waterz aff50_his256)",
        "threshold": spec.threshold if spec.threshold is not None else DEFAULT_THRESHOLD,
        "threshold_source": "validation" if spec.threshold is not None else "default",
    }


def ssn_deploy_config(ckpt: Checkpoint, spec: ModelSpec) -> dict[str, Any]:
    """``config.ssn_deploy`` of the description: the model's spec, decoder and provenance."""
    return {
        "version": __version__,
        "offsets": [list(o) for o in spec.offsets],
        "voxel_size_nm": None if spec.voxel_size is None else list(spec.voxel_size),
        "context": list(spec.context),
        "granularity": list(spec.granularity),
        "normalization": spec.normalization.to_dict(),
        "decoder": decoder_config(spec),
        "model": ckpt.config.to_dict(),
        "iteration": ckpt.iteration,
        "validation": {
            k: v for k, v in ckpt.extra.get("best", {}).items() if isinstance(v, int | float)
        },
    }


def _packaged_card(checkpoint: Path) -> tuple[str, Path] | None:
    """(name, model card) when ``checkpoint`` is a packaged model's checkpoint."""
    from ssn_deploy.inference.loader import PACKAGED_MODELS, default_model

    for model in PACKAGED_MODELS:
        path = default_model("torch", model.name)
        if path.resolve() == checkpoint.resolve():
            suffix = "" if model.stem == "default" else model.stem.removeprefix("default")
            return model.name, path.with_name(f"MODEL_CARD{suffix}.md")
    return None


def _generated_card(ckpt: Checkpoint, spec: ModelSpec, source: Path) -> str:
    cfg = ckpt.config
    best = ckpt.extra.get("best", {})
    metrics = ", ".join(
        f"{k} {best[k]:.3f}" for k in ("voi", "voi_split", "voi_merge", "arand") if k in best
    )
    return "\n".join(
        [
            f"# ssn-deploy affinity model `{source.name}`",
            "",
            "An affinity U-Net trained with ssn-deploy (residual symmetric 3D U-Net, filters "
            f"{', '.join(map(str, cfg.filters))}, poolings {[list(p) for p in cfg.poolings]}). "
            f"Training data voxel size: {spec.voxel_size} nm; iteration {ckpt.iteration}.",
            "",
            f"Validation at export: {metrics or 'not recorded in the checkpoint'}.",
            "",
        ]
    )


def _strip_relative_links(markdown: str) -> str:
    """``[text](relative/path)`` → ``text``: the package does not hold the repository's files."""
    return re.sub(r"\[([^\]]+)\]\((?![a-z]+://)[^)]*\)", r"\1", markdown)


def documentation(
    ckpt: Checkpoint, spec: ModelSpec, checkpoint: Path, test_shape: tuple[int, ...]
) -> str:
    """The package's README.md: the model card, then validation, decoding and attribution."""
    packaged = _packaged_card(checkpoint)
    if packaged is not None and packaged[1].is_file():
        card = _strip_relative_links(packaged[1].read_text())
    else:
        card = _generated_card(ckpt, spec, checkpoint)
    decoder = decoder_config(spec)
    offsets = ", ".join(f"{_channel_name(o)} {tuple(o)}" for o in spec.offsets)
    return "\n".join(
        [
            card.rstrip(),
            "",
            "## Validation of this bioimage.io package",
            "",
            f"The test input is a {'×'.join(map(str, test_shape))} crop (z, y, x) of the "
            "bundled sample (`fib_medulla_250` test region, 10 nm FIB-SEM, never seen in "
            "training); the test output is what ssn-deploy's onnxruntime predictor computes "
            "for it. `bioimageio.core.test_model` reproduces it with both weight formats "
            "(`onnx`, `pytorch_state_dict`). Segmentation quality (VOI, ARAND) on the test "
            "region is reported above where the model card has it; it is measured by "
            "`ssn-deploy infer` + `ssn-deploy evaluate`, not by this package."
            + (
                f" This model was trained at {spec.voxel_size} nm: on the 10 nm test crop "
                "its outputs check reproducibility, not quality."
                if spec.voxel_size is not None and tuple(spec.voxel_size) != (10.0, 10.0, 10.0)
                else ""
            ),
            "",
            "## Inputs, outputs and decoding",
            "",
            "- input `raw`: uint8 EM intensities, axes batch, channel (1), z, y, x; z, y, x "
            f"multiples of {tuple(spec.granularity)}; voxel size {spec.voxel_size} nm. The "
            "preprocessing is the model's global normalisation "
            f"(raw/255 − {spec.normalization.mean:g})/{spec.normalization.std:g}.",
            f"- output `affinities`: float32 in [0, 1], one channel per offset ({offsets}): "
            "the probability that a voxel and its neighbour at the offset belong to the same "
            "neuron; same z, y, x shape as the input.",
            f"- outputs within {tuple(spec.context)} voxels (z, y, x) of a tile border saw "
            "zero padding: when tiling a large volume, overlap tiles by that context and crop "
            "it (what `ssn-deploy infer` does).",
            f"- decoding (`config.ssn_deploy.decoder`): fragments by {decoder['fragments']}, "
            f"then {decoder['agglomeration']} at threshold {decoder['threshold']} "
            "(`ssn_deploy.agglomeration.segment_affinities`, or `ssn-deploy infer` end to end).",
            "",
            "## Method, citation and data",
            "",
            f"Method: {PAPER['text']}, doi:{PAPER['doi']}. This model is ssn-deploy's "
            "implementation, not the paper's released weights.",
            "",
            "Data: FlyEM NeuroProof examples `training_sample2` (FIB-SEM, Drosophila medulla, "
            "HHMI Janelia FlyEM), CC BY 3.0; "
            f"{DATA_PAPER}, doi:{DATA['doi']}. The test tensors are "
            "crops of it.",
            "",
        ]
    )


def cover_image(raw: np.ndarray, affinities: np.ndarray, zoom: int = 4) -> np.ndarray:
    """RGB uint8: the middle z-section of the test input (grey) beside its affinities (the
    first three channels as R, G, B), ``zoom``× nearest-neighbour (2:1 for a square crop)."""
    z = raw.shape[0] // 2
    grey = np.repeat(raw[z][..., None], 3, axis=-1)
    channels = [affinities[c, z] for c in range(min(3, affinities.shape[0]))]
    channels += [np.zeros_like(channels[0])] * (3 - len(channels))
    colour = (np.clip(np.stack(channels, axis=-1), 0, 1) * 255).round().astype(np.uint8)
    image = np.concatenate([grey, colour], axis=1)
    return np.repeat(np.repeat(image, zoom, axis=0), zoom, axis=1)


def _name(checkpoint: Path, spec: ModelSpec) -> str:
    packaged = _packaged_card(checkpoint)
    kind = "anisotropic EM" if is_anisotropic(spec.voxel_size) else "isotropic EM"
    if packaged is not None:
        return f"ssn-deploy {packaged[0]} neuron affinities ({kind})"
    stem = re.sub(r"[^A-Za-z0-9_+\- ()]", "-", checkpoint.stem)[:24]
    return f"ssn-deploy neuron affinities {stem} ({kind})"


def export_bioimageio(
    checkpoint: str | Path,
    onnx_path: str | Path,
    out_path: str | Path,
    *,
    opset: int,
    overwrite: bool = False,
    test_shape: Triple = TEST_SHAPE,
) -> Path:
    """Write the bioimage.io package of ``checkpoint`` (and its exported ``onnx_path``).

    The test output is predicted by onnxruntime from ``onnx_path``. The description is
    validated by ``bioimageio.spec`` (with its file checks) before the zip is written.
    """
    require_bioimageio()
    import imageio.v3 as iio
    import tifffile
    import torch
    from bioimageio.spec import save_bioimageio_package
    from bioimageio.spec.model import v0_5 as bio

    from ssn_deploy.inference.onnx_backend import OnnxPredictor
    from ssn_deploy.models.checkpoint import load_checkpoint

    checkpoint, out_path = Path(checkpoint), Path(out_path)
    if out_path.exists() and not overwrite:
        raise OutputExistsError(f"{out_path} already exists; pass --overwrite to replace it")
    ckpt = load_checkpoint(checkpoint)
    spec = ModelSpec.from_checkpoint(ckpt)
    norm = spec.normalization
    raw = sample_crop(spec.granularity, test_shape)
    affinities = OnnxPredictor(onnx_path).predict(norm(raw)[None, None])

    with tempfile.TemporaryDirectory(prefix="ssn-bioimageio-") as tmp:
        tmp_dir = Path(tmp)
        np.save(tmp_dir / "test_input.npy", raw[None, None])
        np.save(tmp_dir / "test_output.npy", affinities)
        tifffile.imwrite(tmp_dir / "sample_input.tif", raw)
        tifffile.imwrite(tmp_dir / "sample_output.tif", affinities[0])
        iio.imwrite(tmp_dir / "cover.png", cover_image(raw, affinities[0]))
        state = tmp_dir / "weights.pt"
        torch.save({k: v.detach().cpu() for k, v in ckpt.model.state_dict().items()}, state)
        readme = tmp_dir / "README.md"
        readme.write_text(documentation(ckpt, spec, checkpoint, raw.shape))

        voxel = spec.voxel_size or (1.0, 1.0, 1.0)
        unit = "nanometer" if spec.voxel_size is not None else None
        ids = [bio.AxisId(a) for a in "zyx"]
        inputs = [
            bio.InputTensorDescr(
                id=bio.TensorId(INPUT_ID),
                description="uint8 EM intensities (z, y, x), normalised by the preprocessing",
                axes=[
                    bio.BatchAxis(),
                    bio.ChannelAxis(channel_names=[bio.Identifier("raw")]),
                    *[
                        bio.SpaceInputAxis(
                            id=a,
                            size=bio.ParameterizedSize(min=g, step=g),
                            scale=s,
                            unit=unit,
                        )
                        for a, g, s in zip(ids, spec.granularity, voxel, strict=True)
                    ],
                ],
                data=bio.IntervalOrRatioDataDescr(type="uint8"),
                preprocessing=[
                    bio.EnsureDtypeDescr(kwargs=bio.EnsureDtypeKwargs(dtype="float32")),
                    bio.ScaleLinearDescr(
                        kwargs=bio.ScaleLinearKwargs(
                            gain=1.0 / (255.0 * norm.std), offset=-norm.mean / norm.std
                        )
                    ),
                    # explicit: otherwise the spec appends a cast back to the input's uint8
                    bio.EnsureDtypeDescr(kwargs=bio.EnsureDtypeKwargs(dtype="float32")),
                ],
                test_tensor=bio.FileDescr(source=tmp_dir / "test_input.npy"),
                sample_tensor=bio.FileDescr(source=tmp_dir / "sample_input.tif"),
            )
        ]
        outputs = [
            bio.OutputTensorDescr(
                id=bio.TensorId(OUTPUT_ID),
                description="affinities to the neighbour at each offset (channels), in [0, 1]",
                axes=[
                    bio.BatchAxis(),
                    bio.ChannelAxis(channel_names=[_channel_name(o) for o in spec.offsets]),
                    *[
                        bio.SpaceOutputAxis(
                            id=a,
                            size=bio.SizeReference(tensor_id=bio.TensorId(INPUT_ID), axis_id=a),
                            scale=s,
                            unit=unit,
                        )
                        for a, s in zip(ids, voxel, strict=True)
                    ],
                ],
                data=bio.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)),
                test_tensor=bio.FileDescr(source=tmp_dir / "test_output.npy"),
                sample_tensor=bio.FileDescr(source=tmp_dir / "sample_output.tif"),
            )
        ]
        torch_version = bio.Version(torch.__version__.split("+")[0])
        weights = bio.WeightsDescr(
            pytorch_state_dict=bio.PytorchStateDictWeightsDescr(
                source=state,
                architecture=bio.ArchitectureFromLibraryDescr(
                    callable=bio.Identifier("build_model"),
                    import_from="ssn_deploy.models.registry",
                    kwargs={"config": ckpt.config.to_dict()},
                ),
                pytorch_version=torch_version,
                comment=f"needs the ssn-deploy package ({__version__}) for the architecture",
            ),
            onnx=bio.OnnxWeightsDescr(
                source=Path(onnx_path),
                opset_version=opset,
                parent="pytorch_state_dict",
                comment="ssn-deploy export: BatchNorm folded, constants folded, dynamic N/Z/Y/X",
            ),
        )
        anisotropic = is_anisotropic(spec.voxel_size)
        descr = bio.ModelDescr(
            name=_name(checkpoint, spec),
            description=(
                "3D U-Net predicting nearest-neighbour affinities (z, y, x) of neurons in "
                f"{'serial-section' if anisotropic else 'FIB-SEM'} EM at "
                f"{'x'.join(f'{v:g}' for v in voxel)} nm; agglomerate them into neurons with "
                "the decoder in config.ssn_deploy (ssn-deploy)."
            ),
            authors=[bio.Author(name=name) for name in AUTHORS],
            cite=[bio.CiteEntry(text=c["text"], doi=bio.Doi(c["doi"])) for c in (PAPER, DATA)],
            license=bio.LicenseId(LICENSE),
            covers=[bio.FileDescr(source=tmp_dir / "cover.png")],
            documentation=bio.FileDescr(source=readme),
            tags=[
                "electron-microscopy",
                "3d",
                "brain",
                "unet",
                "pytorch",
                "onnx",
                "instance-segmentation",
                "affinities",
                "connectomics",
                "neurons",
                "ssn-deploy",
            ],
            inputs=inputs,
            outputs=outputs,
            weights=weights,
            version=bio.Version(__version__),
            config=bio.Config(
                bioimageio=bio.BioimageioConfig(
                    architecture_type="3D U-Net",
                    modality="electron microscopy",
                    target_structure=["neurons"],
                    task="affinity prediction for neuron instance segmentation",
                    model_parameter_count=sum(p.numel() for p in ckpt.model.parameters()),
                ),
                ssn_deploy=ssn_deploy_config(ckpt, spec),
            ),
        )
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp_zip = out_path.with_name(out_path.name + ".tmp.zip")
        try:
            save_bioimageio_package(descr, output_path=tmp_zip)
            tmp_zip.replace(out_path)  # atomic: a failed export leaves no partial package
        finally:
            tmp_zip.unlink(missing_ok=True)
    return out_path
