"""torch → ONNX with dynamic batch and z/y/x axes, and the model's spec in the metadata.

The engine and Triton configure themselves from the ONNX file alone (offsets, normalisation,
voxel size, context, granularity; see :mod:`ssn_deploy.models.spec`), so a model travels as one
file.
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from pathlib import Path

import onnx
import torch

from ssn_deploy import __version__
from ssn_deploy.errors import OutputExistsError
from ssn_deploy.export.graph_passes import PRECISION_KEY, simplify_graph, to_fp16
from ssn_deploy.models.checkpoint import Checkpoint, load_checkpoint
from ssn_deploy.models.spec import ModelSpec

log = logging.getLogger(__name__)

INPUT_NAME = "raw"
OUTPUT_NAME = "affinities"
DEFAULT_OPSET = 17


def _example_input(spec: ModelSpec) -> torch.Tensor:
    """A small input of valid shape: twice the granularity per axis, at least 16 voxels."""
    shape = [max(2 * g, 16 // g * g or g) for g in spec.granularity]
    return torch.zeros((1, 1, *shape), dtype=torch.float32)


def export_onnx(
    checkpoint: str | Path | Checkpoint,
    out_path: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    simplify: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write ``checkpoint``'s model as ONNX; returns the path. Checked with ``full_check``.

    ``simplify`` folds constants and BatchNorm into the convolutions (see
    :mod:`ssn_deploy.export.graph_passes`).
    """
    out_path = Path(out_path)
    _refuse_existing(out_path, overwrite)
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    model = ckpt.model.eval().float()
    spec = ModelSpec.from_checkpoint(ckpt)
    buffer = io.BytesIO()
    spatial = {2: "z", 3: "y", 4: "x"}
    with torch.inference_mode(), warnings.catch_warnings():
        # the tracer warns about the input-shape check, which is constant per export by design
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            model,
            (_example_input(spec),),
            buffer,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "n", **spatial}, OUTPUT_NAME: {0: "n", **spatial}},
            opset_version=opset,
            dynamo=False,
        )
    proto = onnx.load_from_string(buffer.getvalue())
    metadata = spec.to_metadata() | {
        "ssn_deploy.version": __version__,
        "ssn_deploy.model": ckpt.config.name,
        "ssn_deploy.iteration": str(ckpt.iteration),
        "ssn_deploy.simplified": json.dumps(simplify),
        PRECISION_KEY: "fp32",
    }
    onnx.helper.set_model_props(proto, metadata)
    proto.doc_string = "ssn-deploy affinity model: float32[N,1,Z,Y,X] -> float32[N,C,Z,Y,X]"
    if simplify:
        proto = simplify_graph(proto)
    _save_checked(proto, out_path)
    log.info("wrote %s (opset %d%s)", out_path, opset, ", simplified" if simplify else "")
    return out_path


def export_fp16(onnx_path: str | Path, out_path: str | Path, *, overwrite: bool = False) -> Path:
    """Write the fp16 variant of an exported graph (float32 in and out); returns the path."""
    out_path = Path(out_path)
    _refuse_existing(out_path, overwrite)
    proto = to_fp16(onnx.load(str(onnx_path)))
    _save_checked(proto, out_path)
    log.info("wrote %s (fp16 of %s)", out_path, onnx_path)
    return out_path


def _refuse_existing(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists; pass --overwrite to replace it")


def _save_checked(proto: onnx.ModelProto, out_path: Path) -> None:
    """``full_check``, then an atomic write: a failed export never leaves a partial file."""
    onnx.checker.check_model(proto, full_check=True)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    onnx.save(proto, tmp)
    tmp.replace(out_path)
