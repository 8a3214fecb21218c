"""Segmentation metrics: VOI split/merge, adapted Rand error, CREMI score (pure, no I/O).

Everything is computed from a sparse contingency table, the voxel count of every distinct
(segment id, ground-truth body id) pair. The table is filled block by block, so memory is
O(block + distinct pairs) whatever the volume size, and tables of disjoint blocks merge, so
blocks can be counted in parallel and reduced afterwards. Lower is better for every error.

- ``voi_split`` = H(seg | gt) and ``voi_merge`` = H(gt | seg), in bits (log base 2);
  ``voi`` is their sum.
- ``arand`` = 1 − F-score of the Rand precision and recall, defined as in
  :func:`skimage.metrics.adapted_rand_error` (pairs of distinct voxels). ``rand_precision`` is
  the fraction of voxel pairs in one predicted segment that are also in one gt body (merges
  lower it); ``rand_recall`` the fraction of pairs in one gt body that are also in one segment
  (splits lower it). scikit-image returns these two swapped relative to its own docstring
  (scikit-image issue #6485); its ``are`` is identical to ours.
- ``cremi_score`` = sqrt(voi · arand).
- ``n_gt_bodies`` and ``n_seg_segments`` count the ids present in the evaluated voxels.

Treatment of 0 and ignored ids:

- Ground truth 0 (background / unknown) and every id in ``ignore_ids`` are ignored: those
  voxels are left out of every metric, whatever the prediction says there.
- Predicted 0 is one ordinary segment. An all-zero prediction is therefore one maximal merge
  (high ``voi_merge`` and ``arand``): leaving voxels unlabelled is penalised, never rewarded.
  This equals scikit-image's ``variation_of_information(gt, seg, ignore_labels=[0, ...])`` and
  ``adapted_rand_error(gt, seg, ignore_labels=[0, ...])``, whose ``ignore_labels`` act on the
  ground truth only (note that ``variation_of_information`` ignores nothing by default).
  (The CREMI challenge's reference Rand code differs: it treats predicted-0 voxels roughly as
  singletons and sums squared sizes rather than pairs; its VOI treats predicted 0 as ours.)

Split and merge counts are diagnostics, not metrics, defined by majority overlap so that
boundary disagreements do not count: every segment is assigned to the gt body it overlaps most
and every gt body to the segment that holds most of it, each assignment counting only when it
covers at least ``min_overlap`` voxels (default 100, which also skips specks). A gt body is
*split* when two or more segments are assigned to it; a segment is *merged* when two or more gt
bodies are assigned to it. Predicted 0 takes part like any segment.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import fastremap
import numpy as np

from ssn_deploy.errors import InvalidInputError, ShapeMismatchError, VoxelSizeError
from ssn_deploy.geometry import BlockGrid, Box

MIN_OVERLAP = 100
_BLOCK_VOXELS = 1 << 21  # 16 MiB of uint64 per block: as fast as bigger ones, and streams
_DENSE_MAX = 1 << 22  # count pairs with bincount when the dense key space is at most this
_PENDING_MIN = 1 << 16  # pending pair rows tolerated before reducing, whatever the table size

Pairs = tuple[np.ndarray, np.ndarray, np.ndarray]


class LabelVolume(Protocol):
    """What :func:`evaluate` reads: a numpy array, an h5py/zarr array or a project Volume."""

    shape: tuple[int, ...]
    dtype: np.dtype

    def __getitem__(self, key: Any) -> Any: ...


def _as_ids(values: Iterable[int]) -> np.ndarray:
    """Label ids as uint64; negative ids wrap exactly as ``astype(np.uint64)`` wraps arrays."""
    return np.array([int(v) % (1 << 64) for v in values], dtype=np.uint64)


def _compact(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Renumber labels to 0..n-1 (hashing, O(voxels)); return them and the original ids."""
    local, mapping = fastremap.renumber(labels, start=0, preserve_zero=False, in_place=False)
    ids = np.empty(len(mapping), dtype=labels.dtype)
    ids[np.fromiter(mapping.values(), np.intp, len(mapping))] = np.fromiter(
        mapping.keys(), labels.dtype, len(mapping)
    )
    return local, ids


def pair_counts(seg: np.ndarray, gt: np.ndarray) -> Pairs:
    """Distinct (seg id, gt id) pairs of one block and their voxel counts (unsorted)."""
    seg_local, seg_ids = _compact(np.ascontiguousarray(seg))
    gt_local, gt_ids = _compact(np.ascontiguousarray(gt))
    n_gt = gt_ids.size
    key = seg_local.astype(np.intp).ravel()
    key *= n_gt
    key += gt_local.ravel()
    n_keys = seg_ids.size * n_gt
    if n_keys <= max(_DENSE_MAX, 2 * key.size):
        counts = np.bincount(key, minlength=n_keys)
        keys = np.flatnonzero(counts)
        counts = counts[keys]
    else:
        key_local, keys = _compact(key)
        counts = np.bincount(key_local)
    return (
        seg_ids[keys // n_gt].astype(np.uint64),
        gt_ids[keys % n_gt].astype(np.uint64),
        counts.astype(np.int64),
    )


def _sum_duplicates(seg: np.ndarray, gt: np.ndarray, count: np.ndarray) -> Pairs:
    """Add up the counts of repeated pairs; the result is sorted by (seg id, gt id)."""
    order = np.lexsort((gt, seg))
    seg, gt, count = seg[order], gt[order], count[order]
    if count.size == 0:
        return seg, gt, count
    first = np.flatnonzero(np.r_[True, (seg[1:] != seg[:-1]) | (gt[1:] != gt[:-1])])
    return seg[first], gt[first], np.add.reduceat(count, first)


class Contingency:
    """Sparse voxel counts per (segment id, gt body id), filled block by block.

    Voxels whose gt id is 0 or in ``ignore_gt`` are counted in ``n_ignored`` only. Pending
    blocks are reduced once they outgrow the reduced table, which keeps memory within a small
    multiple of the number of distinct pairs.
    """

    def __init__(self, ignore_gt: Iterable[int] = ()) -> None:
        self.ignore_gt = np.unique(_as_ids((0, *ignore_gt)))
        self.n_ignored = 0
        self._parts: list[Pairs] = []
        self._n_pending = 0
        self._n_reduced = 0

    def update(self, seg: np.ndarray, gt: np.ndarray) -> None:
        """Count the voxel pairs of one block (any shape, the two shapes equal)."""
        seg, gt = np.asarray(seg), np.asarray(gt)
        if seg.shape != gt.shape:
            raise ShapeMismatchError(f"block shapes differ: seg {seg.shape}, gt {gt.shape}")
        if seg.size == 0:
            return
        s, g, c = pair_counts(seg, gt)
        keep = ~np.isin(g, self.ignore_gt)
        self.n_ignored += int(c[~keep].sum())
        self._add((s[keep], g[keep], c[keep]))

    def merge(self, other: Contingency) -> Contingency:
        """A new table counting the blocks of both (e.g. two halves reduced in parallel)."""
        if not np.array_equal(self.ignore_gt, other.ignore_gt):
            raise ValueError("cannot merge tables that ignore different gt ids")
        out = Contingency(int(i) for i in self.ignore_gt)
        out.n_ignored = self.n_ignored + other.n_ignored
        out._add(self.pairs)
        out._add(other.pairs)
        return out

    @property
    def pairs(self) -> Pairs:
        """(seg ids, gt ids, voxel counts), one row per distinct pair, sorted by (seg, gt)."""
        self._reduce()
        if not self._parts:
            empty = np.zeros(0, np.uint64)
            return empty, empty, np.zeros(0, np.int64)
        return self._parts[0]

    @property
    def n_voxels(self) -> int:
        """Voxels counted, ignored ones excluded."""
        return int(self.pairs[2].sum())

    def _add(self, pairs: Pairs) -> None:
        self._parts.append(pairs)
        self._n_pending += pairs[2].size
        if self._n_pending > 2 * self._n_reduced + _PENDING_MIN:
            self._reduce()

    def _reduce(self) -> None:
        if len(self._parts) > 1 or self._n_pending:
            merged = _sum_duplicates(
                *(np.concatenate(col) for col in zip(*self._parts, strict=True))
            )
            self._parts = [merged]
            self._n_reduced = merged[2].size
            self._n_pending = 0


def _group_sizes(ids: np.ndarray, count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Size of each distinct id, and for every row the index of its id."""
    _, row_group = np.unique(ids, return_inverse=True)
    return np.bincount(row_group, weights=count), row_group


def voi(table: Contingency) -> tuple[float, float]:
    """(split, merge) = (H(seg | gt), H(gt | seg)) in bits; (0, 0) when nothing is counted.

    Each pair contributes c·log2(size / c) ≥ 0, which is exactly 0 when a pair fills its body,
    so identical segmentations score exactly 0.
    """
    seg, gt, count = table.pairs
    if count.size == 0:
        return 0.0, 0.0
    c = count.astype(np.float64)
    seg_size, seg_row = _group_sizes(seg, c)
    gt_size, gt_row = _group_sizes(gt, c)
    n = c.sum()
    split = np.sum(c * np.log2(gt_size[gt_row] / c)) / n
    merge = np.sum(c * np.log2(seg_size[seg_row] / c)) / n
    return float(split), float(merge)


def _same_label_pairs(sizes: np.ndarray) -> float:
    """Σ s(s−1): ordered pairs of distinct voxels sharing a label (exactly rounded sum)."""
    s = sizes.astype(np.float64)
    return math.fsum(s * (s - 1.0))


def _ratio(num: float, den: float) -> float:
    """num / den, with 0/0 = 1: no pairs to get wrong means nothing is wrong."""
    return num / den if den else 1.0


def adapted_rand(table: Contingency) -> tuple[float, float, float]:
    """(adapted Rand error, Rand precision, Rand recall); error = 1 − F-score (alpha 0.5)."""
    seg, gt, count = table.pairs
    both = _same_label_pairs(count)
    in_seg = _same_label_pairs(_group_sizes(seg, count)[0])
    in_gt = _same_label_pairs(_group_sizes(gt, count)[0])
    fscore = _ratio(2.0 * both, in_seg + in_gt)
    return 1.0 - fscore, _ratio(both, in_seg), _ratio(both, in_gt)


def cremi_score(voi_total: float, arand: float) -> float:
    """Geometric mean of VOI (split + merge) and adapted Rand error, as in the CREMI challenge."""
    return math.sqrt(voi_total * arand)


def _best_rows(group: np.ndarray, count: np.ndarray) -> np.ndarray:
    """For each group, the row with the largest count (the first such row on ties)."""
    order = np.lexsort((-count, group))
    sorted_group = group[order]
    return order[np.flatnonzero(np.r_[True, sorted_group[1:] != sorted_group[:-1]])]


def split_merge_counts(table: Contingency, *, min_overlap: int = MIN_OVERLAP) -> tuple[int, int]:
    """(gt bodies split, segments merged) by majority overlap; see the module docstring.

    A segment assigned to body j because it holds most of its voxels there splits j if another
    segment is assigned to j too; a few boundary voxels given to a neighbour change nothing.
    """
    seg, gt, count = table.pairs
    if count.size == 0:
        return 0, 0
    _, seg_row = np.unique(seg, return_inverse=True)
    _, gt_row = np.unique(gt, return_inverse=True)
    seg_home = _best_rows(seg_row, count)
    seg_home = seg_home[count[seg_home] >= min_overlap]
    gt_home = _best_rows(gt_row, count)
    gt_home = gt_home[count[gt_home] >= min_overlap]
    n_split = np.count_nonzero(np.bincount(gt_row[seg_home]) >= 2)
    n_merged = np.count_nonzero(np.bincount(seg_row[gt_home]) >= 2)
    return int(n_split), int(n_merged)


def scores(table: Contingency, *, min_overlap: int = MIN_OVERLAP) -> dict[str, Any]:
    """Every metric of a filled table, as a JSON-ready dict (see the module docstring)."""
    split, merge = voi(table)
    are, precision, recall = adapted_rand(table)
    n_split, n_merged = split_merge_counts(table, min_overlap=min_overlap)
    seg, gt, _ = table.pairs
    return {
        "voi_split": split,
        "voi_merge": merge,
        "voi": split + merge,
        "arand": are,
        "rand_precision": precision,
        "rand_recall": recall,
        "cremi_score": cremi_score(split + merge, are),
        "n_split_bodies": n_split,
        "n_merged_segments": n_merged,
        "n_gt_bodies": int(np.unique(gt).size),
        "n_seg_segments": int(np.unique(seg).size),
        "n_voxels_evaluated": table.n_voxels,
        "n_voxels_ignored": table.n_ignored,
        "ignored_ids": [int(i) for i in table.ignore_gt],
        "min_overlap": min_overlap,
    }


def _describe(name: str, volume: LabelVolume) -> str:
    spec = getattr(volume, "spec", None)
    where = f" {spec}" if spec else ""
    return f"{name}{where} (shape {tuple(volume.shape)}, {np.dtype(volume.dtype)})"


def check_inputs(seg: LabelVolume, gt: LabelVolume) -> None:
    """Fail before any block is read: rank 3, integer labels, equal shapes and voxel sizes."""
    for name, volume in (("segmentation", seg), ("ground truth", gt)):
        if len(volume.shape) != 3:
            raise InvalidInputError(
                f"{_describe(name, volume)} has {len(volume.shape)} axes; expected 3 (z, y, x)"
            )
        dtype = np.dtype(volume.dtype)
        if not (np.issubdtype(dtype, np.integer) or dtype == np.bool_):
            raise InvalidInputError(
                f"{_describe(name, volume)} is not a label volume: ids must be integers"
                " (was raw EM or a probability map passed by mistake?)"
            )
    if tuple(seg.shape) != tuple(gt.shape):
        raise ShapeMismatchError(
            f"shapes differ: segmentation {tuple(seg.shape)}, ground truth {tuple(gt.shape)}"
            " (z, y, x)"
        )
    seg_vs, gt_vs = getattr(seg, "voxel_size", None), getattr(gt, "voxel_size", None)
    if seg_vs is not None and gt_vs is not None and not np.allclose(seg_vs, gt_vs):
        raise VoxelSizeError(
            f"voxel sizes differ: segmentation {tuple(float(v) for v in seg_vs)} nm,"
            f" ground truth {tuple(float(v) for v in gt_vs)} nm (z, y, x)"
        )


def default_chunk_shape(volume: LabelVolume) -> tuple[int, ...]:
    """Whole z-slabs of about 2 M voxels, aligned to the storage chunks' z when known."""
    shape = tuple(int(s) for s in volume.shape)
    depth = max(1, _BLOCK_VOXELS // max(1, math.prod(shape[1:])))
    chunks = getattr(volume, "chunks", None)
    if chunks and isinstance(chunks[0], int | np.integer) and depth > chunks[0]:
        depth -= depth % int(chunks[0])
    return (depth, *shape[1:])


def contingency(
    seg: LabelVolume,
    gt: LabelVolume,
    *,
    ignore_ids: Iterable[int] = (),
    chunk_shape: Sequence[int] | None = None,
) -> Contingency:
    """Fill a table block by block (z-slabs by default), reading each block once."""
    table = Contingency(ignore_ids)
    shape = tuple(int(s) for s in gt.shape)
    grid = BlockGrid(Box.from_shape(shape), tuple(chunk_shape or default_chunk_shape(gt)), 0)
    for block in grid:
        slices = block.write_box.slices
        table.update(np.asarray(seg[slices]), np.asarray(gt[slices]))
    return table


def evaluate(
    seg: LabelVolume,
    gt: LabelVolume,
    *,
    ignore_ids: Iterable[int] = (),
    chunk_shape: Sequence[int] | None = None,
    min_overlap: int = MIN_OVERLAP,
) -> dict[str, Any]:
    """Compare a segmentation with ground truth (z, y, x label volumes); see the module doc."""
    check_inputs(seg, gt)
    table = contingency(seg, gt, ignore_ids=ignore_ids, chunk_shape=chunk_shape)
    if table.n_voxels == 0:
        raise InvalidInputError("nothing to evaluate: every ground-truth voxel is 0 or ignored")
    return scores(table, min_overlap=min_overlap)
