"""The bundled demo volume: a CC BY 3.0 crop of the ``fib_medulla_250`` test region.

``write_sample`` turns the packaged arrays into OME-Zarr stores that every command reads, so
the README's main job runs end to end on a fresh machine without downloads.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np

from ssn_deploy import __version__
from ssn_deploy.volumes import Volume, create_volume

SAMPLE_FILE = "fib_medulla_250_crop.npz"
ATTRIBUTION = (
    "FlyEM NeuroProof examples training_sample2 (HHMI Janelia), CC BY 3.0; "
    "cropped z 150:230, y 45:205, x 45:205"
)


def load_sample() -> dict[str, np.ndarray]:
    """The packaged arrays: ``raw`` uint8, ``labels`` uint64, ``offset_voxels``, ``voxel_size``."""
    with resources.files("ssn_deploy.assets.sample").joinpath(SAMPLE_FILE).open("rb") as fh:
        with np.load(fh) as npz:
            arrays = {key: npz[key] for key in npz.files}
    arrays["labels"] = arrays["labels"].astype(np.uint64)
    return arrays


def write_sample(directory: str | Path, *, overwrite: bool = False) -> dict[str, Volume]:
    """Write ``raw.zarr`` and ``labels.zarr`` (OME-Zarr v3) into ``directory``; returns both."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = load_sample()
    voxel_size = tuple(float(v) for v in arrays["voxel_size"])
    offset = tuple(float(o * v) for o, v in zip(arrays["offset_voxels"], voxel_size, strict=True))
    attrs = {"source": ATTRIBUTION, "license": "CC-BY-3.0", "ssn_deploy_version": __version__}
    written = {}
    for name in ("raw", "labels"):
        data = arrays[name]
        vol = create_volume(
            str(directory / f"{name}.zarr"),
            data.shape,
            data.dtype,
            voxel_size=voxel_size,
            offset=offset,
            overwrite=overwrite,
            attrs=attrs,
        )
        vol[...] = data
        written[name] = vol
    return written
