"""The affinity U-Net and its encoder, a registry by name, checkpoint I/O.

Names are imported on first use: predictors for ONNX Runtime, Triton or TensorRT, ``segment``
and ``evaluate`` need :mod:`.spec` and :mod:`.normalization` only, and importing the network
here would load torch (~1.6 s of every such command's start).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ssn_deploy.models.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
    from ssn_deploy.models.normalization import Normalization
    from ssn_deploy.models.registry import build_model
    from ssn_deploy.models.unet import Encoder, ModelConfig, UNet3d

_MODULES = {
    "Checkpoint": "checkpoint",
    "Encoder": "unet",
    "ModelConfig": "unet",
    "Normalization": "normalization",
    "UNet3d": "unet",
    "build_model": "registry",
    "load_checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint",
}

__all__ = [
    "Checkpoint",
    "Encoder",
    "ModelConfig",
    "Normalization",
    "UNet3d",
    "build_model",
    "load_checkpoint",
    "save_checkpoint",
]


def __getattr__(name: str) -> Any:
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULES[name]}"), name)
