"""Neuroglancer precomputed copies of a volume, for labs whose viewers and proofreading tools
read that format rather than OME-Zarr. Written by tensorstore (a core dependency), z-slab by
z-slab so memory stays one slab; segmentations use ``compressed_segmentation`` encoding,
images raw. Axes become x, y, z, channel, as the format wants."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ssn_deploy.errors import InvalidInputError, OutputExistsError
from ssn_deploy.volumes import open_volume

CHUNK = (64, 64, 64)
"""Chunk x, y, z of the written scale (the size neuroglancer fetches)."""


def export_precomputed(
    source: str,
    destination: str,
    *,
    layer_type: str = "auto",
    overwrite: bool = False,
    slab: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Write ``source`` (3D labels or image, or C×Z×Y×X) as a precomputed volume at
    ``destination`` (a folder, or a ``gs://``/``s3://`` URL tensorstore can write);
    ``layer_type`` auto picks segmentation for integer dtypes wider than a byte."""
    import tensorstore as ts

    volume = open_volume(source)
    if volume.ndim not in (3, 4):
        raise InvalidInputError(f"{source}: expected Z×Y×X or C×Z×Y×X, got {volume.shape}")
    dtype = np.dtype(volume.dtype)
    if layer_type == "auto":
        layer_type = "segmentation" if dtype.kind in "ui" and dtype.itemsize > 1 else "image"
    if layer_type not in ("image", "segmentation"):
        raise InvalidInputError(f"layer type must be image or segmentation, got {layer_type!r}")
    if layer_type == "segmentation" and (volume.ndim != 3 or dtype.kind not in "ui"):
        raise InvalidInputError(f"{source}: a segmentation must be 3D integer, got {dtype}")
    out_dtype = np.dtype(np.uint64 if layer_type == "segmentation" else dtype)
    channels = volume.shape[0] if volume.ndim == 4 else 1
    z, y, x = volume.shape[-3:]
    voxel = [float(v) for v in (volume.voxel_size or (1.0, 1.0, 1.0))]
    offset = [float(o) for o in (volume.offset or (0.0, 0.0, 0.0))]
    scale: dict[str, Any] = {
        "resolution": voxel[::-1],
        "size": [x, y, z],
        "voxel_offset": [round(o / v) for o, v in zip(offset[::-1], voxel[::-1], strict=True)],
        "chunk_size": list(CHUNK),
        "encoding": "raw",
    }
    if layer_type == "segmentation":
        scale |= {"encoding": "compressed_segmentation",
                  "compressed_segmentation_block_size": [8, 8, 8]}  # fmt: skip
    kvstore = destination if "://" in destination else {"driver": "file", "path": destination}
    try:
        existing = ts.open({"driver": "neuroglancer_precomputed", "kvstore": kvstore}).result()
    except ValueError:
        existing = None
    if existing is not None and not overwrite:
        raise OutputExistsError(f"{destination} holds a precomputed volume; pass --overwrite")
    store = ts.open(
        {
            "driver": "neuroglancer_precomputed",
            "kvstore": kvstore,
            "multiscale_metadata": {
                "type": layer_type,
                "data_type": out_dtype.name,
                "num_channels": channels,
            },
            "scale_metadata": scale,
        },
        create=True,
        delete_existing=True,
    ).result()
    base = store.domain.inclusive_min
    for z0 in range(0, z, slab):
        z1 = min(z, z0 + slab)
        data = np.asarray(volume[..., z0:z1, :, :]).astype(out_dtype, copy=False)
        data = data[None] if data.ndim == 3 else data
        target = store[base[0] : base[0] + x, base[1] : base[1] + y, base[2] + z0 : base[2] + z1]
        target.write(np.transpose(data, (3, 2, 1, 0))).result()
        if progress is not None:
            progress(z1, z)
    return {"destination": destination, "type": layer_type, "size": [x, y, z],
            "resolution": voxel[::-1], "channels": channels}  # fmt: skip
