"""The one transform type: indices <-> map coordinates round-trip, and a pixel's centre lies in it."""

from __future__ import annotations

import numpy as np
from hypothesis import assume, given
from hypothesis import strategies as st

from pipeline.core.geometry import Box
from pipeline.core.transform import apply_affine, axis_centres, centres, to_index, to_map, voxel_centres

finite = st.floats(-1e6, 1e6, allow_nan=False)
size = st.floats(0.01, 1000).flatmap(lambda v: st.sampled_from([v, -v]))
skew = st.one_of(st.just(0.0), st.floats(-10, 10))


@given(x0=finite, dx=size, rx=skew, y0=finite, ry=skew, dy=size, r=st.integers(0, 5000), c=st.integers(0, 5000))
def test_a_pixel_centre_maps_back_into_its_own_pixel(
    x0: float, dx: float, rx: float, y0: float, ry: float, dy: float, r: int, c: int
) -> None:
    t = (x0, dx, rx, y0, ry, dy)
    assume(abs(dx * dy - rx * ry) > 1e-3 * abs(dx * dy))  # not (nearly) degenerate
    x, y = to_map(t, r + 0.5, c + 0.5)
    row, col = to_index(t, x, y)
    assert (int(np.floor(row)), int(np.floor(col))) == (r, c)


def test_centres_are_half_a_pixel_from_the_corner_and_agree_with_the_1d_axes() -> None:
    t = (500000.0, 10.0, 0.0, 4000000.0, 0.0, -10.0)
    x, y = centres(t, Box((2, 3), (4, 6)))
    assert x[0, 0] == 500000.0 + 3.5 * 10 and y[0, 0] == 4000000.0 - 2.5 * 10
    ys, xs = axis_centres(t, (4, 6))
    assert np.array_equal(x[0], xs[3:6]) and np.array_equal(y[:, 0], ys[2:4])


def test_voxel_centres_are_the_affine_of_their_indices() -> None:
    affine = np.array([[2.5, 0, 0, -100.0], [0, 0.7, 0.1, 20.0], [0, 0, 0.7, 5.0], [0, 0, 0, 1]])
    got = voxel_centres(affine, Box((1, 2, 3), (3, 4, 6)))
    assert got.shape == (2, 2, 3, 3)
    assert np.allclose(got[1, 0, 2], apply_affine(affine, np.array([2, 2, 5])))
    assert np.allclose(got[1, 0, 2], affine[:3, :3] @ [2, 2, 5] + affine[:3, 3])
