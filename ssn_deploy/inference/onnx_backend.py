"""A :class:`~ssn_deploy.inference.predictor.Predictor` running an ONNX model in onnxruntime.

The geometry comes from the model's ``metadata_props`` (keys in
:mod:`ssn_deploy.inference.predictor`). onnxruntime silently falls back to the CPU when a
requested provider cannot start, so the session's providers are checked after creation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ssn_deploy.errors import ConfigError, InputNotFoundError, InvalidInputError
from ssn_deploy.export.graph_passes import graph_precision
from ssn_deploy.inference.predictor import ModelSpec, SpecGeometry

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def _onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError(
            "the onnxruntime backend needs onnxruntime: pip install 'ssn-deploy[cpu]' "
            "(or [gpu] for onnxruntime-gpu)"
        ) from None
    return onnxruntime


class OnnxPredictor(SpecGeometry):
    """An onnxruntime session on ``device`` ("cpu" or "cuda") with ``threads`` intra-op threads.

    ``spec`` replaces the model's metadata (for ONNX files exported elsewhere).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        device: str = "cpu",
        threads: int | None = None,
        spec: ModelSpec | None = None,
    ) -> None:
        ort = _onnxruntime()
        path = Path(path)
        if not path.is_file():
            raise InputNotFoundError(f"ONNX model not found: {path}")
        if device not in PROVIDERS:
            raise ConfigError(f"device: onnxruntime supports {sorted(PROVIDERS)}, got {device!r}")
        provider = PROVIDERS[device]
        if provider not in ort.get_available_providers():
            raise ConfigError(
                f"onnxruntime {ort.__version__} has no {provider} (available: "
                f"{', '.join(ort.get_available_providers())}); install onnxruntime-gpu for CUDA"
            )
        options = ort.SessionOptions()
        options.inter_op_num_threads = 1
        # No memory-pattern planning (onnxruntime's pre-planned allocation per input shape):
        # it raised the peak. Measured on a 256³ infer (benchmarks/scaling.py's crop, 2 cores):
        # peak RSS 3.25 -> 2.40 GB, affinities 58.7 -> 56.7 s; disabling the arena instead saved
        # 1.04 GB but cost 8 % of the time.
        options.enable_mem_pattern = False
        if threads is not None:
            if threads < 1:
                raise ConfigError(f"threads must be >= 1, got {threads}")
            options.intra_op_num_threads = threads
        providers = [provider] if device == "cpu" else [provider, PROVIDERS["cpu"]]
        try:
            self._session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types for bad files
            raise InvalidInputError(f"{path}: onnxruntime cannot load it ({exc})") from None
        active = self._session.get_providers()
        if active[0] != provider:
            raise ConfigError(
                f"onnxruntime could not start {provider} for {path} (running on {active}); "
                "check the CUDA/cuDNN libraries or use --device cpu"
            )
        metadata = self._session.get_modelmeta().custom_metadata_map
        self.spec = spec or ModelSpec.from_metadata(metadata, str(path))
        model_input = self._session.get_inputs()[0]
        self._input = model_input.name
        self._output = self._session.get_outputs()[0].name
        self._static_shape = [d if isinstance(d, int) else None for d in model_input.shape]
        self._provenance = {
            "model": str(path),
            "backend": "onnxruntime",
            "device": device,
            "precision": graph_precision(metadata),
            "onnxruntime": ort.__version__,
        }

    @property
    def provenance(self) -> dict[str, Any]:
        return dict(self._provenance)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        self.check_batch(batch)
        fixed = [(s, d) for s, d in zip(batch.shape, self._static_shape, strict=False) if d]
        if any(s != d for s, d in fixed):
            raise InvalidInputError(
                f"{self._provenance['model']} accepts only inputs of shape "
                f"{self._static_shape} (None = any), got {batch.shape}; export it with dynamic "
                "axes or pass a matching patch shape and batch size"
            )
        (out,) = self._session.run([self._output], {self._input: np.ascontiguousarray(batch)})
        return np.asarray(out, dtype=np.float32)
