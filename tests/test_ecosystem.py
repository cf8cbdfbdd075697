"""The store as other tools see it: rioxarray finds nodata 255 and the CF class flags both through
`xr.open_zarr` and through `pipeline.open_store`; `raymask info` gives the bounds in the store's CRS
and in lon/lat."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.warp
import rioxarray  # noqa: F401  (registers .rio)
import xarray as xr

import pipeline
from pipeline.cli import main
from tests.conftest import S2


def test_nodata_and_class_flags_in_both_views(shipped_store) -> None:  # type: ignore[no-untyped-def]
    store, _ = shipped_store("aerial-vegetation.yaml")
    ds = xr.open_zarr(store, decode_coords="all")
    view = pipeline.open_store(store)
    for mask in (ds.mask, view.mask):
        assert mask.rio.nodata == 255 and mask.dtype == np.uint8  # decoded, not masked to NaN
        assert list(mask.attrs["flag_values"]) == [0, 1, 2]
        assert mask.attrs["flag_meanings"] == "other vegetation water"
        assert mask.rio.crs is not None
    ct, _ = shipped_store("ct-tissue.yaml")
    volume = pipeline.open_store(ct).mask
    assert volume.attrs["nodata"] == 255 and volume.attrs["flag_meanings"].split()[0] == "air"


def test_info_shows_bounds_in_the_crs_and_in_lon_lat(
    shipped_store,
    capsys: pytest.CaptureFixture[str],  # type: ignore[no-untyped-def]
) -> None:
    store, _ = shipped_store("aerial-vegetation.yaml")
    assert main(["info", str(Path(store)), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    with rasterio.open(S2) as src:
        np.testing.assert_allclose(info["bounds"], list(src.bounds), rtol=0, atol=1e-6)
        expected = rasterio.warp.transform_bounds(src.crs, "EPSG:4326", *src.bounds)
    np.testing.assert_allclose(info["bounds_lonlat"], expected, rtol=0, atol=1e-3)
    assert -5 < info["bounds_lonlat"][0] < info["bounds_lonlat"][2] < -3  # Aberystwyth
    assert main(["info", str(Path(store))]) == 0
    assert "(lon/lat)" in capsys.readouterr().out


def test_the_catalog_has_numeric_shapes_epsg_and_footprints(
    shipped_store,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],  # type: ignore[no-untyped-def]
) -> None:
    import shutil

    import pyarrow.parquet as pq
    import shapely

    store, _ = shipped_store("aerial-vegetation.yaml")
    shutil.copytree(store, tmp_path / "maps" / "aber.zarr")
    assert main(["catalog", str(tmp_path / "maps"), "--json", "--out", str(tmp_path / "all.parquet")]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    with rasterio.open(S2) as src:
        assert (row["rows"], row["cols"]) == (src.height, src.width) and row["epsg"] == src.crs.to_epsg()
        expected = rasterio.warp.transform_bounds(src.crs, "EPSG:4326", *src.bounds)
    np.testing.assert_allclose([row["lon_min"], row["lat_min"], row["lon_max"], row["lat_max"]], expected, atol=1e-3)
    footprint = shapely.from_wkt(row["footprint"])
    assert footprint.is_valid and footprint.contains(shapely.Point(sum(expected[::2]) / 2, sum(expected[1::2]) / 2))
    assert pq.read_table(tmp_path / "all.parquet").column("epsg").to_pylist() == [row["epsg"]]
    assert main(["catalog", str(tmp_path / "maps")]) == 0
    assert " ha" in capsys.readouterr().out
