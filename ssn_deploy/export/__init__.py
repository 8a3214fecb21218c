"""torch → ONNX (fp32, simplified, fp16) and ONNX → TensorRT artefacts.

The parity report that checks them against torch is :mod:`ssn_deploy.parity` (it runs the
artefacts through the inference predictors, which sit below this package).
"""

from ssn_deploy.export.graph_passes import simplify_graph, to_fp16
from ssn_deploy.export.onnx_export import export_fp16, export_onnx
from ssn_deploy.export.package import export_model

__all__ = ["export_fp16", "export_model", "export_onnx", "simplify_graph", "to_fp16"]
