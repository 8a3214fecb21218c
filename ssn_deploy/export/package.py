"""A model directory for deployment: weights-only checkpoint, ONNX graphs, TensorRT engines.

``DIR/model.ckpt`` (weights only), ``DIR/model.onnx`` (fp32, optionally simplified),
``DIR/model.fp16.onnx`` (``fp16=True``) and ``DIR/tensorrt/<sm_XY>/model-<key>.plan`` (format
``tensorrt``, built on this machine's GPU) and ``DIR/model.bioimageio.zip`` (``bioimageio=True``:
a bioimage.io model package, :mod:`ssn_deploy.export.bioimageio`). Engines are cached per
compute capability, so
running the same export on other GPUs adds their engines beside the first. The parity report
that checks every artefact against torch lives in :mod:`ssn_deploy.parity`, which runs them
through the same predictors as ``ssn-deploy infer``.
"""

from __future__ import annotations

from pathlib import Path

from ssn_deploy import __version__
from ssn_deploy.errors import ConfigError, OutputExistsError
from ssn_deploy.export.onnx_export import DEFAULT_OPSET, export_fp16, export_onnx
from ssn_deploy.models.checkpoint import load_checkpoint, save_checkpoint
from ssn_deploy.models.spec import ModelSpec, Triple
from ssn_deploy.volumes import refuse_overlap

CHECKPOINT = "model.ckpt"
ONNX = "model.onnx"
ONNX_FP16 = "model.fp16.onnx"
PARITY = "parity.json"
TENSORRT_DIR = "tensorrt"
TENSORRT = "tensorrt engine"  # key of the engine in export_model's result
BIOIMAGEIO = "model.bioimageio.zip"


def _replaced_files(out_dir: Path, fp16: bool, bioimageio: bool = False) -> list[Path]:
    """The files an export (with its parity report) replaces; engines are cached, not replaced."""
    names = [
        CHECKPOINT,
        ONNX,
        *([ONNX_FP16] if fp16 else []),
        *([BIOIMAGEIO] if bioimageio else []),
        PARITY,
    ]
    return [out_dir / name for name in names]


def export_model(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    tensorrt: bool = False,
    fp16: bool = False,
    opset: int = DEFAULT_OPSET,
    simplify: bool = True,
    patch_shape: Triple | None = None,
    max_batch: int = 1,
    bioimageio: bool = False,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write the artefacts into ``out_dir``; returns ``{file name or TENSORRT: path}``.

    The ONNX graph is always written (it is what TensorRT builds from). ``patch_shape`` and
    ``max_batch`` bound the TensorRT optimisation profile (the engine accepts batches of
    1…``max_batch`` patches from the granularity up to ``patch_shape``). ``bioimageio`` packages
    the checkpoint and the ONNX graph for bioimage.io (test tensors predicted by onnxruntime).
    Everything that can fail for a missing dependency or a bad option fails before a file is
    written.
    """
    out_dir = Path(out_dir)
    replaced_files = _replaced_files(out_dir, fp16, bioimageio)
    for replaced in replaced_files:
        refuse_overlap(replaced, [checkpoint], "output directory")
    existing = [str(p) for p in replaced_files if p.exists()]
    if existing and not overwrite:
        raise OutputExistsError(f"{', '.join(existing)} already exist(s); pass --overwrite")
    if bioimageio:
        from ssn_deploy.export.bioimageio import require_bioimageio

        require_bioimageio()
    ckpt = load_checkpoint(checkpoint)
    profile = None
    if tensorrt:
        from ssn_deploy.export import tensorrt as trt

        trt.require_tensorrt()
        trt.compute_capability()  # fails here, not after the ONNX export, without a GPU
        if patch_shape is None:
            raise ConfigError("a TensorRT export needs the largest patch shape (--patch-shape)")
        profile = trt.profile_for(ModelSpec.from_checkpoint(ckpt), patch_shape, max_batch)

    files = {CHECKPOINT: out_dir / CHECKPOINT, ONNX: out_dir / ONNX}
    extra = {k: v for k, v in ckpt.extra.items() if k in ("best", "config", "versions")}
    save_checkpoint(
        files[CHECKPOINT],
        ckpt.model,
        normalization=ckpt.normalization,
        voxel_size=ckpt.voxel_size,
        iteration=ckpt.iteration,
        extra=extra | {"exported_by": f"ssn-deploy {__version__}", "source": str(checkpoint)},
    )
    export_onnx(ckpt, files[ONNX], opset=opset, simplify=simplify, overwrite=True)
    if fp16:
        files[ONNX_FP16] = export_fp16(files[ONNX], out_dir / ONNX_FP16, overwrite=True)
    if bioimageio:
        from ssn_deploy.export.bioimageio import export_bioimageio

        files[BIOIMAGEIO] = export_bioimageio(
            checkpoint, files[ONNX], out_dir / BIOIMAGEIO, opset=opset, overwrite=True
        )
    if profile is not None:
        cache = trt.EngineCache(out_dir / TENSORRT_DIR)
        files[TENSORRT] = cache.get_or_build(files[ONNX], profile, fp16=fp16)
    return files
