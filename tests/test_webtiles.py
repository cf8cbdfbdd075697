"""The viewer's tile maths (pipeline.core.webtiles), property-tested: the tiles of a zoom cover the
image exactly once, every pixel of a tile's window is in the image, and the deepest zoom is 1:1."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from pipeline.core.webtiles import TILE, level_for, max_zoom, tile_window


@given(rows=st.integers(1, 5000), cols=st.integers(1, 5000), tile=st.sampled_from([16, 64, 256]))
def test_the_tiles_of_each_zoom_cover_every_pixel_once(rows: int, cols: int, tile: int) -> None:
    top = max_zoom((rows, cols), tile)
    assert max(rows, cols) <= tile * 2**top and (top == 0 or max(rows, cols) > tile * 2 ** (top - 1))
    for z in {0, top // 2, top}:
        step = 2 ** (top - z)
        seen_rows = np.zeros(rows, dtype=int)
        seen_cols = np.zeros(cols, dtype=int)
        n = -(-max(rows, cols) // (tile * step)) + 1  # one past the edge too
        for y in range(n):
            w = tile_window((rows, cols), z, 0, y, tile)
            if w is not None:
                assert w.step == step and 0 <= w.row0 < w.row1 <= rows and w.rows <= tile
                seen_rows[w.row0 : w.row1] += 1
        for x in range(n):
            w = tile_window((rows, cols), z, x, 0, tile)
            if w is not None:
                assert 0 <= w.col0 < w.col1 <= cols and w.cols <= tile
                seen_cols[w.col0 : w.col1] += 1
        assert (seen_rows == 1).all() and (seen_cols == 1).all()
    deepest = tile_window((rows, cols), top, 0, 0, tile)
    assert deepest is not None and deepest.step == 1 and deepest.rows == min(rows, tile)


@given(z=st.integers(-3, 20), x=st.integers(-3, 200), y=st.integers(-3, 200))
def test_tiles_outside_are_none(z: int, x: int, y: int) -> None:
    shape = (16384, 9000)
    w = tile_window(shape, z, x, y)
    top = max_zoom(shape)
    inside = 0 <= z <= top and x >= 0 and y >= 0 and y * TILE * 2 ** (top - z) < 16384
    inside = inside and x * TILE * 2 ** (top - z) < 9000
    assert (w is not None) == inside


@given(step_log=st.integers(0, 10), levels=st.integers(0, 8))
def test_the_level_read_never_has_fewer_pixels_than_the_screen(step_log: int, levels: int) -> None:
    level = level_for(2**step_log, levels)
    assert 0 <= level <= levels and 2**level <= 2**step_log
    assert level == min(levels, step_log)  # the coarsest that still suffices
