"""Per-class counts and areas (pure), and pixel areas from a georeference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from pyproj import CRS, Geod

from pipeline.core.georef import Georef, row_pixel_areas
from pipeline.core.stats import NODATA, count_classes, merge
from pipeline.core.transform import axis_centres


@given(arrays(np.uint8, st.tuples(st.integers(1, 20), st.integers(1, 20)), elements=st.sampled_from([0, 1, 2, NODATA])))
@settings(max_examples=100, deadline=None)
def test_counts_and_areas_match_a_direct_count(labels: np.ndarray) -> None:
    row_area = np.linspace(1.0, 2.0, labels.shape[0])
    stats = count_classes(labels, 3, row_area)
    for cid in range(3):
        assert stats.pixels[cid] == int((labels == cid).sum())
        assert stats.measure[cid] == pytest.approx(float(((labels == cid) * row_area[:, None]).sum()))
    assert stats.pixels.sum() == int((labels != NODATA).sum())


@given(arrays(np.uint8, (12, 9), elements=st.sampled_from([0, 1, NODATA])), st.integers(1, 11))
@settings(max_examples=50, deadline=None)
def test_chunked_counts_merge_to_the_whole(labels: np.ndarray, cut: int) -> None:
    area = np.ones(12)
    parts = [count_classes(labels[:cut], 2, area[:cut]), count_classes(labels[cut:], 2, area[cut:])]
    merged = merge(parts, 2)
    whole = count_classes(labels, 2, area)
    np.testing.assert_array_equal(merged.pixels, whole.pixels)
    np.testing.assert_allclose(merged.measure, whole.measure)


def test_a_label_outside_the_classes_is_refused() -> None:
    with pytest.raises(ValueError, match="outside the 2 classes"):
        count_classes(np.array([[0, 5]], dtype=np.uint8), 2, None)


def test_projected_pixel_area_is_the_transform_determinant() -> None:
    georef = Georef(CRS.from_epsg(32631).to_wkt(), (500000.0, 10.0, 0.0, 5700000.0, 0.0, -10.0))
    np.testing.assert_allclose(row_pixel_areas(georef, 3), [100.0] * 3)


def test_projected_area_in_feet_is_converted_to_square_metres() -> None:
    # EPSG:2264: NAD83 / North Carolina (ftUS); one US survey foot = 1200/3937 m.
    georef = Georef(CRS.from_epsg(2264).to_wkt(), (0.0, 1.0, 0.0, 0.0, 0.0, -1.0))
    np.testing.assert_allclose(row_pixel_areas(georef, 1), [(1200 / 3937) ** 2])


def test_geodesic_row_areas_add_up_to_the_geodesic_area_of_the_whole_grid() -> None:
    x0, y0, d = -4.1, 52.43, 0.001
    rows, cols = 40, 25
    georef = Georef(CRS.from_epsg(4326).to_wkt(), (x0, d, 0.0, y0, 0.0, -d))
    per_row = row_pixel_areas(georef, rows)
    assert per_row is not None and per_row[0] < per_row[-1]  # pixels grow towards the equator
    geod = Geod(ellps="WGS84")
    lons = [x0, x0 + cols * d, x0 + cols * d, x0]
    lats = [y0, y0, y0 - rows * d, y0 - rows * d]
    whole, _ = geod.polygon_area_perimeter(lons, lats)
    # Polygon edges are geodesics, not parallels, so the wide box bulges by ~1e-8 relative.
    assert float(per_row.sum() * cols) == pytest.approx(abs(whole), rel=1e-6)


def test_no_crs_means_no_area() -> None:
    assert row_pixel_areas(Georef(None, None), 5) is None


def test_pixel_centres_are_half_a_pixel_inside_the_corner() -> None:
    y, x = axis_centres((100.0, 2.0, 0.0, 50.0, 0.0, -2.0), (2, 3))
    np.testing.assert_array_equal(x, [101.0, 103.0, 105.0])
    np.testing.assert_array_equal(y, [49.0, 47.0])
