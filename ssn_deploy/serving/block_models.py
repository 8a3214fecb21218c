"""Triton python-backend models for one block: ``agglomerate`` and ``segment``.

``agglomerate``  affinities FP32 [C, Z, Y, X] (+ optional threshold FP32 [1]) → segmentation
                 UINT64 [Z, Y, X]: fragments and hierarchical agglomeration, exactly
                 :func:`ssn_deploy.agglomeration.segment_affinities` with the repository's
                 offsets and fragment mode
``segment``      raw UINT8 [Z, Y, X] (+ optional threshold) → segmentation (and affinities
                 FP32 [C, Z, Y, X]): the raw block is normalised as the model asks, sent to the
                 affinity model through Triton (business logic scripting, so it runs on
                 whatever the repository serves it with) and agglomerated as above

The repository's ``model.py`` files import these classes, so they run in the server's
environment (numpy<2), where ssn-deploy is installed without its dependencies: only numpy and
:mod:`ssn_deploy.agglomeration` are imported here (no torch, zarr or dask). Settings come from
the ``config.pbtxt`` parameters; the pure functions below parse and check them, and are tested
without a server. One block is one request: blocks are not batched (``max_batch_size: 0``), and
their size is bounded by the repository (``ssn_deploy.max_block``, ``ssn_deploy.max_patch``) so
one request cannot exhaust the server.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported outside Triton (tests of the pure functions)
    pb_utils = None

PREFIX = "ssn_deploy."
AFFINITIES = "affinities"
SEGMENTATION = "segmentation"
RAW = "raw"
THRESHOLD = "threshold"


@dataclass(frozen=True)
class BlockSettings:
    """What both models read from their parameters."""

    offsets: tuple[tuple[int, int, int], ...]
    threshold: float
    """The default, used when a request carries none."""
    anisotropic: bool
    max_block: tuple[int, int, int]


def parameters(config: Mapping[str, Any]) -> dict[str, str]:
    """The ``parameters`` of a model config (as Triton passes it: JSON) as plain strings."""
    return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


def block_settings(params: Mapping[str, str], max_key: str = "max_block") -> BlockSettings:
    """Offsets, default threshold, fragment mode and size limit from the parameters."""
    threshold = json.loads(params.get(PREFIX + "threshold", "null"))
    return BlockSettings(
        offsets=tuple(tuple(int(v) for v in o) for o in json.loads(params[PREFIX + "offsets"])),  # type: ignore[misc]
        threshold=0.5 if threshold is None else float(threshold),
        anisotropic=json.loads(params.get(PREFIX + "anisotropic", "false")),
        max_block=tuple(int(v) for v in json.loads(params[PREFIX + max_key])),  # type: ignore[arg-type]
    )


def check_threshold(value: np.ndarray | None, default: float) -> tuple[float | None, str | None]:
    """The request's threshold (FP32 [1], in [0, 1]) or the default; or why it is refused."""
    if value is None:
        return default, None
    if value.dtype != np.float32 or value.size != 1:
        return None, f"threshold must be FP32 [1], got {value.dtype} {list(value.shape)}"
    threshold = float(value.reshape(-1)[0])
    if not (math.isfinite(threshold) and 0.0 <= threshold <= 1.0):
        return None, f"threshold must be in [0, 1], got {threshold}"
    return threshold, None


def check_block(
    shape: Sequence[int],
    max_block: Sequence[int],
    granularity: Sequence[int] | None = None,
) -> str | None:
    """Why a Z,Y,X block cannot be served (empty, too large, off the model's granularity)."""
    zyx = list(shape)
    if len(zyx) != 3 or any(s <= 0 for s in zyx):
        return f"the block must be Z x Y x X with positive sizes, got {zyx}"
    if granularity is not None and any(s % g for s, g in zip(zyx, granularity, strict=True)):
        return f"block Z,Y,X {zyx} must be multiples of the model's granularity {list(granularity)}"
    if any(s > m for s, m in zip(zyx, max_block, strict=True)):
        return f"block Z,Y,X {zyx} exceeds this repository's maximum {list(max_block)}"
    return None


def check_affinities(dtype: np.dtype, shape: Sequence[int], settings: BlockSettings) -> str | None:
    """Why an affinity block cannot be agglomerated, or None."""
    channels = len(settings.offsets)
    if dtype != np.float32:
        return f"affinities must be FP32, got {dtype}"
    if len(shape) != 4 or shape[0] != channels:
        return f"affinities must be {channels} x Z x Y x X, got shape {list(shape)}"
    return check_block(shape[1:], settings.max_block)


def normalize(raw: np.ndarray, normalization: Mapping[str, Any]) -> np.ndarray:
    """uint8 raw → the model's input: the arithmetic of
    :class:`ssn_deploy.models.Normalization` (not imported: that package needs torch)."""
    x = np.asarray(raw, dtype=np.float32) / np.float32(255.0)
    mean, std = np.float32(normalization["mean"]), np.float32(normalization["std"])
    return ((x - mean) / std).astype(np.float32, copy=False)


def segment_block(affs: np.ndarray, threshold: float, settings: BlockSettings) -> np.ndarray:
    """The library's segmentation of one block (uint64, ids from 1)."""
    from ssn_deploy.agglomeration import segment_affinities

    seg = segment_affinities(
        affs, threshold, offsets=settings.offsets, anisotropic=settings.anisotropic
    )
    return np.ascontiguousarray(seg, dtype=np.uint64)  # type: ignore[arg-type]


# --- inside Triton


def _error(message: str) -> Any:
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)


def _input(request: Any, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


class AgglomerateModel:
    """``agglomerate``: affinities of one block → its segmentation."""

    def initialize(self, args: dict[str, str]) -> None:
        self.settings = block_settings(parameters(json.loads(args["model_config"])))

    def execute(self, requests: list[Any]) -> list[Any]:
        return [self._one(request) for request in requests]

    def _one(self, request: Any) -> Any:
        affs = _input(request, AFFINITIES)
        if affs is None:
            return _error(f"the request has no input named {AFFINITIES!r}")
        problem = check_affinities(affs.dtype, affs.shape, self.settings)
        threshold, why = check_threshold(_input(request, THRESHOLD), self.settings.threshold)
        if problem or why:
            return _error(problem or why)  # type: ignore[arg-type]
        seg = segment_block(affs, threshold, self.settings)  # type: ignore[arg-type]
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(SEGMENTATION, seg)])

    def finalize(self) -> None:
        pass


class SegmentModel:
    """``segment``: a raw block → affinities (through the affinity model) → segmentation."""

    def initialize(self, args: dict[str, str]) -> None:
        params = parameters(json.loads(args["model_config"]))
        self.settings = block_settings(params, "max_patch")
        self.granularity = json.loads(params[PREFIX + "granularity"])
        self.normalization = json.loads(params[PREFIX + "normalization"])
        self.affinity_model = params[PREFIX + "affinity_model"]
        self.affinity_input = params[PREFIX + "affinity_input"]
        self.affinity_output = params[PREFIX + "affinity_output"]

    def execute(self, requests: list[Any]) -> list[Any]:
        return [self._one(request) for request in requests]

    def _affinities(self, raw: np.ndarray) -> tuple[np.ndarray | None, str | None]:
        """The affinity model's answer for the normalised block, through Triton."""
        x = normalize(raw, self.normalization)[None, None]
        request = pb_utils.InferenceRequest(
            model_name=self.affinity_model,
            requested_output_names=[self.affinity_output],
            inputs=[pb_utils.Tensor(self.affinity_input, np.ascontiguousarray(x))],
        )
        response = request.exec()
        if response.has_error():
            return None, f"{self.affinity_model}: {response.error().message()}"
        out = pb_utils.get_output_tensor_by_name(response, self.affinity_output)
        return np.ascontiguousarray(out.as_numpy()[0], dtype=np.float32), None

    def _one(self, request: Any) -> Any:
        raw = _input(request, RAW)
        if raw is None:
            return _error(f"the request has no input named {RAW!r}")
        if raw.dtype != np.uint8:
            return _error(f"raw must be UINT8, got {raw.dtype}")
        problem = check_block(raw.shape, self.settings.max_block, self.granularity)
        threshold, why = check_threshold(_input(request, THRESHOLD), self.settings.threshold)
        if problem or why:
            return _error(problem or why)  # type: ignore[arg-type]
        affs, failed = self._affinities(raw)
        if failed:
            return _error(failed)
        seg = segment_block(affs, threshold, self.settings)  # type: ignore[arg-type]
        tensors = [pb_utils.Tensor(SEGMENTATION, seg), pb_utils.Tensor(AFFINITIES, affs)]
        wanted = set(request.requested_output_names())
        return pb_utils.InferenceResponse(
            output_tensors=[t for t in tensors if not wanted or t.name() in wanted]
        )

    def finalize(self) -> None:
        pass
