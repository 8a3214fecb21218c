"""Blockwise segmentation of an affinity volume into one globally consistent segmentation.

Three dask passes over the same block grid (shards == blocks, so no two tasks write one shard):

1. **fragments** — fragments are defined on a *global tile lattice* (``fragment_tile``): each
   tile floods a seeded watershed over its affinities grown by ``FRAGMENT_CONTEXT`` voxels and
   keeps its core, with ids ``tile_id · voxels_per_tile + local id``, unique by construction.
   A block (a multiple of the tile) computes its tiles, so fragments, and therefore the final
   segmentation, do not depend on the block grid: scheduling never changes results;
2. **edge statistics** — each block counts the affinity edges that start at its own voxels,
   including those reaching into its neighbours (it reads a rim of their fragments), so the
   sum over blocks is exactly the statistics of the whole volume; the client reduces them and
   agglomerates once (:mod:`.hierarchical`);
3. **relabel** — each block maps its fragments through the lookup table.

Fragments and segmentation blocks are marked when written (:mod:`ssn_deploy.inference.done`),
so a rerun with ``resume`` skips them; edge statistics are recomputed (cheap: one pass of
integer comparisons). The region graph lives in the client's memory: O(fragment pairs), about
2 kB per edge with its histogram. With ``superblocks=True`` it never does: blocks keep their
statistics in files and dask tasks merge them super-block by super-block
(:mod:`.superblock_store`, DESIGN §5); the client only reduces the tile-face votes.
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Sequence
from typing import Any

import fastremap
import numpy as np

from ssn_deploy.affinities import DEFAULT_OFFSETS, Offset, nearest_offsets, validate_offsets
from ssn_deploy.agglomeration.fragments import watershed_fragments
from ssn_deploy.agglomeration.hierarchical import MergeHistory, agglomerate, relabel
from ssn_deploy.agglomeration.region_graph import (
    BINS,
    EdgeStats,
    edge_statistics,
    merge_edge_stats,
)
from ssn_deploy.agglomeration.stitching import (
    Votes,
    continuity_flags,
    face_votes,
    merge_stitched,
    merge_votes,
    stitch_mapping,
    stitched_pairs,
    with_stitches,
)
from ssn_deploy.agglomeration.superblock_store import (
    EdgeStore,
    merge_stored_group,
    route_block,
    segment_ids,
)
from ssn_deploy.agglomeration.superblocks import levels_for, tile_groups
from ssn_deploy.errors import ConfigError, InputNotFoundError, InvalidInputError
from ssn_deploy.geometry import Block, BlockGrid, Box
from ssn_deploy.inference.done import BlockMarkers, refuse_changed_settings
from ssn_deploy.inference.scheduling import dask_client, run_blocks, timed_stage
from ssn_deploy.outputs import finish_stage
from ssn_deploy.provenance import RUN_KEYS, model_provenance, run_provenance
from ssn_deploy.volumes import (
    Volume,
    create_volume,
    open_volume,
    refuse_overlap,
    resolved_spec,
    url_options,
)

log = logging.getLogger(__name__)

FRAGMENT_CONTEXT = 32
"""Voxels of affinities each tile floods beyond its core (clipped at the volume), in-plane and,
for 3D fragments, in z. Fragments near a tile face then mostly equal those of one untiled
watershed, so :mod:`.stitching` can rejoin the pieces a face cuts. ``benchmarks/fragment_tiles.py``
measures the result on both FIB test regions (tiled vs one tile; see the README)."""


def fragment_context(anisotropic: bool) -> tuple[int, int, int]:
    """Per-axis watershed context: none in z for per-section (2D) fragments."""
    return (0 if anisotropic else FRAGMENT_CONTEXT, FRAGMENT_CONTEXT, FRAGMENT_CONTEXT)


REDUCE_EVERY = 64
"""Edge statistics of this many blocks are summed into one table as they arrive."""


def check_threshold(threshold: float) -> float:
    """Agglomeration thresholds are scores in [0, 1]: 0 merges nothing, 1 all but score-1 edges."""
    value = float(threshold)
    if not 0.0 <= value <= 1.0:  # also refuses nan
        raise ConfigError(f"threshold must be a number in [0, 1], got {threshold}")
    return value


def check_block_and_tile(block_shape: Sequence[int], fragment_tile: Sequence[int]) -> None:
    """Blocks must hold whole fragment tiles (checked before any work, not after affinities)."""
    if len(block_shape) != 3 or len(fragment_tile) != 3 or min(*block_shape, *fragment_tile) < 1:
        raise ConfigError(
            f"block shape {tuple(block_shape)} and fragment tile {tuple(fragment_tile)} must be "
            "three positive sizes z,y,x"
        )
    if any(int(b) % int(t) for b, t in zip(block_shape, fragment_tile, strict=True)):
        raise ConfigError(
            f"block shape {tuple(block_shape)} must be a multiple of the fragment tile "
            f"{tuple(fragment_tile)}"
        )


def faces_spec(fragments_spec: str) -> str:
    """Where the face-continuity flags of ``…/fragments`` are kept: ``…/fragments_faces``."""
    spec = fragments_spec.removesuffix("/")
    if spec.lower().endswith(".zarr"):  # a standalone array: a sibling array
        return spec[:-5] + "_faces" + spec[-5:]
    return spec + "_faces"


def affinity_scale(affs: Volume) -> float:
    """What stored affinities are divided by to lie in [0, 1] (255 for uint8)."""
    default = 255.0 if affs.dtype == np.uint8 else 1.0
    return float(affs.attrs.get("ssn_deploy", {}).get("scale", default))


def read_affinities(affs: Volume, box: Box) -> np.ndarray:
    """Affinities of ``box`` as float32 in [0, 1], whatever their stored dtype."""
    scale = affinity_scale(affs)
    data = affs[box]
    return data.astype(np.float32) / np.float32(scale) if scale != 1.0 else data.astype(np.float32)


NEAREST = DEFAULT_OFFSETS


def affinity_offsets(affs: Volume, offsets: Sequence[Offset] | None) -> tuple[Offset, ...]:
    """The offsets given, else those infer recorded, else the 3 nearest neighbours for a
    3-channel array; every other case is a one-line error saying what was expected."""
    if affs.ndim != 4:
        raise InvalidInputError(
            f"{affs.spec}: expected affinities C×Z×Y×X (as ssn-deploy infer writes them), "
            f"got a {affs.ndim}D {affs.dtype} array"
        )
    stored = affs.attrs.get("ssn_deploy", {}).get("offsets")
    chosen = offsets if offsets is not None else stored
    if chosen is None and affs.shape[0] == len(NEAREST):
        chosen = NEAREST
    if chosen is None:
        raise InvalidInputError(
            f"{affs.spec}: {affs.shape[0]} channels and no affinity offsets recorded; segment "
            "takes affinities written by ssn-deploy infer, or 3 nearest-neighbour channels"
        )
    chosen = validate_offsets(chosen)
    if affs.ndim != 4 or affs.shape[0] != len(chosen):
        raise InvalidInputError(
            f"{affs.spec}: expected affinities C×Z×Y×X with C = {len(chosen)} offsets, "
            f"got shape {affs.shape}"
        )
    return chosen


def _fragment_block(
    affs: Volume,
    out: Volume,
    faces: Volume,
    markers: BlockMarkers,
    offsets: tuple[Offset, ...],
    anisotropic: bool,
    tiles: BlockGrid,
    block: Block,
) -> int:
    total = tiles.total
    first_tile = [b // t for b, t in zip(block.write_box.begin, tiles.block_shape, strict=True)]
    last_tile = [-(-e // t) for e, t in zip(block.write_box.end, tiles.block_shape, strict=True)]
    result = np.empty(block.write_box.shape, np.uint64)
    flags = np.empty(block.write_box.shape, np.uint8)
    tile_voxels = int(np.prod(tiles.block_shape))
    context = fragment_context(anisotropic)
    # one read for all tiles of the block (their contexts overlap: reading each tile's grown
    # box decoded the shared chunks again, ~2x the bytes), in the stored dtype
    around = block.write_box.grow(context).intersect(total)
    stored = affs[around]
    scale = affinity_scale(affs)
    for index in itertools.product(
        *(range(a, b) for a, b in zip(first_tile, last_tile, strict=True))
    ):
        tile = tiles.block(index)
        read = tile.write_box.grow(context).intersect(total)
        data = stored[(slice(None), *read.relative_to(around).slices)]
        frags = watershed_fragments(data, offsets=offsets, anisotropic=anisotropic, scale=scale)
        core_slices = tile.write_box.relative_to(read).slices
        core = np.ascontiguousarray(frags[core_slices])
        local, _ = fastremap.renumber(core, start=0)  # pieces 1..n inside the tile's id range
        first = np.uint64(tile.block_id * tile_voxels + 1)
        here = tile.write_box.relative_to(block.write_box).slices
        np.add(local, first, out=result[here], casting="unsafe")  # no temporaries
        flags[here] = continuity_flags(frags, core_slices)
    faces[block.write_box] = flags
    out[block.write_box] = result
    markers.mark(block, result, flags)
    return block.write_box.size


def _edge_block(
    affs: Volume,
    frags: Volume,
    faces: Volume,
    offsets: tuple[Offset, ...],
    tile_shape: tuple[int, ...],
    block: Block,
) -> tuple[int, EdgeStats, Votes]:
    total = Box.from_shape(frags.shape)
    nearest = np.asarray(nearest_offsets(offsets))  # what the edge statistics read
    reach = np.maximum(np.abs(nearest).max(axis=0), 1)  # ≥ 1: the faces below
    read = block.write_box.grow(tuple(int(r) for r in reach)).intersect(total)
    inside = block.write_box.relative_to(read).slices
    owned = np.zeros(read.shape, dtype=bool)
    owned[inside] = True
    fragments = frags[read]
    stats = edge_statistics(read_affinities(affs, read), fragments, offsets, owned=owned)
    votes = face_votes(fragments, faces[read], read.begin, inside, tile_shape)
    return block.write_box.size, stats, votes


def _stored_edge_block(
    affs: Volume,
    frags: Volume,
    faces: Volume,
    offsets: tuple[Offset, ...],
    tile_shape: tuple[int, ...],
    store: EdgeStore,
    block: Block,
) -> tuple[int, Votes]:
    """:func:`_edge_block` that keeps its statistics in ``store`` (only the face votes, small,
    go to the client)."""
    size, stats, votes = _edge_block(affs, frags, faces, offsets, tile_shape, block)
    store.write(f"blocks/b{block.block_id}.npz", u=stats.u, v=stats.v, count=stats.count,
                total=stats.total, histogram=stats.histogram)  # fmt: skip
    return size, votes


def _route_block(store: EdgeStore, stitches: dict[int, int], block: Block) -> int:
    data = store.read(f"blocks/b{block.block_id}.npz")
    if data is not None:
        stats = EdgeStats(data["u"], data["v"], data["count"], data["total"], data["histogram"])
        route_block(store, block.block_id, stats, stitches)
    return block.write_box.size


def _stored_relabel_block(
    frags: Volume, out: Volume, markers: BlockMarkers, store: EdgeStore, stitches: dict,
    block: Block,
) -> int:  # fmt: skip
    labels = segment_ids(store, frags[block.write_box], stitches)
    out[block.write_box] = labels
    markers.mark(block, labels)
    return block.write_box.size


def _merge_group_task(store: EdgeStore, level: int, threshold: float, group: int) -> int:
    return merge_stored_group(store, level, group, threshold, BINS)


def edge_store(fragments_spec: str, tiles: BlockGrid) -> EdgeStore:
    """Where super-block agglomeration keeps its files: ``…/fragments_edges`` beside the
    fragments, grouped by tiles (level 0) and 2×2×2 super-blocks above."""
    root = fragments_spec.removesuffix("/") + "_edges"
    grid = tuple(int(n) for n in tiles.grid_shape)
    return EdgeStore(root, tile_groups(tuple(tiles.block_shape), grid), levels_for(grid),
                     url_options(root))  # fmt: skip


def _relabel_block(
    frags: Volume, out: Volume, markers: BlockMarkers, lookup: dict[int, int], block: Block
) -> int:
    labels = relabel(frags[block.write_box], lookup)
    out[block.write_box] = labels
    markers.mark(block, labels)
    return block.write_box.size


def _blockwise_output(
    spec: str,
    like: Volume,
    grid: BlockGrid,
    attrs: dict,
    *,
    resume: bool,
    overwrite: bool,
    dtype: type = np.uint64,
) -> tuple[Volume, BlockMarkers]:
    if resume:
        try:
            vol = open_volume(spec, "r+")
        except InputNotFoundError:
            vol = None  # nothing to resume: start afresh
        if vol is not None:
            stored = vol.attrs.get("ssn_deploy", {})
            refuse_changed_settings(spec, stored, attrs["ssn_deploy"], ignore=RUN_KEYS)
            return vol, BlockMarkers.open(spec, grid)
    vol = create_volume(
        spec,
        like.shape[-3:],
        dtype,
        shards=grid.block_shape,  # one block = one whole shard: no two tasks write one
        voxel_size=like.voxel_size,
        offset=like.offset,
        overwrite=overwrite or resume,
        attrs=attrs,
    )
    return vol, BlockMarkers.create(spec, grid, like.voxel_size, like.offset)


def _run_stage(
    client: Any, task: Any, grid: BlockGrid, markers: BlockMarkers | None, progress: bool, desc: str
) -> None:
    finished = markers.finished() if markers is not None else np.zeros(len(grid), bool)
    if finished.any():
        log.info("%s: skipping %d finished blocks", desc, int(finished.sum()))
    pending = (b for b in grid if not finished[b.block_id])
    limit = 2 * sum(client.nthreads().values())
    run_blocks(client, task, pending, limit, len(grid), int(finished.sum()), progress, desc)


def refuse_overwriting_input(affinities: str, fragments_spec: str, segmentation_spec: str) -> None:
    """No output array may be, contain or lie inside the affinities (``OUT.zarr/affinities``
    beside ``OUT.zarr/segmentation`` is fine: re-segmenting an infer output in place)."""
    for spec in (fragments_spec, faces_spec(fragments_spec), segmentation_spec):
        refuse_overlap(spec, [affinities])


def segment_blockwise(
    affinities: str | Volume,
    fragments_spec: str,
    segmentation_spec: str,
    *,
    threshold: float = 0.5,
    block_shape: Sequence[int],
    fragment_tile: Sequence[int] = (64, 64, 64),
    offsets: Sequence[Offset] | None = None,
    anisotropic: bool = False,
    scheduler: Any = None,
    workers: int = 1,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    superblocks: bool = False,
) -> tuple[Volume, MergeHistory | None]:
    """Affinities (C×Z×Y×X zarr) → fragments and a uint64 segmentation at ``threshold``.

    Returns the segmentation and the merge history (whose ``lookup(t)`` gives any other
    threshold below 1 without recomputation). With ``superblocks`` the region graph never
    reaches the client: edges are kept in storage and merged super-block by super-block in
    dask tasks (:mod:`.superblock_store`); there is then no history (None).
    """
    if resume and overwrite:
        raise ConfigError("--resume continues an output and --overwrite replaces it: pick one")
    threshold = check_threshold(threshold)
    check_block_and_tile(block_shape, fragment_tile)
    affs = open_volume(affinities) if isinstance(affinities, str) else affinities
    refuse_overwriting_input(affs.spec, fragments_spec, segmentation_spec)
    offsets = affinity_offsets(affs, offsets)
    try:
        grid = BlockGrid(Box.from_shape(affs.shape[1:]), block_shape, context=0)
        tiles = BlockGrid(grid.total, fragment_tile, context=0)
    except ValueError as exc:
        raise ConfigError(f"block shape: {exc}") from None
    provenance = {
        **run_provenance(),  # version, created (UTC), argv
        **model_provenance(affs.attrs),
        "source": resolved_spec(affs.spec),  # one spelling: relative, absolute or via --scheduler
        "offsets": [list(o) for o in offsets],
        "block_shape": list(grid.block_shape),
        "fragment_tile": list(tiles.block_shape),
        "fragment_context": list(fragment_context(anisotropic)),
        "anisotropic": anisotropic,
    }
    frags, frag_markers = _blockwise_output(
        fragments_spec,
        affs,
        grid,
        {"ssn_deploy": provenance | {"stage": "fragments"}},
        resume=resume,
        overwrite=overwrite,
    )
    faces, _ = _blockwise_output(
        faces_spec(fragments_spec),
        affs,
        grid,
        {"ssn_deploy": provenance | {"stage": "fragment face continuity (see stitching.py)"}},
        resume=resume,
        overwrite=overwrite,
        dtype=np.uint8,
    )
    if resume:
        frag_markers.verify(grid, [frags, faces])
    with dask_client(scheduler, workers) as client:
        task = functools.partial(
            _fragment_block, affs, frags, faces, frag_markers, offsets, anisotropic, tiles
        )
        with timed_stage("fragments"):
            _run_stage(client, task, grid, frag_markers, progress, "fragments")
        with timed_stage("fragment_pyramid"):
            finish_stage(frags, client, label=True, progress=progress)
        parts: list[EdgeStats] = []
        vote_parts: list[Votes] = []

        def consume(result: tuple[int, EdgeStats, Votes]) -> int:
            parts.append(result[1])
            vote_parts.append(result[2])
            if len(parts) >= REDUCE_EVERY:  # keep the client's memory O(distinct edges)
                parts[:] = [merge_edge_stats(parts)]
                vote_parts[:] = [merge_votes(vote_parts)]
            return result[0]

        limit = 2 * sum(client.nthreads().values())
        if superblocks:
            store = edge_store(frags.spec, tiles)
            store.clear()  # edges are always recomputed (cheap), also on --resume
            seg, merges = _superblock_stages(
                client, affs, frags, faces, offsets, tiles, grid, store, segmentation_spec,
                provenance, threshold, resume, overwrite, progress,
            )  # fmt: skip
            log.info("super-block agglomeration: %d merges", merges)
            return seg, None
        task = functools.partial(_edge_block, affs, frags, faces, offsets, tuple(tiles.block_shape))
        with timed_stage("edges"):
            run_blocks(client, task, iter(grid), limit, len(grid), 0, progress, "edges", consume)
        with timed_stage("agglomeration"):
            stats = merge_edge_stats(parts)
            mapping = stitch_mapping(*stitched_pairs(merge_votes(vote_parts)))
            stats = merge_stitched(stats, mapping)
            log.info("region graph: %d edges (%d fragments stitched across tile faces)",
                     len(stats), len(mapping))  # fmt: skip
            history = with_stitches(agglomerate(stats, stop=threshold), mapping)
            lookup = history.lookup(threshold)
        seg = _segmentation_stage(
            client, affs, frags, grid, segmentation_spec,
            provenance | {"threshold": threshold},
            lambda seg, markers: functools.partial(_relabel_block, frags, seg, markers, lookup),
            resume=resume, overwrite=overwrite, progress=progress,
        )  # fmt: skip
    return seg, history


def _segmentation_stage(
    client: Any,
    affs: Volume,
    frags: Volume,
    grid: BlockGrid,
    spec: str,
    attrs: dict,
    relabel_task: Any,
    *,
    resume: bool,
    overwrite: bool,
    progress: bool,
) -> Volume:
    """Create (or, resuming, check) the segmentation, run ``relabel_task(seg, markers)`` on
    every unfinished block, then write its pyramid."""
    attrs = attrs | {
        "stage": "segmentation",
        "merge_function": "aff50_his256",
        "fragments": resolved_spec(frags.spec),
    }
    seg, markers = _blockwise_output(
        spec, affs, grid, {"ssn_deploy": attrs}, resume=resume, overwrite=overwrite
    )
    if resume:
        markers.verify(grid, [seg])
    with timed_stage("relabel"):
        _run_stage(client, relabel_task(seg, markers), grid, markers, progress, "segmentation")
    with timed_stage("segmentation_pyramid"):
        finish_stage(seg, client, label=True, progress=progress)
    return seg


def _superblock_stages(
    client: Any,
    affs: Volume,
    frags: Volume,
    faces: Volume,
    offsets: tuple[Offset, ...],
    tiles: BlockGrid,
    grid: BlockGrid,
    store: EdgeStore,
    segmentation_spec: str,
    provenance: dict,
    threshold: float,
    resume: bool,
    overwrite: bool,
    progress: bool,
) -> tuple[Volume, int]:
    """Edges, stitches, routing, one pass per level, relabel: see :mod:`.superblock_store`."""
    limit = 2 * sum(client.nthreads().values())
    vote_parts: list[Votes] = []

    def consume(result: tuple[int, Votes]) -> int:
        vote_parts.append(result[1])
        if len(vote_parts) >= REDUCE_EVERY:
            vote_parts[:] = [merge_votes(vote_parts)]
        return result[0]

    shape = tuple(tiles.block_shape)
    task = functools.partial(_stored_edge_block, affs, frags, faces, offsets, shape, store)
    with timed_stage("edges"):
        run_blocks(client, task, iter(grid), limit, len(grid), 0, progress, "edges", consume)
    with timed_stage("agglomeration"):
        stitches = stitch_mapping(*stitched_pairs(merge_votes(vote_parts)))
        task = functools.partial(_route_block, store, stitches)
        run_blocks(client, task, iter(grid), limit, len(grid), 0, progress, "routing")
        counted: list[int] = []

        def count(result: int) -> int:
            counted.append(result)
            return 0  # no voxels: the bar counts groups

        for level in range(store.levels + 1):
            groups = int(np.prod(-(-np.asarray(tiles.grid_shape) // (1 << level))))
            task = functools.partial(_merge_group_task, store, level, threshold)
            desc = f"super-blocks level {level}"
            run_blocks(client, task, iter(range(groups)), limit, groups, 0, progress, desc, count)
            log.info("super-block level %d: %d groups", level, groups)
        merges = sum(counted)
    seg = _segmentation_stage(
        client, affs, frags, grid, segmentation_spec,
        provenance | {"threshold": threshold,
                      "agglomeration": "super-blocks (ssn_deploy.agglomeration.superblock_store)"},
        lambda seg, markers: functools.partial(
            _stored_relabel_block, frags, seg, markers, store, stitches
        ),
        resume=resume, overwrite=overwrite, progress=progress,
    )  # fmt: skip
    return seg, merges
