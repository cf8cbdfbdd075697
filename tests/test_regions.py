"""Connected components merged across chunk faces equal scipy.ndimage.label on the whole mask."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from pipeline.geometry import TileGrid
from pipeline.regions import UnionFind, face_pairs, label_chunk, structure
from pipeline.stats import NODATA


def chunked_regions(mask: np.ndarray, chunk: tuple[int, ...], connectivity: int) -> np.ndarray:
    """Label chunk by chunk, merge across faces by union-find, relabel: what a job does, in one process."""
    grid = TileGrid.create(mask.shape, chunk=chunk, halo=(0,) * mask.ndim, stride=(1,) * mask.ndim,
                           chunks_per_unit=(1,) * mask.ndim)  # fmt: skip
    ids = np.zeros(mask.shape, dtype=np.int64)
    classes = [0]
    for unit in grid.units():
        box = unit.chunks[0]
        local = label_chunk(mask[box.slices()], connectivity=connectivity)
        offset = len(classes) - 1
        ids[box.slices()] = np.where(local.ids > 0, local.ids + offset, 0)
        classes.extend(local.classes[1:].tolist())
    cls = np.asarray(classes)
    sets = UnionFind(len(cls))
    for axis in range(mask.ndim):
        for cut in range(chunk[axis], mask.shape[axis], chunk[axis]):
            low = np.take(ids, cut - 1, axis=axis)
            high = np.take(ids, cut, axis=axis)
            for a, b in face_pairs(low, high, cls, connectivity=connectivity):
                sets.union(a, b)
    roots = sets.roots()
    return np.where(ids > 0, roots[ids], 0)


def assert_same_partition(ours: np.ndarray, mask: np.ndarray, connectivity: int) -> None:
    struct = structure(mask.ndim, connectivity)
    expected = np.zeros(mask.shape, dtype=np.int64)
    offset = 0
    for cls in np.unique(mask):
        if cls == NODATA:
            continue
        lab, n = ndimage.label(mask == cls, structure=struct)
        expected[lab > 0] = lab[lab > 0] + offset
        offset += n
    assert ((ours > 0) == (expected > 0)).all()
    pairs = np.unique(np.stack([ours[ours > 0], expected[expected > 0]]), axis=1)
    # A bijection between our regions and scipy's: same count, and each maps to exactly one.
    assert len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1] == offset


@given(
    st.integers(1, 40), st.integers(1, 40), st.integers(1, 9), st.integers(1, 9),
    st.sampled_from([4, 8]), st.integers(0, 2**32 - 1), st.floats(0.2, 0.8),
)  # fmt: skip
@settings(max_examples=150, deadline=None)
def test_2d_chunked_components_equal_scipy(rows, cols, ch, cw, connectivity, seed, density) -> None:
    rng = np.random.default_rng(seed)
    mask = np.where(rng.random((rows, cols)) < density, rng.integers(0, 3, (rows, cols)), NODATA).astype(np.uint8)
    assert_same_partition(chunked_regions(mask, (ch, cw), connectivity), mask, connectivity)


@given(st.integers(1, 12), st.integers(1, 4), st.sampled_from([6, 18, 26]), st.integers(0, 2**32 - 1))
@settings(max_examples=60, deadline=None)
def test_3d_chunked_components_equal_scipy(size, ch, connectivity, seed) -> None:
    rng = np.random.default_rng(seed)
    mask = np.where(rng.random((size, size + 1, size + 2)) < 0.5, 1, NODATA).astype(np.uint8)
    assert_same_partition(chunked_regions(mask, (ch, ch, ch), connectivity), mask, connectivity)


def test_a_spiral_spanning_many_chunks_is_one_region() -> None:
    n = 41
    mask = np.full((n, n), NODATA, dtype=np.uint8)
    top, left, bottom, right = 0, 0, n - 1, n - 1
    while top <= bottom and left <= right:  # a square spiral of width 1 with gaps of 1
        mask[top, left : right + 1] = 1
        mask[top : bottom + 1, right] = 1
        if top + 2 <= bottom:
            mask[bottom, left : right + 1] = 1
        if left + 2 <= right:
            mask[top + 2 : bottom + 1, left] = 1
        top, left, bottom, right = top + 2, left + 2, bottom - 2, right - 2
    regions = chunked_regions(mask, (5, 5), 4)
    assert_same_partition(regions, mask, 4)
    assert len(np.unique(regions[regions > 0])) == ndimage.label(mask == 1)[1]


def test_a_u_shape_connects_only_far_away() -> None:
    mask = np.full((60, 30), NODATA, dtype=np.uint8)
    mask[:, 2] = mask[:, 27] = mask[59, 2:28] = 2  # two arms joined only at the bottom row
    regions = chunked_regions(mask, (8, 8), 4)
    assert len(np.unique(regions[regions > 0])) == 1


def test_unknown_connectivity() -> None:
    with pytest.raises(ValueError, match="connectivity 6 does not exist in 2-D"):
        structure(2, 6)
