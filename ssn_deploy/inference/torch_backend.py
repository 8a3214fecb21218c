"""A :class:`~ssn_deploy.inference.predictor.Predictor` running a torch module (CPU or CUDA).

The model runs in its inference form: BatchNorms folded into the convolutions
(:mod:`ssn_deploy.models.fold`) and, on the CPU, activations in channels-last order, where
oneDNN's 3D convolutions are fastest. One fp32 checkpoint serves every precision: bf16 on the
CPU casts the folded weights once at load, otherwise (CUDA, or a model with norms left) reduced
precision runs under autocast. On a CPU with AVX512-BF16, bf16 in this form ran the packaged
model 2.17× faster than onnxruntime fp32 (``python benchmarks/backends.py``) and is
``--precision auto``'s choice there.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ssn_deploy.errors import ConfigError, InvalidInputError
from ssn_deploy.inference.predictor import ModelSpec, SpecGeometry
from ssn_deploy.models.fold import fold_batch_norms

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
UNFOLDED_NORMS = (nn.BatchNorm3d, nn.GroupNorm, nn.InstanceNorm3d)
"""Norms that keep fp32 statistics under autocast; a model with any left stays fp32-weighted."""
log = logging.getLogger(__name__)


def cpu_has_fast_bf16() -> bool:
    """Whether oneDNN has native bf16 kernels on this CPU (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # private API: assume yes rather than warn wrongly
        return True


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but torch sees no CUDA GPU; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {name!r}")
    return device


class TorchPredictor(SpecGeometry):
    """Eval-mode ``model`` under ``torch.inference_mode`` and optional autocast.

    ``threads`` sets torch's intra-op threads, which is process-wide: give each of k
    concurrent dask threads ``cores / k``. ``compile=True`` wraps the model in
    ``torch.compile`` (compiles on the first batch of each shape).
    """

    def __init__(
        self,
        model: nn.Module,
        spec: ModelSpec,
        *,
        device: str = "cpu",
        precision: str = "fp32",
        compile: bool = False,
        threads: int | None = None,
        name: str = "in-memory",
    ) -> None:
        if precision not in PRECISIONS:
            raise ConfigError(f"precision: expected one of {sorted(PRECISIONS)}, got {precision!r}")
        if threads is not None:
            if threads < 1:
                raise ConfigError(f"threads must be >= 1, got {threads}")
            torch.set_num_threads(threads)
        self.spec = spec
        self.device = _device(device)
        self.precision = precision
        if precision == "bf16" and self.device.type == "cpu" and not cpu_has_fast_bf16():
            log.warning(
                "this CPU has no native bf16 (AVX512-BF16/AMX): bf16 is emulated and much slower "
                "than fp32 here; use --precision fp32 or the onnxruntime backend"
            )
        self._model, folded = fold_batch_norms(model)
        self._model.to(self.device)
        # oneDNN's 3D convolutions are fastest on channels-last activations (NDHWC); measured on
        # the CPU only (benchmarks/backends.py), so CUDA keeps the default layout.
        self._layout = torch.channels_last_3d if self.device.type == "cpu" else None
        if self._layout is not None:
            self._model.to(memory_format=self._layout)
        # With every norm folded the whole model can hold bf16 weights on the CPU: no per-call
        # weight casts or autocast dispatch, the same output. Otherwise (and on CUDA) autocast,
        # which keeps the remaining norms' statistics in fp32.
        dtype = PRECISIONS[precision]
        self._weights_dtype = None
        if dtype is torch.bfloat16 and self.device.type == "cpu":
            if not any(isinstance(m, UNFOLDED_NORMS) for m in self._model.modules()):
                self._weights_dtype = dtype
                self._model.to(dtype)
        self._forward = torch.compile(self._model) if compile else self._model
        self._provenance = {
            "model": name,
            "backend": "torch",
            "device": str(self.device),
            "precision": precision,
            "compile": compile,
            "batch_norms_folded": folded,
            "layout": "channels_last_3d" if self._layout is not None else "contiguous",
            "weights": str(self._weights_dtype or torch.float32).removeprefix("torch."),
            "torch": torch.__version__,
        }

    @classmethod
    def from_checkpoint(cls, path: str | Path, **options: Any) -> TorchPredictor:
        from ssn_deploy.models.checkpoint import load_checkpoint

        checkpoint = load_checkpoint(path)
        spec = ModelSpec.from_checkpoint(checkpoint)
        return cls(checkpoint.model, spec, name=str(path), **options)

    @property
    def provenance(self) -> dict[str, Any]:
        return dict(self._provenance)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        self.check_batch(batch)
        dtype = PRECISIONS[self.precision]
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device)
        if self._weights_dtype is not None:
            x, dtype = x.to(self._weights_dtype), None  # the weights carry the precision
        if self._layout is not None:
            x = x.contiguous(memory_format=self._layout)
        with (
            torch.inference_mode(),
            torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None),
        ):
            y = self._forward(x)
        out = y.float().contiguous().cpu().numpy()
        if out.shape[1] != self.num_channels or out.shape[2:] != batch.shape[2:]:
            raise InvalidInputError(
                f"model {self._provenance['model']} returned {out.shape} for input "
                f"{batch.shape}; expected {self.num_channels} channels, same Z,Y,X"
            )
        return out
