"""Boxes and block grids, in voxel units (pure, no I/O).

A :class:`Block` carries the box it *reads* (write box grown by the context, clipped to the
volume) and the box it *writes*. Write boxes tile the volume exactly, and a block's index is
derived from its write box's position in the grid, so reruns of a block write the same place
with the same ids — the basis of resume and of idempotent retries.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

Coord = tuple[int, ...]


def _as_coord(values: Sequence[int] | int, ndim: int | None = None) -> Coord:
    if isinstance(values, int | np.integer):
        if ndim is None:
            raise ValueError("a scalar needs ndim")
        return (int(values),) * ndim
    coord = tuple(int(v) for v in values)
    if ndim is not None and len(coord) != ndim:
        raise ValueError(f"expected {ndim} values, got {len(coord)}")
    return coord


@dataclass(frozen=True)
class Box:
    """An axis-aligned box: ``offset`` (first voxel) and ``shape`` (voxels per axis)."""

    offset: Coord
    shape: Coord

    def __post_init__(self) -> None:
        object.__setattr__(self, "offset", _as_coord(self.offset))
        object.__setattr__(self, "shape", _as_coord(self.shape, len(self.offset)))
        if any(s < 0 for s in self.shape):
            raise ValueError(f"negative shape {self.shape}")

    @classmethod
    def from_bounds(cls, begin: Sequence[int], end: Sequence[int]) -> Box:
        return cls(tuple(begin), tuple(e - b for b, e in zip(begin, end, strict=True)))

    @classmethod
    def from_shape(cls, shape: Sequence[int]) -> Box:
        return cls((0,) * len(shape), tuple(shape))

    @property
    def ndim(self) -> int:
        return len(self.offset)

    @property
    def begin(self) -> Coord:
        return self.offset

    @property
    def end(self) -> Coord:
        return tuple(o + s for o, s in zip(self.offset, self.shape, strict=True))

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def empty(self) -> bool:
        return self.size == 0

    @property
    def slices(self) -> tuple[slice, ...]:
        return tuple(slice(b, e) for b, e in zip(self.begin, self.end, strict=True))

    def shift(self, by: Sequence[int]) -> Box:
        return Box(
            tuple(o + d for o, d in zip(self.offset, _as_coord(by, self.ndim), strict=True)),
            self.shape,
        )

    def grow(self, before: Sequence[int] | int, after: Sequence[int] | int | None = None) -> Box:
        """Grow by ``before`` voxels at each axis start and ``after`` (default: same) at its end."""
        lo = _as_coord(before, self.ndim)
        hi = lo if after is None else _as_coord(after, self.ndim)
        begin = tuple(b - d for b, d in zip(self.begin, lo, strict=True))
        end = tuple(e + d for e, d in zip(self.end, hi, strict=True))
        return Box.from_bounds(begin, end)

    def intersect(self, other: Box) -> Box:
        """The overlap of two boxes; an empty box (shape 0) where they do not meet."""
        begin = tuple(max(a, b) for a, b in zip(self.begin, other.begin, strict=True))
        end = tuple(min(a, b) for a, b in zip(self.end, other.end, strict=True))
        return Box(begin, tuple(max(0, e - b) for b, e in zip(begin, end, strict=True)))

    def contains(self, other: Box) -> bool:
        return all(a <= b for a, b in zip(self.begin, other.begin, strict=True)) and all(
            a >= b for a, b in zip(self.end, other.end, strict=True)
        )

    def relative_to(self, outer: Box) -> Box:
        """This box in the coordinates of ``outer`` (e.g. to crop a block's output)."""
        return Box(tuple(a - b for a, b in zip(self.offset, outer.offset, strict=True)), self.shape)


@dataclass(frozen=True)
class Block:
    """One unit of blockwise work: read ``read_box`` (with context), write ``write_box``."""

    index: Coord
    block_id: int
    read_box: Box
    write_box: Box


@dataclass(frozen=True)
class BlockGrid:
    """A grid of write boxes tiling ``total`` exactly; read boxes grown by ``context``.

    ``context`` is clipped to the volume: blocks on the border read less, and the caller pads
    (e.g. reflect) to the context the model needs. ``block_id`` is the row-major (C-order) index
    of the block, so ids are stable across runs and machines.
    """

    total: Box
    block_shape: Coord
    context: Coord

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_shape", _as_coord(self.block_shape, self.total.ndim))
        object.__setattr__(self, "context", _as_coord(self.context, self.total.ndim))
        if any(b <= 0 for b in self.block_shape):
            raise ValueError(f"block shape must be positive, got {self.block_shape}")
        if any(c < 0 for c in self.context):
            raise ValueError(f"context must be non-negative, got {self.context}")

    @property
    def grid_shape(self) -> Coord:
        return tuple(-(-s // b) for s, b in zip(self.total.shape, self.block_shape, strict=True))

    @property
    def num_blocks(self) -> int:
        return int(np.prod(self.grid_shape, dtype=np.int64))

    def block(self, index: Sequence[int]) -> Block:
        index = _as_coord(index, self.total.ndim)
        if any(not 0 <= i < g for i, g in zip(index, self.grid_shape, strict=True)):
            raise IndexError(f"block index {index} outside grid {self.grid_shape}")
        begin = tuple(
            o + i * b for o, i, b in zip(self.total.offset, index, self.block_shape, strict=True)
        )
        write = Box(begin, self.block_shape).intersect(self.total)
        read = write.grow(self.context).intersect(self.total)
        block_id = int(np.ravel_multi_index(index, self.grid_shape))
        return Block(index=index, block_id=block_id, read_box=read, write_box=write)

    def block_by_id(self, block_id: int) -> Block:
        return self.block(tuple(int(i) for i in np.unravel_index(block_id, self.grid_shape)))

    def __iter__(self) -> Iterator[Block]:
        for index in itertools.product(*(range(g) for g in self.grid_shape)):
            yield self.block(index)

    def __len__(self) -> int:
        return self.num_blocks


def pad_to_context(
    box: Box, context: Sequence[int], total: Box
) -> tuple[Box, tuple[tuple[int, int], ...]]:
    """The box grown by ``context``, clipped to ``total``, and the padding still missing per axis.

    Callers read the clipped box and pad the array by the returned widths (e.g. with
    ``np.pad(mode="reflect")``) so every block sees the same amount of context.
    """
    wanted = box.grow(context)
    clipped = wanted.intersect(total)
    pad = tuple(
        (cb - wb, we - ce)
        for wb, we, cb, ce in zip(wanted.begin, wanted.end, clipped.begin, clipped.end, strict=True)
    )
    return clipped, pad


def tile_starts(length: int, patch: int, overlap: int) -> list[int]:
    """Start positions of patches of size ``patch`` covering ``[0, length)`` with at least
    ``overlap`` voxels of overlap; the last patch ends exactly at ``length``."""
    if patch <= 0:
        raise ValueError("patch must be positive")
    if length <= patch:
        return [0]
    stride = patch - overlap
    if stride <= 0:
        raise ValueError(f"overlap {overlap} must be smaller than patch {patch}")
    n = -(-(length - patch) // stride) + 1
    return sorted({round(i * (length - patch) / (n - 1)) for i in range(n)})


def anisotropy(voxel_size: Sequence[float]) -> float:
    """Section thickness over the in-plane pixel size, z / mean(y, x): 1 for isotropic data."""
    return float(voxel_size[0]) / ((float(voxel_size[1]) + float(voxel_size[2])) / 2)
