"""The GeoTIFF source: band selection, band stacks, validity, and errors that name the file."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.shutil
from affine import Affine

from pipeline.config import SourceConfig
from pipeline.core.geometry import Box
from pipeline.errors import SourceError, SourceNotFound
from pipeline.sources.geotiff import open_source
from tests.conftest import LANDSAT, RGB_BYTE, S2, S2_TINY, GeoTiffFactory


def test_selected_bands_read_in_the_order_given() -> None:
    source, info = open_source(SourceConfig(path=str(S2), bands=[8, 3]))
    assert info.shape == (339, 324) and info.bands == 2
    data, valid = source.read(Box((10, 20), (30, 45)))
    with rasterio.open(S2) as src:
        expected = src.read([8, 3], window=((10, 30), (20, 45))).astype(np.float32)
    np.testing.assert_array_equal(data, expected)
    assert valid.shape == (20, 25) and valid.all()


def test_a_source_survives_pickling_as_ray_ships_it() -> None:
    source, _ = open_source(SourceConfig(path=str(S2), bands=[3]))
    clone = pickle.loads(pickle.dumps(source))
    np.testing.assert_array_equal(clone.read(Box((0, 0), (5, 5)))[0], source.read(Box((0, 0), (5, 5)))[0])


def test_band_files_stack_as_bands() -> None:
    source, info = open_source(SourceConfig(path=[str(p) for p in LANDSAT]))
    assert info.bands == 2 and info.shape == (443, 489)
    data, _ = source.read(Box((100, 100), (110, 120)))
    for i, path in enumerate(LANDSAT):
        with rasterio.open(path) as src:
            np.testing.assert_array_equal(data[i], src.read(1, window=((100, 110), (100, 120))))


def test_nodata_collar_is_invalid_and_any_invalid_band_invalidates_a_pixel() -> None:
    source, info = open_source(SourceConfig(path=str(RGB_BYTE)))
    _, valid = source.read(Box((0, 0), info.shape))
    with rasterio.open(RGB_BYTE) as src:
        per_band = src.read_masks() > 0
    np.testing.assert_array_equal(valid, per_band.all(axis=0))
    assert 0.66 < valid.mean() < 0.68  # about 67 % valid, the rest is the collar


def test_nodata_value_of_a_tiny_real_scene() -> None:
    source, info = open_source(SourceConfig(path=str(S2_TINY), bands=[4, 8]))
    _, valid = source.read(Box((0, 0), info.shape))
    with rasterio.open(S2_TINY) as src:
        raw = src.read([4, 8])
    np.testing.assert_array_equal(valid, (raw != 65535).all(axis=0))


def test_internal_alpha_band_marks_invalid_pixels(make_geotiff: GeoTiffFactory) -> None:
    data = np.full((4, 8, 8), 100, dtype=np.uint8)
    data[3] = 255
    data[3, :2] = 0  # alpha: the first two rows are transparent
    path = make_geotiff(data)
    with rasterio.open(path, "r+") as dst:
        dst.colorinterp = [
            rasterio.enums.ColorInterp.red,
            rasterio.enums.ColorInterp.green,
            rasterio.enums.ColorInterp.blue,
            rasterio.enums.ColorInterp.alpha,
        ]
    source, _ = open_source(SourceConfig(path=str(path), bands=[1, 2, 3]))
    _, valid = source.read(Box((0, 0), (8, 8)))
    assert not valid[:2].any() and valid[2:].all()


def test_missing_file() -> None:
    with pytest.raises(SourceNotFound, match=r"^nope\.tif: file not found$"):
        open_source(SourceConfig(path="nope.tif"))


def test_a_file_that_is_not_a_raster(tmp_path: Path) -> None:
    path = tmp_path / "notes.tif"
    path.write_text("not a raster")
    with pytest.raises(SourceError, match=rf"^{path}: not a raster GDAL can read"):
        open_source(SourceConfig(path=str(path)))


def test_band_out_of_range() -> None:
    with pytest.raises(SourceError, match=r"band 12 requested, but the file has 10"):
        open_source(SourceConfig(path=str(S2), bands=[3, 12]))


def test_band_files_on_different_grids(make_geotiff: GeoTiffFactory) -> None:
    a = make_geotiff(np.zeros((1, 10, 10), np.uint8), name="a.tif")
    b = make_geotiff(np.zeros((1, 10, 10), np.uint8), name="b.tif", transform=Affine(10, 0, 500005, 0, -10, 5700000))
    with pytest.raises(SourceError, match=rf"^{b}: not on the grid of {a}"):
        open_source(SourceConfig(path=[str(a), str(b)]))


def test_a_multiband_file_in_a_band_stack_is_refused(make_geotiff: GeoTiffFactory) -> None:
    a = make_geotiff(np.zeros((1, 10, 10), np.uint8), name="a.tif")
    b = make_geotiff(np.zeros((2, 10, 10), np.uint8), name="b.tif")
    with pytest.raises(SourceError, match=r"a band file must have 1 band, it has 2"):
        open_source(SourceConfig(path=[str(a), str(b)]))


def test_gdal_virtual_paths_pass_through_untouched(tmp_path: Path) -> None:
    vsi = f"/vsimem/{tmp_path.name}.tif"
    with rasterio.open(S2) as src, rasterio.open(vsi, "w", **src.profile) as dst:
        dst.write(src.read())
    try:
        source, info = open_source(SourceConfig(path=vsi, bands=[3]))
        assert source.paths == (vsi,) and info.shape == (339, 324)
        with pytest.raises(SourceError, match=r"^/vsimem/missing\.tif: not a raster GDAL can read"):
            open_source(SourceConfig(path="/vsimem/missing.tif"))
    finally:
        rasterio.shutil.delete(vsi)
