"""Triton python-backend model: raw patches → affinities with onnxruntime on the CPU.

:func:`ssn_deploy.serving.repository.build_repository` copies this file verbatim to
``affinity_py/1/model.py``, beside the ONNX file. It runs inside the server's environment
(numpy<2, onnxruntime, no ssn_deploy), so it imports nothing from ssn_deploy and reads
everything it needs from its ``config.pbtxt`` parameters. Triton already rejects requests whose
dtype or rank differ from the config; the checks here repeat them (the config may be edited)
and add what a config cannot say: sizes must be multiples of the model's granularity and at
most the repository's maximum patch, so one oversized request cannot exhaust the server.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported outside Triton (ssn-deploy's tests of the pure functions)
    pb_utils = None


def parameters(config: dict[str, Any]) -> dict[str, str]:
    """The ``parameters`` of a model config (as Triton passes it: JSON) as plain strings."""
    return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


def check_patch(
    dtype: np.dtype, shape: tuple[int, ...], granularity: list[int], max_patch: list[int]
) -> str | None:
    """Why a ``raw`` tensor cannot be served, or None if it can: float32 N×1×Z×Y×X with Z,Y,X
    positive multiples of ``granularity`` and at most ``max_patch``."""
    if dtype != np.float32:
        return f"raw must be FP32, got {dtype}"
    if len(shape) != 5 or shape[1] != 1:
        return f"raw must be N x 1 x Z x Y x X, got shape {list(shape)}"
    zyx = list(shape[2:])
    if any(s <= 0 or s % g for s, g in zip(zyx, granularity, strict=True)):
        return (
            f"raw Z,Y,X {zyx} must be positive multiples of the model's granularity {granularity}"
        )
    if any(s > m for s, m in zip(zyx, max_patch, strict=True)):
        return f"raw Z,Y,X {zyx} exceed this repository's maximum patch {max_patch}"
    return None


def _error(message: str) -> Any:
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)


class TritonPythonModel:
    """One onnxruntime session per model instance; same-shaped requests run as one batch."""

    def initialize(self, args: dict[str, str]) -> None:
        import onnxruntime as ort

        config = json.loads(args["model_config"])
        params = parameters(config)
        self.granularity = json.loads(params["ssn_deploy.granularity"])
        self.max_patch = json.loads(params["ssn_deploy.max_patch"])
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        onnx_file = params.get("ssn_deploy.onnx_file", "model.onnx")
        path = Path(args["model_repository"]) / args["model_version"] / onnx_file
        options = ort.SessionOptions()
        options.inter_op_num_threads = 1
        options.intra_op_num_threads = int(params.get("ssn_deploy.intra_op_threads", "0"))
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        groups: dict[tuple[int, ...], list[tuple[int, np.ndarray]]] = {}
        for i, request in enumerate(requests):
            tensor = pb_utils.get_input_tensor_by_name(request, self.input_name)
            if tensor is None:
                responses[i] = _error(f"the request has no input named {self.input_name!r}")
                continue
            raw = tensor.as_numpy()
            problem = check_patch(raw.dtype, raw.shape, self.granularity, self.max_patch)
            if problem:
                responses[i] = _error(problem)
            else:
                groups.setdefault(raw.shape[1:], []).append((i, raw))
        for items in groups.values():
            self._run(items, responses)
        return responses

    def _run(self, items: list[tuple[int, np.ndarray]], responses: list[Any]) -> None:
        """One session call for requests of one shape; their rows are split back afterwards."""
        batch = np.ascontiguousarray(np.concatenate([raw for _, raw in items]))
        try:
            (out,) = self.session.run([self.output_name], {self.input_name: batch})
        except Exception as exc:  # onnxruntime's own exception types
            for i, _ in items:
                responses[i] = _error(f"onnxruntime failed: {exc}")
            return
        start = 0
        for i, raw in items:
            rows = np.ascontiguousarray(out[start : start + len(raw)], dtype=np.float32)
            start += len(raw)
            responses[i] = pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(self.output_name, rows)]
            )

    def finalize(self) -> None:
        self.session = None
