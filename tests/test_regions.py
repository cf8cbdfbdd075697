"""Connected components merged across chunk faces equal scipy.ndimage.label on the whole mask."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from pipeline.core.geometry import TileGrid
from pipeline.core.regions import (
    RegionStats,
    cut_pairs,
    cuts,
    face_slices,
    label_chunk,
    merge,
    region_stats,
    structure,
)
from pipeline.core.stats import NODATA
from tests.conftest import scipy_table


def chunked_regions(
    mask: np.ndarray, chunk: tuple[int, ...], connectivity: int, intensity: np.ndarray | None = None
) -> tuple[np.ndarray, RegionStats]:
    """Label chunk by chunk, merge across faces, relabel and fold the table: a job's steps, in one process."""
    grid = TileGrid.create(mask.shape, chunk=chunk, halo=(0,) * mask.ndim, stride=(1,) * mask.ndim,
                           chunks_per_unit=(1,) * mask.ndim)  # fmt: skip
    boxes = [grid.chunk_box(i) for i in np.ndindex(*grid.grid_shape)]
    labelled = [label_chunk(mask[b.slices()], connectivity=connectivity) for b in boxes]
    counts = [c.count for c in labelled]
    offsets = np.concatenate([[0], np.cumsum(counts)])
    flat = {index: i for i, index in enumerate(np.ndindex(*grid.grid_shape))}

    def face(index: tuple[int, ...], axis: int, side: int) -> tuple[np.ndarray, np.ndarray]:
        c = flat[index]
        ids = face_slices(labelled[c].ids, axis)[side]
        return np.where(ids > 0, ids + offsets[c], 0), face_slices(mask[boxes[c].slices()], axis)[side]

    pairs = [np.zeros((0, 2), dtype=np.int64)]
    pairs += [cut_pairs(grid, axis, layer, face, connectivity=connectivity) for axis, layer in cuts(grid.grid_shape)]
    plan = merge(counts, np.concatenate(pairs))
    out = np.zeros(mask.shape, dtype=np.uint32)
    bands = 0 if intensity is None else intensity.shape[0]
    table = RegionStats.empty(plan.n_regions, mask.ndim, bands)
    for c, (box, lab) in enumerate(zip(boxes, labelled)):
        lookup = plan.lookup(c)
        out[box.slices()] = lookup[lab.ids]
        values = None if intensity is None else intensity[(slice(None), *box.slices())]
        stats = region_stats(lab, box.start, pixel_measure=1.0, intensity=values)
        table.fold(lookup[1:].astype(np.int64) - 1, stats)
    return out, table


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


def table_rows(table: RegionStats) -> list[tuple]:
    return sorted(
        (int(c), int(p), *[(int(x), int(y)) for x, y in zip(a, b)])
        for c, p, a, b in zip(table.classes, table.pixels, table.start, table.stop)
    )


def scipy_regions(mask: np.ndarray, connectivity: int) -> list[tuple]:
    return scipy_table(mask, connectivity)[0]


def assert_table_matches(table: RegionStats, ours: np.ndarray, mask: np.ndarray) -> None:
    """Row r describes region r + 1 of ``ours``; the rows equal scipy's regions as a multiset."""
    n = len(table)
    assert ours.max(initial=0) == n and (n == 0 or np.array_equal(np.unique(ours[ours > 0]), np.arange(1, n + 1)))
    assert (table.pixels == np.bincount(ours.ravel(), minlength=n + 1)[1:]).all()
    for r, box in enumerate(ndimage.find_objects(ours.astype(np.int64), max_label=n)):
        assert tuple(table.start[r]) == tuple(s.start for s in box)
        assert tuple(table.stop[r]) == tuple(s.stop for s in box)
        assert table.classes[r] == mask[tuple(np.argwhere(ours == r + 1)[0])]
    if n:
        centroids = np.asarray(ndimage.center_of_mass(ours > 0, ours, np.arange(1, n + 1))).reshape(n, -1)
        np.testing.assert_allclose(table.index_sum / table.pixels[:, None], centroids, rtol=1e-12, atol=1e-9)


@given(
    st.integers(1, 40), st.integers(1, 40), st.integers(1, 9), st.integers(1, 9),
    st.sampled_from([4, 8]), st.integers(0, 2**32 - 1), st.floats(0.2, 0.8),
)  # fmt: skip
@settings(max_examples=150, deadline=None)
def test_2d_chunked_components_equal_scipy(rows, cols, ch, cw, connectivity, seed, density) -> None:
    rng = np.random.default_rng(seed)
    mask = np.where(rng.random((rows, cols)) < density, rng.integers(0, 3, (rows, cols)), NODATA).astype(np.uint8)
    ours, table = chunked_regions(mask, (ch, cw), connectivity)
    assert_same_partition(ours, mask, connectivity)
    assert_table_matches(table, ours, mask)
    assert table_rows(table) == scipy_regions(mask, connectivity)


@given(st.integers(1, 12), st.integers(1, 4), st.sampled_from([6, 18, 26]), st.integers(0, 2**32 - 1))
@settings(max_examples=60, deadline=None)
def test_3d_chunked_components_equal_scipy(size, ch, connectivity, seed) -> None:
    rng = np.random.default_rng(seed)
    mask = np.where(rng.random((size, size + 1, size + 2)) < 0.5, 1, NODATA).astype(np.uint8)
    ours, table = chunked_regions(mask, (ch, ch, ch), connectivity)
    assert_same_partition(ours, mask, connectivity)
    assert_table_matches(table, ours, mask)
    assert table_rows(table) == scipy_regions(mask, connectivity)


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
    regions, _ = chunked_regions(mask, (5, 5), 4)
    assert_same_partition(regions, mask, 4)
    assert len(np.unique(regions[regions > 0])) == ndimage.label(mask == 1)[1]


def test_a_u_shape_connects_only_far_away() -> None:
    mask = np.full((60, 30), NODATA, dtype=np.uint8)
    mask[:, 2] = mask[:, 27] = mask[59, 2:28] = 2  # two arms joined only at the bottom row
    regions, _ = chunked_regions(mask, (8, 8), 4)
    assert len(np.unique(regions[regions > 0])) == 1


def test_unknown_connectivity() -> None:
    with pytest.raises(ValueError, match="connectivity 6 does not exist in 2-D"):
        structure(2, 6)


def test_a_region_touching_all_four_edges_and_many_chunks() -> None:
    mask = np.zeros((37, 53), dtype=np.uint8)  # class 0 frame around the image, class 1 blobs inside
    mask[3:-3, 3:-3] = 1
    mask[10:12, :] = mask[:, 20:22] = 0  # a cross joining the frame through the middle
    ours, table = chunked_regions(mask, (4, 6), 4)
    assert_same_partition(ours, mask, 4)
    assert table_rows(table) == scipy_regions(mask, 4)
    frame = int(ours[0, 0])
    assert frame == ours[-1, -1] == ours[0, -1] == ours[-1, 0]
    assert tuple(table.start[frame - 1]) == (0, 0) and tuple(table.stop[frame - 1]) == mask.shape


def test_intensity_means_and_ids_follow_the_documented_order() -> None:
    rng = np.random.default_rng(7)
    mask = np.where(rng.random((30, 30)) < 0.6, rng.integers(0, 2, (30, 30)), NODATA).astype(np.uint8)
    intensity = rng.normal(size=(2, 30, 30))
    ours, table = chunked_regions(mask, (7, 9), 8, intensity)
    for r in range(len(table)):
        inside = ours == r + 1
        np.testing.assert_allclose(table.intensity_sum[r] / table.pixels[r], intensity[:, inside].mean(axis=1))
    # Regions inside one chunk come first, in chunk order; ids that cross faces come last.
    crossing = [r for r in range(len(table)) if table.start[r][0] // 7 != (table.stop[r][0] - 1) // 7
                or table.start[r][1] // 9 != (table.stop[r][1] - 1) // 9]  # fmt: skip
    assert crossing == list(range(len(table) - len(crossing), len(table)))
