"""End-to-end jobs through the real CLI entry point and a local Ray, checked against independent computations."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr
import zarr
from pyproj import Geod
from rasterio.warp import Resampling, calculate_default_transform, reproject

from pipeline.cli import main
from pipeline.core.stats import NODATA
from tests.conftest import JOB_CONFIGS, LANDSAT, RGB_BYTE, ROOT, S2, store_digest, write_config
from tests.conftest import run_json as run

pytestmark = pytest.mark.usefixtures("ray_session")


def ndvi_job(tmp_path: Path, source: Path | str, out: str, *extra: str) -> list[str]:
    config = write_config(
        tmp_path / "ndvi.yaml",
        source={"path": str(source), "bands": [3, 8]},
        model={"kind": "ndvi", "red": 1, "nir": 2, "water_below": 0.0, "vegetation_above": 0.3},
        tiling={"chunk": 96, "halo": 16},
        output={"path": out, "preview": False},
    )
    return [str(config), *extra]


def expected_ndvi_classes(red: np.ndarray, nir: np.ndarray) -> np.ndarray:
    red, nir = red.astype(np.float64), nir.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ndvi = np.where(nir + red != 0, (nir - red) / (nir + red), 0.0)
    return np.select([ndvi < 0.0, ndvi >= 0.3], [2, 1], 0).astype(np.uint8)


def test_sentinel2_ndvi_job_matches_an_independent_computation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    summary = run(capsys, *ndvi_job(tmp_path, S2, "s2.zarr"))
    with rasterio.open(S2) as src:
        red, nir = src.read(3), src.read(8)
    expected = expected_ndvi_classes(red, nir)
    mask = zarr.open_array("s2.zarr/mask")[:]
    np.testing.assert_array_equal(mask, expected)
    for cid, name in enumerate(["other", "vegetation", "water"]):
        row = summary["classes"][name]
        assert row["pixels"] == int((expected == cid).sum())
        assert row["area_m2"] == pytest.approx(row["pixels"] * 100.0)  # 10 m pixels, EPSG:27700 metres
        assert row["area_ha"] == pytest.approx(row["pixels"] / 100.0)
    # The figures SOURCES.md gives for this file: 78 % at or above 0.3, 11 % below 0.
    assert summary["classes"]["vegetation"]["fraction"] == pytest.approx(0.78, abs=0.01)
    assert summary["classes"]["water"]["fraction"] == pytest.approx(0.11, abs=0.01)
    assert summary["status"] == "complete" and summary["exact"] is True


def test_georeference_round_trips_through_rioxarray_exactly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, *ndvi_job(tmp_path, S2, "s2.zarr"))
    ds = xr.open_zarr("s2.zarr", decode_coords="all", mask_and_scale=False)
    with rasterio.open(S2) as src:
        assert ds.mask.rio.crs == src.crs
        assert ds.mask.rio.transform() == src.transform  # exact: no half-pixel shift
        np.testing.assert_array_equal(ds.x.values, src.transform.c + (np.arange(src.width) + 0.5) * src.transform.a)
        np.testing.assert_array_equal(ds.y.values, src.transform.f + (np.arange(src.height) + 0.5) * src.transform.e)


def test_geographic_crs_areas_are_geodesic(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    wgs84 = tmp_path / "s2_4326.tif"
    with rasterio.open(S2) as src:
        transform, width, height = calculate_default_transform(src.crs, "EPSG:4326", src.width, src.height, *src.bounds)
        profile = src.profile | {
            "crs": "EPSG:4326",
            "transform": transform,
            "width": width,
            "height": height,
            "nodata": 0,
        }
        with rasterio.open(wgs84, "w", **profile) as dst:
            for band in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10):
                reproject(
                    rasterio.band(src, band),
                    rasterio.band(dst, band),
                    dst_crs="EPSG:4326",
                    resampling=Resampling.nearest,
                )
    summary = run(capsys, *ndvi_job(tmp_path, wgs84, "wgs.zarr"))
    ds = xr.open_zarr("wgs.zarr", decode_coords="all", mask_and_scale=False)
    with rasterio.open(wgs84) as src:
        assert ds.mask.rio.crs.to_epsg() == 4326
        assert ds.mask.rio.transform() == src.transform
        red, nir = src.read(3), src.read(8)
        valid = (src.read_masks(3) > 0) & (src.read_masks(8) > 0)
        t = src.transform
    expected = np.where(valid, expected_ndvi_classes(red, nir), NODATA)
    np.testing.assert_array_equal(ds.mask.values, expected)
    geod = Geod(ellps="WGS84")
    row_area = []
    for row in range(expected.shape[0]):
        top, bottom = t.f + row * t.e, t.f + (row + 1) * t.e
        area, _ = geod.polygon_area_perimeter([t.c, t.c + t.a, t.c + t.a, t.c], [top, top, bottom, bottom])
        row_area.append(abs(area))
    for cid, name in enumerate(["other", "vegetation", "water"]):
        independent = float(((expected == cid) * np.asarray(row_area)[:, None]).sum())
        assert summary["classes"][name]["area_m2"] == pytest.approx(independent, rel=1e-9)
    # The reprojected scene covers about the same ground: total area within 2 % of the 10 m grid's.
    total = sum(r["area_m2"] for r in summary["classes"].values())
    assert total == pytest.approx(109_836 * 100.0, rel=0.02)


def test_nodata_collar_is_written_as_255_and_excluded_from_areas(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(
        tmp_path / "rgb.yaml",
        source={"path": str(RGB_BYTE)},
        model={"kind": "rgb-vegetation", "index": "exg", "threshold": 0.05},
        tiling={"chunk": 256},
        output={"path": "rgb.zarr"},
    )
    summary = run(capsys, str(config))
    mask = zarr.open_array("rgb.zarr/mask")[:]
    with rasterio.open(RGB_BYTE) as src:
        valid = (src.read_masks() > 0).all(axis=0)
        collar = src.dataset_mask() == 0
        pixel_area = abs(src.transform.a * src.transform.e)
    assert (mask[collar] == NODATA).all()
    np.testing.assert_array_equal(mask != NODATA, valid)
    ds = xr.open_zarr("rgb.zarr", decode_coords="all", mask_and_scale=False)
    with rasterio.open(RGB_BYTE) as src:  # a second real file, in EPSG:32618
        assert ds.mask.rio.crs == src.crs and ds.mask.rio.transform() == src.transform
    counted = sum(r["pixels"] for r in summary["classes"].values())
    assert counted == int(valid.sum())
    total = sum(r["area_m2"] for r in summary["classes"].values())
    assert total == pytest.approx(valid.sum() * pixel_area, rel=1e-9)
    assert Path(summary["preview"]).is_file()


def test_band_files_job(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(
        tmp_path / "landsat.yaml",
        source={"path": [str(LANDSAT[0]), str(LANDSAT[1])]},
        model={"kind": "ndvi", "red": 1, "nir": 2, "vegetation_above": 0.2},
        tiling={"chunk": 128},
        output={"path": "landsat.zarr", "preview": False},
    )
    summary = run(capsys, str(config))
    with rasterio.open(LANDSAT[0]) as r, rasterio.open(LANDSAT[1]) as n:
        red, nir = r.read(1), n.read(1)
    ndvi = (nir.astype(float) - red) / (nir.astype(float) + red)
    assert summary["classes"]["vegetation"]["pixels"] == int((ndvi >= 0.2).sum())
    assert summary["classes"]["vegetation"]["area_m2"] == pytest.approx((ndvi >= 0.2).sum() * 28.5 * 28.5)


def test_exported_cog_reads_in_gdal_with_the_source_georeference(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run(capsys, *ndvi_job(tmp_path, S2, "s2.zarr"))
    assert main(["export", "s2.zarr", "s2_mask.tif"]) == 0
    rio = Path(sys.executable).with_name("rio")
    info = json.loads(
        subprocess.run([str(rio), "info", "s2_mask.tif"], check=True, capture_output=True, text=True).stdout
    )
    with rasterio.open(S2) as src:
        assert info["transform"][:6] == list(src.transform)[:6]
        assert rasterio.crs.CRS.from_user_input(info["crs"]) == src.crs
        assert info["nodata"] == NODATA and info["count"] == 1 and info["width"] == src.width
    with rasterio.open("s2_mask.tif") as exported:
        np.testing.assert_array_equal(exported.read(1), zarr.open_array("s2.zarr/mask")[:])
        assert exported.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"


def test_a_complete_store_is_refused_and_left_untouched(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ndvi_job(tmp_path, S2, "s2.zarr")
    run(capsys, *args)
    before = {p: p.stat().st_mtime_ns for p in Path("s2.zarr").rglob("*") if p.is_file()}
    assert main(["run", *args]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "raymask: error: s2.zarr: a complete store is already there; pass --overwrite to replace it"
    assert before == {p: p.stat().st_mtime_ns for p in Path("s2.zarr").rglob("*") if p.is_file()}
    again = run(capsys, *args, "--overwrite")
    assert again["units_run"] == again["units_total"] and again["units_skipped"] == 0


def test_info_json_reports_the_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, *ndvi_job(tmp_path, S2, "s2.zarr"))
    assert main(["info", "s2.zarr", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    with rasterio.open(S2) as src:
        assert info["status"] == "complete" and info["shape"] == [src.height, src.width]
        assert info["transform"] == list(src.transform.to_gdal())
        assert rasterio.crs.CRS.from_wkt(info["crs"]) == src.crs
    assert [c["name"] for c in info["classes"]] == ["other", "vegetation", "water"]
    assert info["stats"]["classes"]["vegetation"]["area_m2"] > 0 and info["spacing"] is None
    assert main(["info", "s2.zarr"]) == 0
    assert "vegetation" in capsys.readouterr().out


def test_every_shipped_config_is_tested() -> None:
    others = {p.name for p in (ROOT / "configs").glob("*.yaml")} - {p.name for p in JOB_CONFIGS}
    # run by tests/test_batch.py, and the training configs by tests/test_train.py
    assert others == {"archive-nightly.yaml", "train-buildings.yaml", "train-polyp.yaml"}


@pytest.mark.parametrize("config", JOB_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_runs_through_the_cli(config: Path, shipped_store) -> None:
    store, summary = shipped_store(config.name)
    assert summary["status"] == "complete"
    assert sum(r["pixels"] for r in summary["classes"].values()) > 0
    # every output byte as the code made it before the layout change (tools/store_digests.py)
    expected = json.loads((ROOT / "tests" / "fixtures" / "store_digests.json").read_text())[config.name]
    got = store_digest(store)
    assert got["meta"] == expected["meta"]
    assert sorted(f for f in expected["files"] if got["files"].get(f) != expected["files"][f]) == []
    assert sorted(got["files"]) == sorted(expected["files"])
