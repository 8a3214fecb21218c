"""Rewrites of an exported ONNX graph: simplification and an fp16 variant.

Both keep the graph's interface (``float32[N,1,Z,Y,X] -> float32[N,C,Z,Y,X]``) and its
``ssn_deploy.*`` metadata, so every engine and Triton configure themselves from either file.
Simplification (constant folding, BatchNorm folded into the convolutions, dead nodes removed)
gives TensorRT and other runtimes a smaller graph; onnxruntime does the same fusions at load
time, so on onnxruntime it changes neither results nor speed. The fp16 variant halves the
weights and runs the network in half precision on GPUs; its inputs and outputs stay float32
(casts at the ends), so a caller never sees the difference.
"""

from __future__ import annotations

from typing import Any

import onnx

from ssn_deploy.errors import ConfigError
from ssn_deploy.models.spec import METADATA_PREFIX

PRECISION_KEY = METADATA_PREFIX + "precision"


def _metadata(proto: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in proto.metadata_props}


def _restore_metadata(proto: onnx.ModelProto, metadata: dict[str, str]) -> onnx.ModelProto:
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, metadata)
    return proto


def _need(module: str, extra: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(
            f"this export step needs {module.split('.')[0]}: pip install 'ssn-deploy[{extra}]'"
        ) from None


def simplify_graph(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Constant folding, BatchNorm → Conv folding and dead-node removal (onnxscript optimizer)."""
    optimizer = _need("onnxscript.optimizer", "cpu")
    metadata = _metadata(proto)
    simplified = optimizer.optimize(proto)
    return _restore_metadata(simplified, metadata)


def to_fp16(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph in float16 with float32 inputs and outputs; metadata says ``fp16``.

    Uses onnxruntime's converter (shipped in both onnxruntime wheels), then sorts the nodes:
    the converter appends the input casts after their consumers, which ``onnx.checker``
    rejects.
    """
    float16 = _need("onnxruntime.transformers.float16", "cpu")
    onnx_model = _need("onnxruntime.transformers.onnx_model", "cpu")
    metadata = _metadata(proto)
    source = onnx.ModelProto()
    source.CopyFrom(proto)  # the converter rewrites its argument in place
    converted = float16.convert_float_to_float16(source, keep_io_types=True)
    wrapper = onnx_model.OnnxModel(converted)
    wrapper.topological_sort()
    return _restore_metadata(wrapper.model, metadata | {PRECISION_KEY: "fp16"})


def graph_precision(metadata: dict[str, str]) -> str:
    """``fp16`` or ``fp32`` as recorded in the metadata (files without the key are fp32)."""
    return metadata.get(PRECISION_KEY, "fp32")
