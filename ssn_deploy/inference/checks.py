"""Input checks done before a single block is submitted, so a wrong input costs seconds."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from ssn_deploy.errors import InvalidInputError, VoxelSizeError
from ssn_deploy.geometry import Box, anisotropy
from ssn_deploy.inference.loader import choose_packaged
from ssn_deploy.volumes import Volume, require_volume, resolved_spec

log = logging.getLogger(__name__)

RAW_DTYPES = (np.uint8, np.float16, np.float32, np.float64)
SAMPLED_CHUNKS = 8


def describe(box: Box) -> str:
    """``[z0:z1, y0:y1, x0:x1]``, for messages."""
    return "[" + ", ".join(f"{b}:{e}" for b, e in zip(box.begin, box.end, strict=True)) + "]"


def sample_chunks(volume: Volume, count: int = SAMPLED_CHUNKS) -> list[Box]:
    """Up to ``count`` storage chunks spread evenly over the volume (first and last included)."""
    shape, chunks = volume.shape[-3:], volume.chunks[-3:]
    grid = tuple(-(-s // c) for s, c in zip(shape, chunks, strict=True))
    n = int(np.prod(grid))
    picks = np.unique(np.linspace(0, n - 1, min(count, n)).round().astype(np.int64))
    total = Box.from_shape(shape)
    return [
        Box(tuple(int(i) * c for i, c in zip(index, chunks, strict=True)), chunks).intersect(total)
        for index in zip(*np.unravel_index(picks, grid), strict=True)
    ]


def input_identity(volume: Volume) -> dict[str, Any]:
    """What a resumed run must read again: the resolved location, shape, voxel size and a
    fingerprint (SHA-1) of the sampled chunks' bytes, so that a different volume (or one
    edited in place) is refused instead of finishing half of each."""
    digest = hashlib.sha1(usedforsecurity=False)
    for box in sample_chunks(volume):
        digest.update(np.ascontiguousarray(volume[box]).tobytes())
    return {
        "location": resolved_spec(volume.spec),
        "shape": [int(n) for n in volume.shape],
        "voxel_size": [float(v) for v in volume.voxel_size] if volume.voxel_size else None,
        "fingerprint": digest.hexdigest(),
    }


def format_nm(voxel_size: Sequence[float]) -> str:
    """``50×10×10 nm``, for messages."""
    return "×".join(f"{v:g}" for v in voxel_size) + " nm"


def voxel_size_advice(
    spec: str, voxel_size: tuple[float, ...], model_voxel_size: tuple[float, ...] | None
) -> str | None:
    """One line saying what to do when a volume's voxel size does not fit the model's, or None.

    Within 25 % on every axis is a fit. A different *anisotropy* (section thickness over pixel
    size, off by more than 2×) matters most: an isotropic model on serial sections sees
    membranes that jump between sections, and vice versa. The advice names a better packaged
    model where there is one, else resampling or training at this voxel size.
    """
    if model_voxel_size is None or np.allclose(voxel_size, model_voxel_size, rtol=0.25):
        return None
    shape = anisotropy(voxel_size) / anisotropy(model_voxel_size)
    nearest = choose_packaged(voxel_size)
    if not np.allclose(nearest.voxel_size, model_voxel_size, rtol=0.25):
        todo = f"--model default picks the packaged '{nearest.name}' model for this voxel size"
    else:
        todo = (
            f"no packaged model fits better: resample the volume to about "
            f"{format_nm(model_voxel_size)}, or train a model at this voxel size"
        )
    fix = "if the volume's metadata is wrong, pass --voxel-size Z,Y,X"
    how_bad = (
        f"expect poor results (anisotropy {anisotropy(voxel_size):.1f} vs "
        f"{anisotropy(model_voxel_size):.1f})"
        if not 0.5 <= shape <= 2
        else "expect worse results"
    )
    return (
        f"{spec} is {format_nm(voxel_size)} but the model was trained at "
        f"{format_nm(model_voxel_size)}: {how_bad}; {todo}; {fix}"
    )


def check_raw(volume: Volume, model_voxel_size: tuple[float, ...] | None) -> None:
    """3D, uint8 or float in [0, 1] (sampled), finite, with a voxel size.

    A model voxel size that differs from the volume's is only warned about
    (:func:`voxel_size_advice`): users may mean it (e.g. an 8 nm model on 10 nm data).
    """
    try:
        require_volume(volume, ndim=3, dtypes=RAW_DTYPES)
    except InvalidInputError as exc:
        raise InvalidInputError(
            f"{exc}; raw must be a 3D z,y,x volume of uint8 (or float in [0, 1])"
        ) from None
    if volume.voxel_size is None:
        raise VoxelSizeError(f"{volume.spec} has no voxel size; pass --voxel-size Z,Y,X (nm)")
    advice = voxel_size_advice(volume.spec, volume.voxel_size, model_voxel_size)
    if advice:
        log.warning("%s", advice)
    if volume.dtype == np.uint8:
        return
    for box in sample_chunks(volume):
        data = volume[box]
        if not np.isfinite(data).all():
            raise InvalidInputError(
                f"{volume.spec}: NaN or infinite values in voxels {describe(box)}"
            )
        lo, hi = float(data.min()), float(data.max())
        if lo < 0 or hi > 1:
            raise InvalidInputError(
                f"{volume.spec}: float raw must lie in [0, 1], found [{lo:g}, {hi:g}] in "
                f"voxels {describe(box)}; rescale it or convert to uint8"
            )
