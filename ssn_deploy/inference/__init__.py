"""Predictors (torch, onnxruntime) and the blockwise dask engine that writes affinities."""

from ssn_deploy.inference.blend import PatchGrid
from ssn_deploy.inference.block import predict_block
from ssn_deploy.inference.engine import predict_affinities
from ssn_deploy.inference.loader import load_predictor
from ssn_deploy.inference.predictor import ModelSpec, Predictor

__all__ = [
    "ModelSpec",
    "PatchGrid",
    "Predictor",
    "load_predictor",
    "predict_affinities",
    "predict_block",
]
