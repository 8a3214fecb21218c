"""torch → ONNX (fp32, simplified, fp16) and ONNX → TensorRT artefacts.

The parity report that checks them against torch is :mod:`ssn_deploy.parity` (it runs the
artefacts through the inference predictors, which sit below this package). Names are imported
on first use: the engine reads TensorRT engines through :mod:`.tensorrt`, which must not load
torch and onnx into every ``infer`` and ``segment``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ssn_deploy.export.graph_passes import simplify_graph, to_fp16
    from ssn_deploy.export.onnx_export import export_fp16, export_onnx
    from ssn_deploy.export.package import export_model

_MODULES = {
    "export_fp16": "onnx_export",
    "export_model": "package",
    "export_onnx": "onnx_export",
    "simplify_graph": "graph_passes",
    "to_fp16": "graph_passes",
}

__all__ = ["export_fp16", "export_model", "export_onnx", "simplify_graph", "to_fp16"]


def __getattr__(name: str) -> Any:
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULES[name]}"), name)
