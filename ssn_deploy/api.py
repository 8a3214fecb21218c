"""The Python API: ``ssn_deploy.infer``, ``ssn_deploy.segment``, ``ssn_deploy.evaluate``.

Each accepts what a notebook holds — a volume spec (path, ``FILE:DATASET``, URL), a numpy array
or a dask array — and runs the very code the CLI runs. Arrays are staged in a temporary zarr
store (dask arrays chunk by chunk, never whole in memory) so results equal the CLI's for the
same settings; with ``out=None`` the results come back as numpy arrays and the staging is
removed, with ``out=PATH.zarr`` they stay on disk and the paths come back.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ssn_deploy.errors import InvalidInputError, VoxelSizeError
from ssn_deploy.volumes import Volume, create_volume, open_volume

ArrayLike = Any  # numpy.ndarray | dask.array.Array


def _is_array(value: Any) -> bool:
    return isinstance(value, np.ndarray) or type(value).__module__.startswith("dask.")


def _stage(array: ArrayLike, path: str, voxel_size: Sequence[float] | None) -> str:
    """Write ``array`` (z,y,x or c,z,y,x) to a zarr store at ``path``; returns its spec."""
    if voxel_size is None:
        raise VoxelSizeError("an array carries no voxel size: pass voxel_size=(z, y, x) in nm")
    if array.ndim not in (3, 4):
        raise InvalidInputError(f"expected a z,y,x (or c,z,y,x) array, got shape {array.shape}")
    vol = create_volume(path, array.shape, array.dtype, voxel_size=voxel_size)
    if isinstance(array, np.ndarray):
        vol[...] = array
    else:  # dask: one storage chunk per task, so no two tasks write one chunk
        import dask.array as da

        da.store(array.rechunk(vol.chunks), _Writer(vol), lock=False)
    return path


class _Writer:
    """A ``__setitem__`` target for ``dask.array.store``."""

    def __init__(self, volume: Volume) -> None:
        self.volume = volume

    def __setitem__(self, key: tuple, value: np.ndarray) -> None:
        self.volume[key] = value


def infer(
    volume: str | ArrayLike,
    out: str | None = None,
    *,
    voxel_size: Sequence[float] | None = None,
    model: str = "default",
    **options: Any,
) -> dict[str, Any]:
    """Affinities, fragments and a segmentation of ``volume`` (see ``ssn-deploy infer``).

    ``options`` are those of :func:`ssn_deploy.pipeline.infer` (``threshold``, ``backend``,
    ``block_shape``, ``tta``, ...). With ``out=None`` the result holds numpy arrays
    ``affinities`` (float32 C×Z×Y×X), ``fragments`` and ``segmentation`` (uint64); otherwise
    the output specs, as the CLI writes them.
    """
    from ssn_deploy.pipeline import infer as run_infer

    options.setdefault("progress", False)
    options.setdefault("preview", out is not None)
    with tempfile.TemporaryDirectory(prefix="ssn-deploy-") as tmp:
        spec = _stage(volume, f"{tmp}/raw.zarr", voxel_size) if _is_array(volume) else volume
        target = out or f"{tmp}/out.zarr"
        result = run_infer(
            spec,
            target,
            model=model,
            voxel_size=voxel_size if not _is_array(volume) else None,
            **options,
        )
        if out is not None:
            return result
        return result | _read_outputs(result)


def _read_outputs(result: dict[str, Any]) -> dict[str, Any]:
    from ssn_deploy.agglomeration.blockwise import read_affinities
    from ssn_deploy.geometry import Box

    affs = open_volume(result["affinities"])
    return {
        "affinities": read_affinities(affs, Box.from_shape(affs.shape[1:])),
        "fragments": np.asarray(open_volume(result["fragments"])[...]),
        "segmentation": np.asarray(open_volume(result["segmentation"])[...]),
    }


def segment(
    affinities: str | ArrayLike,
    out: str | None = None,
    *,
    voxel_size: Sequence[float] | None = None,
    offsets: Sequence[Sequence[int]] = ((-1, 0, 0), (0, -1, 0), (0, 0, -1)),
    threshold: float | None = None,
    block_shape: Sequence[int] | None = None,
    fragment_tile: Sequence[int] | None = None,
    anisotropic: bool | None = None,
    agglomeration: str | None = None,
    **options: Any,
) -> np.ndarray | dict[str, Any]:
    """Fragments and agglomeration of stored or in-memory affinities (``ssn-deploy segment``).

    Settings not given come from the affinities' provenance (infer's), else from the voxel
    size. Arrays are float affinities in [0, 1], C×Z×Y×X with ``offsets``. Returns the uint64
    segmentation (``out=None``) or the output specs.
    """
    from ssn_deploy.agglomeration.blockwise import segment_blockwise
    from ssn_deploy.outputs import stage_specs
    from ssn_deploy.pipeline import segmentation_settings

    options.setdefault("progress", False)
    with tempfile.TemporaryDirectory(prefix="ssn-deploy-") as tmp:
        if _is_array(affinities):
            if affinities.ndim != 4 or affinities.shape[0] != len(offsets):
                raise InvalidInputError(
                    f"affinities must be C×Z×Y×X with C = {len(offsets)}, got {affinities.shape}"
                )
            spec = _stage(affinities.astype(np.float32), f"{tmp}/affinities.zarr", voxel_size)
            vol = open_volume(spec, "r+")
            vol.attrs["ssn_deploy"] = {"offsets": [list(o) for o in offsets], "scale": 1.0}
        else:
            spec = affinities
        affs = open_volume(spec)
        settings = segmentation_settings(
            affs, threshold=threshold, block_shape=block_shape, fragment_tile=fragment_tile,
            anisotropic=anisotropic, agglomeration=agglomeration,
        )  # fmt: skip
        target = out or f"{tmp}/out.zarr"
        specs = stage_specs(target)
        seg, _ = segment_blockwise(
            affs, specs["fragments"], specs["segmentation"],
            threshold=settings["threshold"], block_shape=settings["block_shape"],
            fragment_tile=settings["fragment_tile"], anisotropic=settings["anisotropic"],
            superblocks=settings["agglomeration"] == "superblocks", **options,
        )  # fmt: skip
        if out is not None:
            return {"fragments": specs["fragments"], "segmentation": seg.spec, **settings}
        return np.asarray(seg[...])


def evaluate(
    segmentation: str | ArrayLike,
    ground_truth: str | ArrayLike,
    *,
    ignore_ids: Sequence[int] = (),
    voxel_size: Sequence[float] | None = None,
) -> dict[str, Any]:
    """VOI split/merge, adapted Rand error, CREMI score (see ``ssn-deploy evaluate``)."""
    from ssn_deploy.metrics import evaluate as score

    def load(value: str | ArrayLike) -> Any:
        if isinstance(value, str | Path):
            return open_volume(str(value), voxel_size=voxel_size)
        return np.asarray(value)

    return score(load(segmentation), load(ground_truth), ignore_ids=ignore_ids)
