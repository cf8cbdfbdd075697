"""Property tests of the pure tiling geometry."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.core.geometry import Box, TileGrid, ceil_to, inside_image, pad_to_window


@st.composite
def grids(draw: st.DrawFn, dims: int = 2) -> TileGrid:
    stride = tuple(draw(st.sampled_from([1, 2, 4, 8])) for _ in range(dims))
    chunk = tuple(s * draw(st.integers(1, 12)) for s in stride)
    shape = tuple(draw(st.integers(1, 90)) for _ in range(dims))
    halo = tuple(draw(st.integers(0, 20)) for _ in range(dims))
    per_unit = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    return TileGrid.create(shape, chunk=chunk, halo=halo, stride=stride, chunks_per_unit=per_unit)


@given(grids(2) | grids(3))
@settings(max_examples=150, deadline=None)
def test_chunks_cover_the_image_exactly_once(grid: TileGrid) -> None:
    hits = np.zeros(grid.shape, dtype=np.int32)
    for unit in grid.units():
        for chunk in unit.chunks:
            hits[chunk.slices()] += 1
    assert (hits == 1).all()


@given(grids(2) | grids(3))
@settings(max_examples=150, deadline=None)
def test_read_windows_contain_cores_and_respect_the_virtual_image(grid: TileGrid) -> None:
    virtual = Box((0,) * len(grid.shape), grid.virtual_shape)
    image = Box((0,) * len(grid.shape), grid.shape)
    for unit in grid.units():
        assert unit.read.contains(unit.core)
        assert image.contains(unit.core)
        assert virtual.contains(unit.read)
        for axis, stride in enumerate(grid.stride):
            # On the stride phase of the whole image, and a whole number of strides long.
            assert unit.read.start[axis] % stride == 0
            assert unit.read.shape[axis] % stride == 0
            # Inside the image, the window edge is a full halo away from the core.
            if unit.read.start[axis] > 0:
                assert unit.core.start[axis] - unit.read.start[axis] == grid.halo[axis]
            if unit.read.stop[axis] < grid.virtual_shape[axis]:
                assert unit.read.stop[axis] - unit.core.stop[axis] >= grid.halo[axis]


@given(grids(2), st.sampled_from(["replicate", "zero"]), st.integers(1, 3))
@settings(max_examples=100, deadline=None)
def test_crop_after_pad_is_the_identity(grid: TileGrid, edge: str, bands: int) -> None:
    rng = np.random.default_rng(0)
    image = rng.random((bands, *grid.shape))
    for unit in grid.units():
        inside = inside_image(unit.read, grid.shape)
        padded = pad_to_window(image[(slice(None), *inside.slices())], unit.read, grid.shape, edge=edge)
        assert padded.shape == (bands, *unit.read.shape)
        core = padded[(slice(None), *unit.core.within(unit.read))]
        np.testing.assert_array_equal(core, image[(slice(None), *unit.core.slices())])


def test_tiles_pad_as_the_whole_image_does() -> None:
    grid = TileGrid.create((37, 29), chunk=(16, 16), halo=(5, 5), stride=(8, 8), chunks_per_unit=(1, 1))
    image = np.arange(37 * 29, dtype=float).reshape(1, 37, 29)
    whole = np.pad(image, ((0, 0), (0, 40 - 37), (0, 32 - 29)), mode="edge")
    for unit in grid.units():
        inside = inside_image(unit.read, grid.shape)
        tile = pad_to_window(image[(slice(None), *inside.slices())], unit.read, grid.shape, edge="replicate")
        np.testing.assert_array_equal(tile, whole[(slice(None), *unit.read.slices())])


def test_halo_is_rounded_up_to_the_stride() -> None:
    grid = TileGrid.create((100, 100), chunk=(32, 32), halo=(5, 9), stride=(8, 4), chunks_per_unit=(1, 1))
    assert grid.halo == (8, 12)
    assert ceil_to(0, 8) == 0 and ceil_to(1, 8) == 8 and ceil_to(16, 8) == 16


def test_chunk_must_be_a_multiple_of_the_stride() -> None:
    with pytest.raises(ValueError, match="multiple of the model stride"):
        TileGrid.create((100, 100), chunk=(30, 30), halo=(0, 0), stride=(4, 4), chunks_per_unit=(1, 1))


def test_box_rejects_inverted_bounds() -> None:
    with pytest.raises(ValueError):
        Box((5, 0), (4, 3))
