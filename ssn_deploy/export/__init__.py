"""torch → ONNX (with parity checks) and ONNX → TensorRT artefacts."""

from ssn_deploy.export.onnx_export import export_onnx
from ssn_deploy.export.package import export_model, parity_report

__all__ = ["export_model", "export_onnx", "parity_report"]
