"""Property tests for boxes and block grids: exact tilings, clipping, stable ids."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ssn_deploy.geometry import BlockGrid, Box, pad_to_context, tile_starts

shapes = st.tuples(*[st.integers(1, 40)] * 3)
blocks = st.tuples(*[st.integers(1, 17)] * 3)
contexts = st.tuples(*[st.integers(0, 6)] * 3)
offsets = st.tuples(*[st.integers(-20, 20)] * 3)


@settings(max_examples=60, deadline=None)
@given(shape=shapes, block=blocks, context=contexts, offset=offsets)
def test_write_boxes_tile_the_volume_exactly(shape, block, context, offset):
    total = Box(offset, shape)
    grid = BlockGrid(total, block, context)
    cover = np.zeros(shape, dtype=np.int32)
    ids = []
    for b in grid:
        local = b.write_box.relative_to(total)
        cover[local.slices] += 1
        assert total.contains(b.read_box)
        assert b.read_box.contains(b.write_box)
        # context is taken wherever the volume has it
        expected = b.write_box.grow(context).intersect(total)
        assert b.read_box == expected
        assert grid.block_by_id(b.block_id) == b
        ids.append(b.block_id)
    assert (cover == 1).all(), "write boxes must cover every voxel exactly once"
    assert sorted(ids) == list(range(grid.num_blocks)) == list(range(len(grid)))


@settings(max_examples=60, deadline=None)
@given(a_off=offsets, a_shape=shapes, b_off=offsets, b_shape=shapes)
def test_intersection_matches_mask_overlap(a_off, a_shape, b_off, b_shape):
    a, b = Box(a_off, a_shape), Box(b_off, b_shape)
    world = Box((-30, -30, -30), (100, 100, 100))
    ma = np.zeros(world.shape, bool)
    mb = np.zeros(world.shape, bool)
    ma[a.relative_to(world).slices] = True
    mb[b.relative_to(world).slices] = True
    inter = a.intersect(b)
    assert inter.size == int((ma & mb).sum())
    assert inter == b.intersect(a) or inter.empty


@settings(max_examples=40, deadline=None)
@given(offset=offsets, shape=shapes, grow=contexts)
def test_grow_shift_round_trip(offset, shape, grow):
    box = Box(offset, shape)
    grown = box.grow(grow)
    assert grown.shape == tuple(s + 2 * g for s, g in zip(shape, grow, strict=True))
    assert grown.grow(tuple(-g for g in grow)) == box
    assert box.shift(grow).shift(tuple(-g for g in grow)) == box
    assert Box.from_bounds(box.begin, box.end) == box


@settings(max_examples=60, deadline=None)
@given(length=st.integers(1, 300), patch=st.integers(4, 64), overlap=st.integers(0, 3))
def test_tile_starts_cover_with_overlap(length, patch, overlap):
    starts = tile_starts(length, patch, overlap)
    assert starts[0] == 0
    if length > patch:
        assert starts[-1] + patch == length
        gaps = np.diff(starts)
        assert (gaps <= patch - overlap).all() and (gaps > 0).all()


def test_pad_to_context_reports_missing_padding():
    total = Box((0, 0, 0), (10, 10, 10))
    clipped, pad = pad_to_context(Box((0, 4, 8), (2, 2, 2)), (3, 3, 3), total)
    assert clipped == Box((0, 1, 5), (5, 8, 5))
    assert pad == ((3, 0), (0, 0), (0, 3))


def test_invalid_inputs_raise():
    with pytest.raises(ValueError, match="negative"):
        Box((0, 0), (1, -1))
    with pytest.raises(ValueError, match="positive"):
        BlockGrid(Box.from_shape((4, 4, 4)), (0, 2, 2), 0)
    with pytest.raises(IndexError, match="outside grid"):
        BlockGrid(Box.from_shape((4, 4, 4)), (2, 2, 2), 0).block((2, 0, 0))
