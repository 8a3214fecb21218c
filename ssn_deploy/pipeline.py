"""``ssn-deploy infer``: raw volume → affinities → fragments → segmentation (+ a PNG preview).

One output group ``OUT.zarr`` holds ``affinities`` (C×Z×Y×X), ``fragments`` and
``segmentation`` (uint64), each with its own finished-block markers, so ``resume`` continues
whichever stage a killed run was in. Geometry defaults come from the model and the voxel size
(see :func:`default_geometry`); everything runs through the same dask engine, locally or on a
cluster.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ssn_deploy.agglomeration.blockwise import segment_blockwise
from ssn_deploy.errors import ConfigError, OutputExistsError
from ssn_deploy.inference.engine import cached_predictor, predict_affinities
from ssn_deploy.inference.loader import load_predictor
from ssn_deploy.inference.predictor import Predictor
from ssn_deploy.preview import write_preview
from ssn_deploy.volumes import Volume, open_volume

log = logging.getLogger(__name__)

Triple = tuple[int, int, int]
DEFAULT_THRESHOLD = 0.5


@dataclass(frozen=True)
class Geometry:
    """Block, fragment-tile and patch shapes of one run (voxels, z,y,x)."""

    block_shape: Triple
    fragment_tile: Triple
    patch_shape: Triple
    margin: Triple
    overlap: Triple


def _round_up(value: float, multiple: int) -> int:
    return max(multiple, int(-(-value // multiple) * multiple))


def _axis_geometry(extent: float, g: int, context: int, block_nominal: float) -> tuple[int, ...]:
    """Patch, margin, stride, block and tile along one axis (see :func:`default_geometry`)."""
    patch = _round_up(extent, g)
    half = g // 2 if g % 2 == 0 else g  # 2·margin must be a multiple of g
    margin = min(context, max(half, patch // 8 // half * half))
    stride = patch - 2 * margin
    block = stride * max(1, round(block_nominal / stride))
    tile = block // 2 if block % 2 == 0 else block
    return patch, margin, block, tile


def default_geometry(
    predictor: Predictor,
    voxel_size: Sequence[float] | None,
    patch_shape: Sequence[int] | None = None,
) -> Geometry:
    """Shapes that cover about the same distance in nm on every axis, with no wasted patches.

    Patches span 160 voxels of the finest axis (rounded up to the model's granularity). Their
    margin, where outputs saw the patch's padding and are dropped, is about an eighth of the
    patch (capped by the model's context) and chosen so that cores are a multiple of the
    granularity: cores then tile the volume without overlap. Blocks (~128 × 256 × 256
    finest-axis voxels) are a multiple of the core, so no patch straddles two blocks, and hold
    two fragment tiles per axis. Cores sit on a global lattice, so results never depend on
    the blocks. A given ``patch_shape`` replaces the 160-voxel default.
    """
    vs = np.asarray(voxel_size if voxel_size is not None else (1.0, 1.0, 1.0), dtype=float)
    vs = vs / vs.min()  # in units of the finest axis, which gets the nominal voxel counts
    axes = [
        _axis_geometry(160 / v, g, c, n / v)
        for v, g, c, n in zip(
            vs, predictor.granularity, predictor.context, (128, 256, 256), strict=True
        )
    ]
    patch, margin, block, tile = (tuple(values) for values in zip(*axes, strict=True))
    return Geometry(block, tile, patch, margin, (0, 0, 0))  # type: ignore[arg-type]


def _stage_specs(out: str) -> dict[str, str]:
    return {name: f"{out}/{name}" for name in ("affinities", "fragments", "segmentation")}


def preview_path(out: str) -> Path:
    """``seg.zarr`` → ``seg.preview.png`` beside it."""
    return Path(out.removesuffix("/").removesuffix(".zarr") + ".preview.png")


def _refuse_existing(out: str, resume: bool, overwrite: bool) -> None:
    if resume and overwrite:
        raise ConfigError("--resume continues an output and --overwrite replaces it: pick one")
    if os.path.exists(out) and not (resume or overwrite):
        raise OutputExistsError(
            f"{out} already exists; pass --resume to continue it or --overwrite to replace it"
        )


def infer(
    volume: str,
    out: str,
    *,
    model: str = "default",
    backend: str = "torch",
    device: str = "cpu",
    precision: str = "fp32",
    threshold: float | None = None,
    block_shape: Sequence[int] | None = None,
    patch_shape: Sequence[int] | None = None,
    fragment_tile: Sequence[int] | None = None,
    scheduler: Any = None,
    workers: int = 1,
    threads: int | None = None,
    compile: bool = False,
    batch_size: int = 1,
    voxel_size: Sequence[float] | None = None,
    affinity_dtype: str = "uint8",
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    preview: bool = True,
) -> dict[str, Any]:
    """Run the whole pipeline; returns the output specs, geometry and stage timings."""
    _refuse_existing(out, resume, overwrite)
    raw: Volume = open_volume(volume, voxel_size=voxel_size)
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    factory = functools.partial(
        load_predictor,
        model,
        backend,
        device=device,
        precision=precision,
        compile=compile,
        threads=threads,
    )
    predictor = cached_predictor(factory)
    if threshold is None:  # the model's own, chosen on its validation data
        threshold = model_threshold(predictor)
    geometry = default_geometry(predictor, raw.voxel_size, patch_shape)
    if fragment_tile is not None:
        geometry = replace(geometry, fragment_tile=tuple(int(v) for v in fragment_tile))
    if block_shape is not None:
        geometry = replace(geometry, block_shape=tuple(int(v) for v in block_shape))
    log.info("geometry: %s", geometry)
    specs = _stage_specs(out)
    timings = {}
    start = time.perf_counter()
    affs = predict_affinities(
        raw,
        specs["affinities"],
        factory,
        block_shape=geometry.block_shape,
        patch_shape=geometry.patch_shape,
        margin=geometry.margin,
        overlap=geometry.overlap,
        batch_size=batch_size,
        scheduler=scheduler,
        workers=workers,
        resume=resume,
        overwrite=overwrite,
        out_dtype=affinity_dtype,
        progress=progress,
    )
    timings["affinities_s"] = time.perf_counter() - start
    start = time.perf_counter()
    seg, _ = segment_blockwise(
        affs,
        specs["fragments"],
        specs["segmentation"],
        threshold=threshold,
        block_shape=geometry.block_shape,
        fragment_tile=geometry.fragment_tile,
        anisotropic=is_anisotropic(raw.voxel_size),
        scheduler=scheduler,
        workers=workers,
        resume=resume,
        overwrite=overwrite,
        progress=progress,
    )
    timings["segmentation_s"] = time.perf_counter() - start
    result: dict[str, Any] = {
        **specs,
        "geometry": asdict(geometry),
        "timings": timings,
        "voxels": int(np.prod(raw.shape)),
    }
    if preview:
        result["preview"] = str(
            write_preview(
                preview_path(out), raw, affs, seg, title=f"{volume} (threshold {threshold})"
            )
        )
    return result


def model_threshold(predictor: Predictor) -> float:
    """The agglomeration threshold the model carries (chosen on validation), else the default."""
    return getattr(getattr(predictor, "spec", None), "threshold", None) or DEFAULT_THRESHOLD


def is_anisotropic(voxel_size: Sequence[float] | None) -> bool:
    """Serial-section data (z ≥ 2× the in-plane size) gets per-section fragments."""
    return voxel_size is not None and voxel_size[0] >= 2 * min(voxel_size[1:])
