"""Axial-through mixing masks and mixed views for IIC (DESIGN §2, "Training").

A mask is one y-x pattern repeated through every section (constant along z), so mixing never
invents a boundary *between* sections of serial-section data. Two kinds, drawn 50/50:

- a box covering ``box_fraction`` of each in-plane axis (the paper's 90×90 in 160×160 crops,
  0.5625) at a random position, pasted inside or outside (the mask or its complement) 50/50;
- two of the four quadrants.

``mix(a, b, m) = m·a + (1 − m)·b``. Affinity targets are computed per source *before* mixing
and mixed with the same mask, so each voxel keeps its own source's target. An affinity edge
whose two voxels lie on different sides of the mask border joins two images, so it has no true
target: :func:`edge_weights` gives it weight 0 (documented choice, tested), as does every
edge outside the region a loss term is restricted to.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ssn_deploy.affinities import at_offset

Offset = Sequence[int]


def box_mask(
    shape: Sequence[int], rng: np.random.Generator, box_fraction: float = 0.5625
) -> np.ndarray:
    """float32 ``[Z, Y, X]``: an in-plane box (or its complement), the same in every section."""
    z, y, x = shape
    by, bx = max(1, round(y * box_fraction)), max(1, round(x * box_fraction))
    y0, x0 = int(rng.integers(0, y - by + 1)), int(rng.integers(0, x - bx + 1))
    plane = np.zeros((y, x), np.float32)
    plane[y0 : y0 + by, x0 : x0 + bx] = 1.0
    if rng.random() < 0.5:
        plane = 1.0 - plane
    return np.ascontiguousarray(np.broadcast_to(plane, (z, y, x)))


def quadrant_mask(shape: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """float32 ``[Z, Y, X]``: two of the four in-plane quadrants, the same in every section."""
    z, y, x = shape
    plane = np.zeros((y, x), np.float32)
    for q in rng.choice(4, size=2, replace=False):
        ys = slice(0, y // 2) if q < 2 else slice(y // 2, y)
        xs = slice(0, x // 2) if q % 2 == 0 else slice(x // 2, x)
        plane[ys, xs] = 1.0
    return np.ascontiguousarray(np.broadcast_to(plane, (z, y, x)))


def random_mask(
    shape: Sequence[int], rng: np.random.Generator, box_fraction: float = 0.5625
) -> np.ndarray:
    """A box or a quadrant mask, 50/50."""
    if rng.random() < 0.5:
        return box_mask(shape, rng, box_fraction)
    return quadrant_mask(shape, rng)


def mix(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``mask·a + (1 − mask)·b``; the mask broadcasts over leading (channel, batch) axes."""
    return (mask * a + (1.0 - mask) * b).astype(np.float32)


def edge_weights(
    mask: np.ndarray, offsets: Sequence[Offset], side: float | None = None
) -> np.ndarray:
    """float32 ``[C, Z, Y, X]``: 1 for edges whose two voxels lie on one side of the mask
    border, 0 for edges that cross it. With ``side`` (1 or 0), only edges wholly inside that
    side of the mask count."""
    out = np.empty((len(offsets), *mask.shape), np.float32)
    for c, offset in enumerate(offsets):
        other = at_offset(mask, offset)
        same = mask == other
        if side is not None:
            same &= mask == side
        out[c] = same
    return out
