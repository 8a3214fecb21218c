"""Super-block agglomeration (:mod:`.superblocks`) as dask tasks over edges kept in storage.

Nothing global passes through the client but the tile-face stitches: every block writes its
edge statistics; a second pass renames stitched fragments and sends each edge to the level
and group where both its ends first share a group (``rows/L{level}/g{group}/b{block}.npz``),
and tells every lower level's groups which of their nodes that edge freezes
(``frozen/L{level}/g{group}/b{block}.npz``). Then, level by level, one task per group reads
its rows (partial statistics of one pair, from several blocks, are summed before the merge
rule takes their highest bin), renames their ends by the maps of the levels below, adds the
deferred edges its children sent up (``up/L{level}/g{group}/c{child}.npz``), merges with
:func:`~.superblocks.merge_group`, writes its map (``map/L{level}/g{group}.npz``: node →
region) and sends its own deferred edges up. A block's segment ids are its fragments renamed
by the stitches and then by the maps of its groups, level after level.

A task holds one group's edges, so memory follows the super-block, not the volume; the files
live beside the fragments (any fsspec URL). ``tests/test_superblocks.py`` checks that the
result equals :func:`~.superblocks.agglomerate_by_groups` on the same graph exactly.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import fastremap
import fsspec
import numpy as np

from ssn_deploy.agglomeration.region_graph import EdgeStats
from ssn_deploy.agglomeration.stitching import merge_stitched
from ssn_deploy.agglomeration.superblocks import (
    GroupOf,
    as_multisets,
    merge_group,
    ordered_pairs,
    sum_duplicates,
)


@dataclass(frozen=True)
class EdgeStore:
    """A folder (fsspec URL) of the files above, and the grouping it was written with."""

    root: str
    group_of: GroupOf
    levels: int
    storage_options: Mapping[str, Any] | None = None

    @functools.cached_property
    def _location(self) -> tuple[Any, str]:
        return fsspec.core.url_to_fs(self.root, **dict(self.storage_options or {}))

    @property
    def fs(self) -> Any:
        return self._location[0]

    def _path(self, name: str) -> str:
        return f"{self._location[1]}/{name}"

    def write(self, name: str, **arrays: np.ndarray) -> None:
        """One ``.npz`` file; a ``histogram`` goes in sparse (:func:`sparse_histogram`)."""
        if "histogram" in arrays:
            arrays |= sparse_histogram(arrays.pop("histogram"))
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        fs = self.fs
        path = self._path(name)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(path, buffer.getvalue())

    def read(self, name: str) -> dict[str, np.ndarray] | None:
        try:
            raw = self.fs.cat_file(self._path(name))
        except FileNotFoundError:
            return None
        return _load(raw)

    def read_all(self, folder: str) -> list[dict[str, np.ndarray]]:
        fs = self.fs
        try:
            names = sorted(fs.ls(self._path(folder), detail=False))
        except FileNotFoundError:
            return []
        return [_load(fs.cat_file(name)) for name in names]

    def clear(self) -> None:
        fs, path = self.fs, self._path("")
        if fs.exists(path):
            fs.rm(path, recursive=True)


SPARSE = ("histogram_indptr", "histogram_bins", "histogram_counts", "histogram_shape")
"""The keys a sparse histogram is stored under (with ``histogram_dtype``)."""


def sparse_histogram(histogram: np.ndarray) -> dict[str, np.ndarray]:
    """Edge histograms ``[n, bins]`` as their non-empty bins only (CSR): a test-region edge has
    ~9 of 256 (``benchmarks/edge_memory.py``); a block's whole edge file then takes ~116 bytes
    per edge against 2,048 for one dense histogram
    (``benchmarks/hierarchical_agglomeration.py``)."""
    rows, bins = np.nonzero(histogram)
    counts = histogram[rows, bins]
    wide = counts.size and (counts.min() < 0 or counts.max() > np.iinfo(np.uint32).max)
    return {
        "histogram_indptr": np.r_[0, np.cumsum(np.bincount(rows, minlength=len(histogram)))],
        "histogram_bins": bins.astype(np.uint8 if histogram.shape[1] <= 256 else np.uint16),
        "histogram_counts": counts if wide else counts.astype(np.uint32),
        "histogram_shape": np.array(histogram.shape, np.int64),
        "histogram_dtype": np.array(histogram.dtype.str),
    }


def dense_histogram(data: Mapping[str, np.ndarray]) -> np.ndarray:
    """:func:`sparse_histogram`'s inverse: the same array, dtype included."""
    indptr = data["histogram_indptr"]
    histogram = np.zeros(tuple(data["histogram_shape"]), np.dtype(str(data["histogram_dtype"])))
    rows = np.repeat(np.arange(len(histogram)), np.diff(indptr))
    histogram[rows, data["histogram_bins"]] = data["histogram_counts"]
    return histogram


def _load(raw: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(raw)) as data:
        arrays = {k: data[k] for k in data.files}
    if SPARSE[0] in arrays:
        arrays["histogram"] = dense_histogram(arrays)
        for key in (*SPARSE, "histogram_dtype"):
            del arrays[key]
    return arrays


def _stats(data: dict[str, np.ndarray]) -> EdgeStats:
    n = len(data["u"])
    return EdgeStats(data["u"], data["v"], np.ones(n, np.int64), np.zeros(n), data["histogram"])


def route_block(
    store: EdgeStore, block_id: int, stats: EdgeStats, stitches: Mapping[int, int]
) -> None:
    """Send a block's edge statistics to the level and group where their ends meet, and mark
    the ends frozen in the groups of every level below."""
    stats = merge_stitched(stats, dict(stitches))
    if not len(stats):
        return
    u, v = stats.u, stats.v
    level = np.full(len(u), -1, np.int64)
    groups_u = [store.group_of(u, k) for k in range(store.levels + 1)]
    groups_v = [store.group_of(v, k) for k in range(store.levels + 1)]
    for k in range(store.levels + 1):
        level[(level < 0) & (groups_u[k] == groups_v[k])] = k
    if (level < 0).any():
        raise ValueError(f"the grouping leaves more than one group at level {store.levels}")
    for k in range(store.levels + 1):
        here = level == k
        for group in np.unique(groups_u[k][here]).tolist():
            rows = here & (groups_u[k] == group)
            store.write(f"rows/L{k}/g{group}/b{block_id}.npz", u=u[rows], v=v[rows],
                        histogram=stats.histogram[rows])  # fmt: skip
        above = level > k  # this edge is still between groups at level k: its ends are frozen
        ends = np.concatenate([u[above], v[above]])
        end_groups = np.concatenate([groups_u[k][above], groups_v[k][above]])
        for group in np.unique(end_groups).tolist():
            store.write(f"frozen/L{k}/g{group}/b{block_id}.npz",
                        ids=np.unique(ends[end_groups == group]))  # fmt: skip


def resolve(store: EdgeStore, ids: np.ndarray, levels: int) -> np.ndarray:
    """``ids`` (stitched fragments) renamed by the maps of levels ``0 … levels − 1``."""
    ids = np.asarray(ids, np.uint64)
    for k in range(levels):
        groups = store.group_of(ids, k)
        out = ids.copy()
        for group in np.unique(groups).tolist():
            data = store.read(f"map/L{k}/g{group}.npz")
            if data is None:
                continue
            here = groups == group
            mapping = dict(zip(data["node"].tolist(), data["region"].tolist(), strict=True))
            out[here] = fastremap.remap(ids[here], mapping, preserve_missing_labels=True)
        ids = out
    return ids


def merge_stored_group(store: EdgeStore, level: int, group: int, stop: float, bins: int) -> int:
    """One group of one level (a dask task): returns the merges it made."""
    rows = store.read_all(f"rows/L{level}/g{group}")
    ups = [_stats(up) for up in store.read_all(f"up/L{level}/g{group}")]
    frozen_parts = [f["ids"] for f in store.read_all(f"frozen/L{level}/g{group}")]
    first = as_multisets(sum_duplicates([_stats(r) for r in rows], bins))  # highest bin per pair
    # Rows and frozen ids name stitched fragments: one pass over the lower levels' maps renames
    # them all (``up`` edges were renamed by the group that sent them).
    frozen = np.concatenate(frozen_parts) if frozen_parts else np.zeros(0, np.uint64)
    ends = [np.asarray(a, np.uint64) for a in (first.u, first.v, frozen)]
    named = resolve(store, np.concatenate(ends), level)
    n = len(first)
    u, v = ordered_pairs(named[:n], named[n : 2 * n])
    graph = sum_duplicates([EdgeStats(u, v, first.count, first.total, first.histogram), *ups], bins)
    if not len(graph):
        return 0
    frozen = np.unique(named[2 * n :])
    region, up = merge_group(graph, frozen, stop)
    nodes = np.fromiter(region.keys(), np.uint64, len(region))
    regions = np.fromiter(region.values(), np.uint64, len(region))
    store.write(f"map/L{level}/g{group}.npz", node=nodes, region=regions)
    if len(up):
        if level == store.levels:
            raise RuntimeError("edges left after the top level")  # no group can freeze there
        parent = int(store.group_of(up.u[:1], level + 1)[0])
        store.write(f"up/L{level + 1}/g{parent}/c{group}.npz", u=up.u, v=up.v,
                    histogram=up.histogram)  # fmt: skip
    return int((nodes != regions).sum())


def segment_ids(store: EdgeStore, fragments: np.ndarray, stitches: Mapping[int, int]) -> np.ndarray:
    """Segment id of every voxel of a block's ``fragments``."""
    flat = np.unique(fragments)
    stitched = fastremap.remap(flat, dict(stitches), preserve_missing_labels=True)
    final = resolve(store, stitched, store.levels + 1)
    lookup = dict(zip(flat.tolist(), final.tolist(), strict=True))
    return fastremap.remap(fragments, lookup, preserve_missing_labels=True)
