"""torch → ONNX (with parity checks) and ONNX → TensorRT artefacts."""

from ssn_deploy.export.onnx_export import export_onnx

__all__ = ["export_onnx"]
