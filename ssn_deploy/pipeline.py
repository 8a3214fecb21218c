"""``ssn-deploy infer``: raw volume → affinities → fragments → segmentation (+ a PNG preview).

One output group ``OUT.zarr`` holds ``affinities`` (C×Z×Y×X) and the label images
``labels/fragments`` and ``labels/segmentation`` (uint64), each with its own finished-block
markers, so ``resume`` continues whichever stage a killed run was in; ``OUT.zarr`` is an
OME-Zarr image with labels and pyramids (layout: :mod:`ssn_deploy.outputs`). Geometry
defaults come from the model and the voxel size (see :func:`default_geometry`); everything
runs through the same dask engine, locally or on a cluster.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from ssn_deploy.agglomeration.blockwise import (
    check_block_and_tile,
    check_threshold,
    segment_blockwise,
)
from ssn_deploy.errors import ConfigError, OutputExistsError, VoxelSizeError
from ssn_deploy.inference.checks import check_raw, format_nm
from ssn_deploy.inference.engine import cached_predictor, predict_affinities
from ssn_deploy.inference.loader import (
    DEFAULT,
    TRITON,
    auto_backend,
    choose_packaged,
    load_predictor,
)
from ssn_deploy.inference.predictor import Predictor
from ssn_deploy.inference.scheduling import check_cluster_paths, recording_stages, timed_stage
from ssn_deploy.inference.triton_backend import DEFAULT_MODEL as TRITON_MODEL
from ssn_deploy.inference.triton_backend import DEFAULT_TIMEOUT as TRITON_TIMEOUT
from ssn_deploy.inference.triton_backend import TritonOptions, check_patch_fits
from ssn_deploy.outputs import describe_root, stage_specs
from ssn_deploy.preview import write_preview
from ssn_deploy.pyramid import pyramid_factors
from ssn_deploy.storage import (
    absolute_spec,
    check_free_space,
    check_writable,
    exists,
    refuse_read_only,
    remove_temporaries,
    stored_bytes,
)
from ssn_deploy.volumes import Volume, open_volume, refuse_overlap

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


NOMINAL_PATCH = 160
"""Patch extent in voxels of the finest axis (the paper's 160-pixel field of view)."""
NOMINAL_BLOCK = (128, 256, 256)
"""Block extent in voxels of the finest axis, per axis."""
MIN_MARGIN = 4
"""Voxels dropped at least at each patch face (fewer only where the model's context is smaller).

A margin below the context trades exactness for speed: outputs within ``context − margin`` of
a core's face saw zero padding. ``benchmarks/margins.py`` measures the trade for the
anisotropic model (z context 18): a z margin of 4 halves the compute of the full context and
changes 7 % of the stored affinities (mean |Δ| 7e-4, at most 0.33) with no measurable change in
VOI (1.60 vs 1.56, within the spread between neighbouring margins); see the README."""
MIN_CORE_FRACTION = 2 / 3
"""The kept core is at least this fraction of the patch (≤ 1.5 model voxels per output voxel
per axis), so a thin axis gets a longer patch instead of a vanishing stride."""


def _round_up(value: float, multiple: int) -> int:
    return max(multiple, int(-(-value // multiple) * multiple))


def _margin_step(g: int) -> int:
    """Margins are multiples of this, so that 2·margin, hence the core, is a multiple of g."""
    return g // 2 if g % 2 == 0 else g


def _margin(patch: int, g: int, context: int) -> int:
    """About an eighth of the patch, at least :data:`MIN_MARGIN`, at most the context."""
    if context == 0:
        return 0
    step = _margin_step(g)
    margin = max(patch // 8 // step * step, _round_up(MIN_MARGIN, step))
    return min(margin, _round_up(context, step))


MAX_PATCH_GROWTH = 1.1
"""A patch fitted to the volume may be this much longer than the nominal one per axis."""


def _fitted_core(length: int, core: int, margin: int, g: int) -> int:
    """The core (a multiple of ``g``) whose patches cover ``length`` voxels with the fewest
    model voxels: ``ceil(length / core) · (core + 2·margin)``, patches no longer than
    :data:`MAX_PATCH_GROWTH` × the nominal one and keeping :data:`MIN_CORE_FRACTION`.

    Why: cores sit on a lattice from the volume's origin, so a 125-section volume with 120-voxel
    cores computes two full patches for 5 sections; a core of 128 computes one.
    """
    longest = int((core + 2 * margin) * MAX_PATCH_GROWTH) - 2 * margin
    shortest = _round_up(2 * margin * MIN_CORE_FRACTION / (1 - MIN_CORE_FRACTION), g)
    candidates = range(min(shortest, core), max(longest, core) + 1, g)
    return min(candidates, key=lambda c: (-(-length // c) * (c + 2 * margin), c))


def _axis_geometry(
    extent: float,
    g: int,
    context: int,
    block_nominal: float,
    patch: int | None = None,
    length: int | None = None,
) -> tuple[int, int, int, int]:
    """Patch, margin, block and fragment tile along one axis (see :func:`default_geometry`)."""
    if patch is None:
        patch = _round_up(extent, g)
        margin = _margin(patch, g, context)
        patch = max(patch, _round_up(2 * margin / (1 - MIN_CORE_FRACTION), g))
        if length is not None:
            patch = _fitted_core(length, patch - 2 * margin, margin, g) + 2 * margin
    else:
        margin = _margin(patch, g, context)
        while margin and patch - 2 * margin < g:  # a short given patch: shrink the margin
            margin -= _margin_step(g)
        margin = max(margin, 0)
    stride = max(g, (patch - 2 * margin) // g * g)
    block = stride * max(1, round(block_nominal / stride))
    tile = block  # one fragment tile per block: the least flooded context (docstring below)
    return patch, margin, block, tile


def default_geometry(
    predictor: Predictor,
    voxel_size: Sequence[float] | None,
    patch_shape: Sequence[int] | None = None,
    volume_shape: Sequence[int] | None = None,
) -> Geometry:
    """Shapes that cover about the same distance in nm on every axis, with no wasted patches.

    Patches span :data:`NOMINAL_PATCH` voxels of the finest axis (rounded up to the model's
    granularity). Their margin, where outputs saw the patch's padding and are dropped, is about
    an eighth of the patch, at least :data:`MIN_MARGIN`, capped by the model's context, and
    chosen so that cores are a multiple of the granularity: cores then tile the volume without
    overlap. A thin axis (z of serial-section data) gets a patch long enough that the core
    keeps :data:`MIN_CORE_FRACTION` of it, so strides never collapse. Blocks (~128 × 256 × 256
    finest-axis voxels) are a multiple of the core, so no patch straddles two blocks, and are
    one fragment tile each: a tile floods ``FRAGMENT_CONTEXT`` voxels beyond its core on every
    side, so a 64 × 128 × 128 tile flooded 4.5× its voxels and a whole block 2.3×, in the
    slowest stage after the model (``benchmarks/postprocess.py``). Cores sit on a global
    lattice, so results never depend on the blocks. A given ``patch_shape`` replaces the
    default patch (margins shrink if needed).
    Given the ``volume_shape``, each axis's core is fitted to it (:func:`_fitted_core`): same
    margins, fewer model voxels for volumes that are not a multiple of the nominal core.
    """
    vs = np.asarray(voxel_size if voxel_size is not None else (1.0, 1.0, 1.0), dtype=float)
    if vs.shape != (3,) or not np.all(np.isfinite(vs)) or np.any(vs <= 0):
        raise VoxelSizeError(f"voxel size must be three positive numbers (nm), got {voxel_size}")
    vs = vs / vs.min()  # in units of the finest axis, which gets the nominal voxel counts
    given = [None] * 3 if patch_shape is None else [int(p) for p in patch_shape]
    if len(given) != 3 or any(p is not None and p < 1 for p in given):
        raise ConfigError(f"patch shape: expected three positive sizes z,y,x, got {patch_shape}")
    bad = [(p, g) for p, g in zip(given, predictor.granularity, strict=True) if p and p % g]
    if bad:
        raise ConfigError(
            f"patch shape {tuple(given)} must be a multiple of the model's granularity "
            f"{tuple(predictor.granularity)} (z,y,x)"
        )
    lengths = [None] * 3 if volume_shape is None else [int(n) for n in volume_shape]
    axes = [
        _axis_geometry(NOMINAL_PATCH / v, g, c, n / v, p, length)
        for v, g, c, n, p, length in zip(
            vs, predictor.granularity, predictor.context, NOMINAL_BLOCK, given, lengths, strict=True
        )
    ]
    patch, margin, block, tile = (tuple(values) for values in zip(*axes, strict=True))
    return Geometry(block, tile, patch, margin, (0, 0, 0))  # type: ignore[arg-type]


def preview_path(out: str) -> str:
    """``seg.zarr`` → ``seg.preview.png`` beside it (a path, or a URL beside a URL)."""
    return out.removesuffix("/").removesuffix(".zarr") + ".preview.png"


def _refuse_existing(out: str, resume: bool, overwrite: bool, preview: bool = False) -> None:
    refuse_read_only(out)  # http(s)://: before asking the server whether it exists
    if resume and overwrite:
        raise ConfigError("--resume continues an output and --overwrite replaces it: pick one")
    if exists(out) and not (resume or overwrite):
        raise OutputExistsError(
            f"{out} already exists; pass --resume to continue it or --overwrite to replace it"
        )
    png = preview_path(out)
    if preview and exists(png) and not (resume or overwrite):
        raise OutputExistsError(
            f"{png} already exists; pass --overwrite to replace it, or --no-preview"
        )


def check_storage(
    out: str, scheduler: Any, reads: list[str], resume: bool, preview: bool = False
) -> None:
    """Before any work: the output (and its preview) can be written here and, on a cluster,
    used by its processes; a resumed output loses what a killed write left behind."""
    check_writable(out)
    if preview:
        check_writable(preview_path(out))
    if scheduler is not None:
        check_cluster_paths(scheduler, reads, [out])
    if resume:
        remove_temporaries(out)


def output_bytes(
    shape: Sequence[int],
    channels: int,
    affinity_dtype: str,
    voxel_size: Sequence[float] | None = None,
) -> tuple[int, int]:
    """(at least, uncompressed) bytes of infer's affinities, fragments and segmentation, every
    pyramid level included (a 3D 2× pyramid adds about a seventh; in-plane only, a third)."""
    parts = []
    level = np.asarray(shape, dtype=np.int64)
    for factor in [(1, 1, 1), *pyramid_factors(shape, voxel_size)]:
        level = -(-level // np.asarray(factor))
        parts.append(stored_bytes((channels, *level), affinity_dtype))
        parts += [stored_bytes(level, np.uint64)] * 2
    return sum(p[0] for p in parts), sum(p[1] for p in parts)


def infer(
    volume: str,
    out: str,
    *,
    model: str = "default",
    backend: str = "auto",
    device: str = "cpu",
    precision: str = "auto",
    threshold: float | None = None,
    block_shape: Sequence[int] | None = None,
    patch_shape: Sequence[int] | None = None,
    fragment_tile: Sequence[int] | None = None,
    scheduler: Any = None,
    workers: int = 1,
    threads: int | None = None,
    compile: bool = False,
    tta: str | None = None,
    batch_size: int = 1,
    voxel_size: Sequence[float] | None = None,
    affinity_dtype: str = "uint8",
    agglomeration: str = "auto",
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    preview: bool = True,
    announce: Callable[[str], None] | None = None,
    url: str | None = None,
    protocol: str = "grpc",
    triton_model: str = TRITON_MODEL,
    triton_timeout: float = TRITON_TIMEOUT,
) -> dict[str, Any]:
    """Run the whole pipeline; returns the output specs, geometry and stage timings.

    ``timings`` holds the seconds of the affinity and segmentation calls; ``stage_seconds``
    splits the whole call into setup (checks, model load, geometry), each blockwise stage and
    its pyramid, agglomeration, preview and other (cluster start-up, output creation), in order.

    ``announce`` receives the line naming the packaged model chosen for ``model="default"``
    (the CLI prints it before any work; by default it is logged). ``url`` (``HOST:PORT``)
    sends the patches to a Triton server instead (``backend="triton"``, implied by ``url``):
    ``protocol`` grpc | http, ``triton_model`` the served model, ``triton_timeout`` seconds
    per request; the model and its geometry are then the server's. ``agglomeration``:
    ``global`` (one region graph on the client), ``superblocks`` (merged in dask tasks, the
    client never holds the graph; see :func:`~.agglomeration.blockwise.segment_blockwise`) or
    ``auto`` (:func:`resolve_agglomeration`)."""
    begin = time.perf_counter()
    check_agglomeration(agglomeration)
    if scheduler is not None:  # workers open the volumes and the model by these names
        volume, out = absolute_spec(volume), absolute_spec(out)
        model = os.path.abspath(model) if os.path.isfile(model) else model
    _refuse_existing(out, resume, overwrite, preview)
    raw: Volume = open_volume(volume, voxel_size=voxel_size)
    check_raw(raw, None)  # rank, dtype, values, voxel size: before any geometry or model
    refuse_overlap(out, [raw.spec])
    reads = [volume, model] if os.path.isfile(model) else [volume]
    check_storage(out, scheduler, reads, resume, preview)
    if threshold is not None:
        check_threshold(threshold)
    if block_shape is not None and fragment_tile is not None:
        check_block_and_tile(block_shape, fragment_tile)
    triton = triton_options(backend, url, protocol, triton_model, triton_timeout)
    choice = None
    if triton is None:
        model, choice = resolve_model(model, raw.voxel_size)
    else:
        backend = TRITON
    if backend == "auto":
        backend = auto_backend(model, precision, compile, device)
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    factory = functools.partial(
        load_predictor,
        model,
        backend,
        device=device,
        precision=precision,
        compile=compile,
        threads=threads,
        tta=tta,
        triton=triton,
    )
    predictor = cached_predictor(factory)
    if choice:  # said once the model loaded, so that a failure is the only line
        (announce or log.info)(choice)
    if triton is not None:
        model = predictor.provenance["model"]
    if threshold is None:  # the model's own, chosen on its validation data
        threshold = model_threshold(predictor)
    geometry = default_geometry(predictor, raw.voxel_size, patch_shape, raw.shape)
    if fragment_tile is not None:
        geometry = replace(geometry, fragment_tile=tuple(int(v) for v in fragment_tile))
    if block_shape is not None:
        geometry = replace(geometry, block_shape=tuple(int(v) for v in block_shape))
    served = getattr(predictor, "inner", predictor)  # a TTA wrapper's model
    if hasattr(served, "max_patch"):
        check_patch_fits(geometry.patch_shape, served.max_patch, served.provenance["model"])
    threshold = check_threshold(threshold)
    check_block_and_tile(geometry.block_shape, geometry.fragment_tile)
    if not resume:  # a resumed run has written part of it already
        check_free_space(
            out, *output_bytes(raw.shape, predictor.num_channels, affinity_dtype, raw.voxel_size)
        )
    log.info("geometry: %s", geometry)
    specs = stage_specs(out)
    timings = {}
    stages = {"setup": time.perf_counter() - begin}
    with recording_stages(stages):
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
        describe_root(out)  # OUT.zarr is the affinities image, before its labels point at it
        anisotropic = is_anisotropic(raw.voxel_size)
        agglomeration = resolve_agglomeration(agglomeration, raw.shape)
        log.info("agglomeration: %s", agglomeration)
        record_segmentation_settings(affs, threshold, geometry, anisotropic, agglomeration)
        start = time.perf_counter()
        seg, _ = segment_blockwise(
            affs,
            specs["fragments"],
            specs["segmentation"],
            threshold=threshold,
            block_shape=geometry.block_shape,
            fragment_tile=geometry.fragment_tile,
            anisotropic=anisotropic,
            scheduler=scheduler,
            workers=workers,
            resume=resume,
            overwrite=overwrite,
            progress=progress,
            superblocks=agglomeration == "superblocks",
        )
        timings["segmentation_s"] = time.perf_counter() - start
        result: dict[str, Any] = {
            **specs,
            "model": str(model),
            "geometry": asdict(geometry),
            "timings": timings,
            "stage_seconds": stages,
            "voxels": int(np.prod(raw.shape)),
        }
        if preview:
            with timed_stage("preview"):
                title = f"{volume} (threshold {threshold})"
                result["preview"] = str(
                    write_preview(preview_path(out), raw, affs, seg, title=title)
                )
    stages["other"] = time.perf_counter() - begin - sum(stages.values())
    return result


def triton_options(
    backend: str, url: str | None, protocol: str, model: str, timeout: float
) -> TritonOptions | None:
    """The server to send patches to, or None for a local backend; ``url`` implies triton."""
    if backend not in (TRITON, "auto") and url is not None:
        raise ConfigError(f"--url names a Triton server: pass --backend triton, not {backend}")
    if backend != TRITON and url is None:
        return None
    if not url:
        raise ConfigError("--backend triton needs the server's address: pass --url HOST:PORT")
    if protocol not in ("grpc", "http"):
        raise ConfigError(f"--protocol: expected grpc or http, got {protocol!r}")
    return TritonOptions(url, protocol=protocol, model=model, timeout=timeout)


def resolve_model(model: str, voxel_size: Sequence[float] | None) -> tuple[str, str | None]:
    """``"default"`` → the packaged model that fits ``voxel_size`` (``"iso"`` or ``"aniso"``),
    with a line that says so; any other model as it is, with no line."""
    if str(model) != DEFAULT:
        return str(model), None
    chosen = choose_packaged(voxel_size)
    found = format_nm(voxel_size) if voxel_size is not None else "unknown"
    return chosen.name, (
        f"model: packaged '{chosen.name}' ({chosen.modality}, trained at "
        f"{format_nm(chosen.voxel_size)}), chosen for voxel size {found}; --model "
        "iso|aniso|FILE overrides"
    )


INFER_STAGES = (
    "setup",
    "affinities",
    "affinity_pyramid",
    "fragments",
    "fragment_pyramid",
    "edges",
    "agglomeration",
    "relabel",
    "segmentation_pyramid",
    "preview",
    "other",
)
"""The keys of :func:`infer`'s ``stage_seconds``, in the order the stages run."""


SEGMENTATION_KEY = "segmentation"
"""Key of the affinities' ``ssn_deploy`` attributes that ``segment`` takes its defaults from."""


AGGLOMERATIONS = ("auto", "global", "superblocks")
AUTO_SUPERBLOCKS_VOXELS = 64 * 2**20
"""``auto`` merges by super-blocks above this many voxels: the global region graph costs the
client ~2 kB per edge and real affinities give 3,700-7,300 edges per MVox (README, petascale
plan), so 0.5-1 GB here, growing with the volume; below it, the global run's one-pass
threshold sweep and exact merge order are worth its memory."""


def check_agglomeration(agglomeration: str) -> str:
    if agglomeration not in AGGLOMERATIONS:
        raise ConfigError(
            f"agglomeration: expected one of {', '.join(AGGLOMERATIONS)}, got {agglomeration!r}"
        )
    return agglomeration


def resolve_agglomeration(agglomeration: str, shape: Sequence[int]) -> str:
    """``global`` or ``superblocks``: ``auto`` decided by the volume's size (see
    :data:`AUTO_SUPERBLOCKS_VOXELS`)."""
    if check_agglomeration(agglomeration) != "auto":
        return agglomeration
    large = int(np.prod([int(n) for n in shape])) > AUTO_SUPERBLOCKS_VOXELS
    return "superblocks" if large else "global"


def record_segmentation_settings(
    affs: Volume,
    threshold: float,
    geometry: Geometry,
    anisotropic: bool,
    agglomeration: str = "global",
) -> None:
    """Write the agglomeration settings infer used into the affinities' provenance, so that
    ``ssn-deploy segment AFFS`` repeats (or varies) exactly this run by default."""
    attrs = dict(affs.attrs.get("ssn_deploy", {}))
    attrs[SEGMENTATION_KEY] = {
        "threshold": float(threshold),
        "anisotropic": bool(anisotropic),
        "block_shape": [int(v) for v in geometry.block_shape],
        "fragment_tile": [int(v) for v in geometry.fragment_tile],
        "agglomeration": agglomeration,
    }
    affs.attrs["ssn_deploy"] = attrs


def segmentation_settings(
    affs: Volume,
    *,
    threshold: float | None = None,
    block_shape: Sequence[int] | None = None,
    fragment_tile: Sequence[int] | None = None,
    anisotropic: bool | None = None,
    agglomeration: str | None = None,
) -> dict[str, Any]:
    """Agglomeration settings for stored affinities: what is given, else what infer recorded
    (:func:`record_segmentation_settings`), else defaults from the voxel size.

    ``origin`` in the result says where the defaults came from, for the user's log.
    """
    recorded = affs.attrs.get("ssn_deploy", {}).get(SEGMENTATION_KEY) or {}
    voxel_size = affs.voxel_size
    if recorded:
        origin = "defaults from the affinities' provenance"
        fallback = dict(recorded)
    else:
        origin = "defaults from the voxel size" if voxel_size else "defaults (no voxel size)"
        vs = np.asarray(voxel_size if voxel_size is not None else (1.0, 1.0, 1.0), float)
        vs = vs / vs.min()
        blocks = [_round_up(n / v, 8) for n, v in zip(NOMINAL_BLOCK, vs, strict=True)]
        fallback = {
            "threshold": DEFAULT_THRESHOLD,
            "anisotropic": is_anisotropic(voxel_size),
            "block_shape": blocks,
            "fragment_tile": [b // 2 for b in blocks],
        }
    fallback.setdefault("agglomeration", "auto")  # recorded before infer had the choice
    given = {
        "threshold": threshold,
        "anisotropic": anisotropic,
        "block_shape": block_shape,
        "fragment_tile": fragment_tile,
        "agglomeration": agglomeration,
    }
    chosen = {k: fallback[k] if v is None else v for k, v in given.items()}
    if block_shape is not None and fragment_tile is None:  # keep the tile where it still fits
        tile = fallback["fragment_tile"]
        if any(int(b) % int(t) for b, t in zip(block_shape, tile, strict=True)):
            chosen["fragment_tile"] = [b // 2 if b % 2 == 0 else b for b in block_shape]
    chosen["block_shape"] = tuple(int(v) for v in chosen["block_shape"])
    chosen["fragment_tile"] = tuple(int(v) for v in chosen["fragment_tile"])
    chosen["threshold"] = float(chosen["threshold"])
    chosen["anisotropic"] = bool(chosen["anisotropic"])
    chosen["agglomeration"] = resolve_agglomeration(chosen["agglomeration"], affs.shape[1:])
    chosen["origin"] = origin if any(v is None for v in given.values()) else "as given"
    return chosen


def model_threshold(predictor: Predictor) -> float:
    """The agglomeration threshold the model carries (chosen on validation), else the default."""
    return getattr(getattr(predictor, "spec", None), "threshold", None) or DEFAULT_THRESHOLD


def is_anisotropic(voxel_size: Sequence[float] | None) -> bool:
    """Serial-section data (z ≥ 2× the in-plane size) gets per-section fragments."""
    return voxel_size is not None and voxel_size[0] >= 2 * min(voxel_size[1:])
