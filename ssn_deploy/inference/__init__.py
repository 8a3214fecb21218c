"""Predictors (torch, onnxruntime) and the blockwise dask engine that writes affinities.

The names below are imported on first use: ``segment``, ``evaluate`` and dask workers that only
post-process import :mod:`ssn_deploy.inference.scheduling` or ``.done`` through this package,
and importing the predictors here would load torch (~1 s) into each of them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ssn_deploy.inference.blend import PatchGrid
    from ssn_deploy.inference.block import predict_block
    from ssn_deploy.inference.engine import predict_affinities
    from ssn_deploy.inference.loader import load_predictor
    from ssn_deploy.inference.predictor import ModelSpec, Predictor

_MODULES = {
    "ModelSpec": "predictor",
    "PatchGrid": "blend",
    "Predictor": "predictor",
    "load_predictor": "loader",
    "predict_affinities": "engine",
    "predict_block": "block",
}

__all__ = [
    "ModelSpec",
    "PatchGrid",
    "Predictor",
    "load_predictor",
    "predict_affinities",
    "predict_block",
]


def __getattr__(name: str) -> Any:
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULES[name]}"), name)
