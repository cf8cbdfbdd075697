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
import shapely
import xarray as xr

import pipeline
from pipeline.cli import main
from pipeline.jobs.report import store_info
from pipeline.store import MaskStore
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


def test_the_catalog_parquet_maps_footprints_and_names_units(
    shipped_store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    import shutil

    import geopandas as gpd
    import pyarrow.parquet as pq

    aber, _ = shipped_store("aerial-vegetation.yaml")
    ct, _ = shipped_store("ct-tissue.yaml")
    shutil.copytree(aber, tmp_path / "all" / "aber.zarr")
    shutil.copytree(ct, tmp_path / "all" / "ct.zarr")
    assert main(["catalog", str(tmp_path / "all"), "--out", str(tmp_path / "cat.parquet"), "--json"]) == 0
    rows = {r["store"]: r for r in json.loads(capsys.readouterr().out)}
    frame = gpd.read_parquet(tmp_path / "cat.parquet")  # GeoParquet: the footprints are its geometry
    assert frame.crs.equals("OGC:CRS84")
    by_store = dict(zip(frame["store"], frame.geometry, strict=True))
    assert by_store["ct.zarr"] is None  # no CRS, no footprint
    assert by_store["aber.zarr"].equals(shapely.from_wkt(rows["aber.zarr"]["footprint"]))
    schema = pq.read_schema(tmp_path / "cat.parquet")
    assert schema.field("vegetation_area_ha").metadata == {b"unit": b"ha"}
    assert schema.field("bone_volume_ml").metadata == {b"unit": b"mL"}
    assert schema.field("lon_min").metadata == {b"unit": b"degree"}


def test_the_catalog_merges_every_stores_polygons(
    shipped_store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    """`raymask catalog ROOT --out all.parquet --polygons`: one GeoParquet, a `store` column; one CRS is
    kept, two are reprojected to lon/lat; volumes are named and left out."""
    import shutil

    import geopandas as gpd

    aber, _ = shipped_store("aerial-vegetation.yaml")
    rgb, _ = shipped_store("rgb-vegetation.yaml")
    ct, _ = shipped_store("ct-tissue.yaml")
    root = tmp_path / "archive"
    shutil.copytree(aber, root / "wales" / "aber.zarr")
    shutil.copytree(aber, root / "wales" / "aber-again.zarr")
    shutil.copytree(ct, root / "ct.zarr")
    out = tmp_path / "wales.parquet"
    assert main(["catalog", str(root / "wales"), "--out", str(out), "--polygons", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    one = gpd.read_parquet(out)
    single = gpd.read_parquet(_export(aber, tmp_path / "aber.parquet"))
    assert result["reprojected"] is False and one.crs.to_epsg() == 27700
    assert sorted(one["store"].unique()) == ["aber-again.zarr", "aber.zarr"] and len(one) == 2 * len(single)
    mine = one[one["store"] == "aber.zarr"].drop(columns="store").reset_index(drop=True)
    assert mine.geometry.geom_equals(single.geometry).all() and (mine["id"] == single["id"]).all()

    shutil.copytree(rgb, root / "bahamas.zarr")
    capsys.readouterr()
    out = tmp_path / "all.parquet"
    assert main(["catalog", str(root), "--out", str(out), "--polygons", "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert "ct.zarr: no polygons (a volume)" in captured.err and result["skipped"] == {"ct.zarr": "a volume"}
    merged = gpd.read_parquet(out)
    assert result["reprojected"] is True and merged.crs.equals("OGC:CRS84")
    for name, store in (("bahamas.zarr", rgb), ("wales/aber.zarr", aber)):
        part = merged[merged["store"] == name]
        lon_min, lat_min, lon_max, lat_max = store_info(MaskStore.open(store))["bounds_lonlat"]
        x0, y0, x1, y1 = part.total_bounds
        assert lon_min - 1e-6 <= x0 <= x1 <= lon_max + 1e-6 and lat_min - 1e-6 <= y0 <= y1 <= lat_max + 1e-6
    assert main(["catalog", str(root), "--out", str(tmp_path / "x.parquet"), "--polygons"]) == 0
    assert main(["catalog", str(root), "--out", str(out), "--polygons"]) == 1  # exists: no --overwrite


def _export(store: Path, out: Path) -> Path:
    assert main(["export", str(store), str(out)]) == 0
    return out
