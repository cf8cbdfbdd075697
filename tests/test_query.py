"""Regions, queries, zones and the Python API on real demo outputs, checked against independent code."""

from __future__ import annotations

import contextlib
import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
from pyproj import Transformer
from scipy import ndimage

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.core.stats import NODATA
from pipeline.jobs.run import run_job
from pipeline.query import open_store
from tests.conftest import ROOT, S2, scipy_table


def run_demo(config: str, out: Path, *overrides: str) -> Path:
    with contextlib.chdir(ROOT):
        job = load_config(ROOT / "configs" / config, [f"output.path={out}", "output.preview=false", *overrides])
        run_job(job, progress=False)
    return out


@pytest.fixture(scope="module")
def aber(ray_session, tmp_path_factory) -> Path:
    """The Sentinel-2 NDVI demo, 64-px chunks (36 of them), 8-connected regions."""
    out = tmp_path_factory.mktemp("aber") / "aber.zarr"
    return run_demo("aerial-vegetation.yaml", out, "tiling.chunk=64", "regions.connectivity=8")


@pytest.fixture(scope="module")
def ct(ray_session, tmp_path_factory) -> Path:
    """The 20-slice CT demo in 8 x 128 x 128 chunks (48 of them), 6-connected regions."""
    out = tmp_path_factory.mktemp("ct") / "ct.zarr"
    return run_demo("ct-tissue.yaml", out, "tiling.chunk=[8,128,128]")


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def table_rows(frame, axes: list[str], size: str) -> list[tuple]:
    return sorted(
        (int(r["class"]), int(r[size]), *[(int(r[f"{a}_start"]), int(r[f"{a}_stop"])) for a in axes])
        for r in frame.to_dict(orient="records")
    )


def test_demo_scene_regions_equal_scipy_with_areas_places_and_band_means(aber) -> None:
    store = open_store(aber)
    mask = store.mask.values
    regions = store.regions_array.values
    frame = store.regions()
    expected, theirs = scipy_table(mask, 8)
    assert table_rows(frame, ["row", "col"], "pixels") == expected
    pairs = np.unique(np.stack([regions.ravel(), theirs.ravel()]), axis=1)
    assert pairs.shape[1] == len(frame) == theirs.max()  # one to one with scipy's labels
    assert store.meta["regions"]["count"] == len(frame) > 100
    np.testing.assert_allclose(frame["area_m2"], frame["pixels"] * 100.0)  # 10 m pixels, EPSG:27700
    ids = frame["id"].to_numpy()
    with rasterio.open(S2) as src:
        red, nir = src.read(3).astype(np.float64), src.read(8).astype(np.float64)
        rows, cols = np.asarray(ndimage.center_of_mass(np.ones_like(regions), regions, ids)).T
        xs, ys = rasterio.transform.xy(src.transform, rows, cols, offset="center")
    np.testing.assert_allclose(frame["mean_b3"], ndimage.mean(red, regions, ids))
    np.testing.assert_allclose(frame["mean_b8"], ndimage.mean(nir, regions, ids))
    np.testing.assert_allclose(frame["centroid_x"], xs, atol=1e-6)
    np.testing.assert_allclose(frame["centroid_y"], ys, atol=1e-6)
    lon, lat = Transformer.from_crs("EPSG:27700", "EPSG:4326", always_xy=True).transform(xs, ys)
    np.testing.assert_allclose(frame["centroid_lon"], lon, atol=1e-9)
    np.testing.assert_allclose(frame["centroid_lat"], lat, atol=1e-9)
    assert (frame["x_min"] < frame["centroid_x"]).all() and (frame["centroid_y"] < frame["y_max"]).all()
    info = json.loads(json.dumps(store.stats))
    assert sum(row["regions"] for row in info["classes"].values()) == len(frame)


def test_ct_regions_equal_scipy_with_volumes_patient_positions_and_hu(ct) -> None:
    store = open_store(ct)
    mask = store.mask.values
    regions = store.regions_array.values
    frame = store.regions()
    expected, _ = scipy_table(mask, 6)
    assert table_rows(frame, ["slice", "row", "col"], "voxels") == expected
    spacing = np.prod(store.spacing)
    np.testing.assert_allclose(frame["volume_mm3"], frame["voxels"] * spacing)
    np.testing.assert_allclose(frame["volume_ml"], frame["voxels"] * spacing / 1000)
    ids = frame["id"].to_numpy()
    import zarr

    hu = np.asarray(zarr.open_array(str(ct / "0"), mode="r")[...], dtype=np.float64)
    np.testing.assert_allclose(frame["mean_hu"], ndimage.mean(hu, regions, ids), rtol=1e-9, atol=1e-6)
    centre = np.asarray(ndimage.center_of_mass(np.ones_like(regions), regions, ids))
    affine = np.asarray(store.meta["volume"]["affine"])
    patient = centre @ affine[:3, :3].T + affine[:3, 3]
    np.testing.assert_allclose(frame[["centroid_x_mm", "centroid_y_mm", "centroid_z_mm"]], patient, atol=1e-6)
    from ome_zarr_models.v05.image import Image
    from ome_zarr_models.v05.image_label import ImageLabel

    group = zarr.open_group(str(ct), mode="r")
    Image.from_zarr(group)  # the whole NGFF image with both label images validates
    ImageLabel.from_zarr(group["labels/regions"])
    bone = store.regions("bone", min_volume=1000.0)
    assert len(bone) >= 1 and (bone["volume_mm3"] >= 1000).all() and set(bone["class_name"]) == {"bone"}


def centres_of(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Map coordinates of every pixel centre, from rasterio's own transform of the source file."""
    with rasterio.open(S2) as src:
        rows, cols = np.indices(shape)
        xs, ys = rasterio.transform.xy(src.transform, rows.ravel(), cols.ravel(), offset="center")
    return np.asarray(xs).reshape(shape), np.asarray(ys).reshape(shape)


def expected_counts(mask: np.ndarray, inside: np.ndarray, n: int) -> list[int]:
    picked = mask[inside & (mask != NODATA)]
    return np.bincount(picked, minlength=n).tolist()


@pytest.mark.parametrize("box", [(257700.0, 280000.0, 259050.5, 281234.0), (250000.0, 270000.0, 258000.0, 280000.0)])
def test_box_query_in_the_store_crs_equals_numpy(aber, capsys, box) -> None:
    store = open_store(aber)
    mask = store.mask.values
    xs, ys = centres_of(mask.shape)
    inside = (xs >= box[0]) & (xs <= box[2]) & (ys >= box[1]) & (ys <= box[3])
    code, out, err = cli(capsys, "query", str(aber), "--bbox", ",".join(map(str, box)), "--json")
    assert code == 0, err
    result = json.loads(out)
    got = [result["classes"][c]["pixels"] for c in store.classes]
    assert got == expected_counts(mask, inside, 3) and sum(got) > 0
    assert result["classes"]["vegetation"]["area_m2"] == pytest.approx(got[1] * 100.0)
    assert result["chunks_read"] < 36  # only the chunks the box touches


def test_box_query_in_lon_lat_equals_numpy(aber, capsys) -> None:
    store = open_store(aber)
    mask = store.mask.values
    xs, ys = centres_of(mask.shape)
    lon, lat = Transformer.from_crs("EPSG:27700", "EPSG:4326", always_xy=True).transform(xs, ys)
    box = (-4.09, 52.40, -4.06, 52.42)
    inside = (lon >= box[0]) & (lon <= box[2]) & (lat >= box[1]) & (lat <= box[3])
    code, out, err = cli(
        capsys, "query", str(aber), "--bbox", "-4.09,52.40,-4.06,52.42", "--crs", "EPSG:4326", "--json"
    )
    assert code == 0, err
    got = [json.loads(out)["classes"][c]["pixels"] for c in store.classes]
    assert got == expected_counts(mask, inside, 3) and sum(got) > 10_000
    api = store.area(bbox=box, crs="EPSG:4326")
    assert [api["classes"][c]["pixels"] for c in store.classes] == got


def test_point_query_names_the_class_and_the_region(aber, capsys) -> None:
    store = open_store(aber)
    x, y = Transformer.from_crs("EPSG:4326", "EPSG:27700", always_xy=True).transform(-4.08, 52.41)
    with rasterio.open(S2) as src:
        row, col = src.index(x, y)
    code, out, err = cli(capsys, "query", str(aber), "--point", "-4.08,52.41", "--crs", "EPSG:4326", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["index"] == [row, col]
    assert result["class_id"] == int(store.mask.values[row, col])
    assert result["region"]["id"] == int(store.regions_array.values[row, col])
    assert result["region"]["class_name"] == result["class_name"]
    code, out, _ = cli(capsys, "query", str(aber), "--point", "-3.0,50.0", "--crs", "EPSG:4326")
    assert code == 0 and "outside" in out


def test_a_box_outside_the_image_is_empty_not_an_error(aber, capsys) -> None:
    code, out, err = cli(capsys, "query", str(aber), "--bbox", "10,40,11,41", "--crs", "EPSG:4326", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["pixels"] == 0 and result["chunks_read"] == 0 and "does not overlap" in result["note"]


def point_in_polygon(x: np.ndarray, y: np.ndarray, ring: np.ndarray) -> np.ndarray:
    """Even-odd rule by ray casting (independent of rasterio and of raymask)."""
    inside = np.zeros(x.shape, dtype=bool)
    for (x1, y1), (x2, y2) in itertools.pairwise(ring):
        crosses = (y1 > y) != (y2 > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            at = x1 + (y - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (x < at)
    return inside


def test_zones_equal_a_point_in_polygon_count(aber, capsys, tmp_path) -> None:
    field = [[-4.088, 52.402], [-4.070, 52.404], [-4.066, 52.418], [-4.085, 52.415], [-4.088, 52.402]]
    hole = [[-4.080, 52.408], [-4.074, 52.408], [-4.074, 52.412], [-4.080, 52.412], [-4.080, 52.408]]
    tri_a = [[-4.095, 52.395], [-4.090, 52.395], [-4.092, 52.400], [-4.095, 52.395]]
    tri_b = [[-4.060, 52.420], [-4.050, 52.420], [-4.055, 52.425], [-4.060, 52.420]]
    doc = {
        "type": "FeatureCollection",
        "features": [
            {"type": "Feature", "properties": {"name": "field"},
             "geometry": {"type": "Polygon", "coordinates": [field, hole]}},
            {"type": "Feature", "properties": {"name": "corners"},
             "geometry": {"type": "MultiPolygon", "coordinates": [[tri_a], [tri_b]]}},
        ],
    }  # fmt: skip
    path = tmp_path / "fields.geojson"
    path.write_text(json.dumps(doc))
    store = open_store(aber)
    mask = store.mask.values
    xs, ys = centres_of(mask.shape)
    lon, lat = Transformer.from_crs("EPSG:27700", "EPSG:4326", always_xy=True).transform(xs, ys)
    field_in = point_in_polygon(lon, lat, np.asarray(field)) & ~point_in_polygon(lon, lat, np.asarray(hole))
    corners_in = point_in_polygon(lon, lat, np.asarray(tri_a)) | point_in_polygon(lon, lat, np.asarray(tri_b))
    code, out, err = cli(capsys, "zones", str(aber), str(path), "--json")
    assert code == 0, err
    results = json.loads(out)
    assert [r["zone"]["properties"]["name"] for r in results] == ["field", "corners"]
    for result, inside in zip(results, (field_in, corners_in)):
        got = [result["classes"][c]["pixels"] for c in store.classes]
        assert got == expected_counts(mask, inside, 3) and sum(got) > 50
    code, out, _ = cli(capsys, "zones", str(aber), str(path))
    assert code == 0 and "zone 0 field" in out and "vegetation" in out


def test_the_python_api(aber) -> None:
    import dask.array as da

    import pipeline

    store = pipeline.open_store(aber)
    assert isinstance(store.mask.data, da.Array) and store.mask.data.chunksize == (64, 64)
    assert store.mask.rio.crs.to_epsg() == 27700
    with rasterio.open(S2) as src:
        assert tuple(store.mask.rio.transform())[:6] == tuple(src.transform)[:6]
        assert float(store.mask.x[0]) == pytest.approx(src.xy(0, 0)[0])
    assert store.classes == ["other", "vegetation", "water"]
    assert store.stats["classes"]["vegetation"]["area_ha"] == pytest.approx(856.47)
    counts = da.bincount(store.mask.data.ravel(), minlength=256)[:3].compute()  # out of core, chunk by chunk
    assert counts.tolist() == [store.stats["classes"][c]["pixels"] for c in store.classes]
    big = store.regions("vegetation", min_area=1000.0)
    assert (big["area_m2"] >= 1000).all() and set(big["class_name"]) == {"vegetation"}
    assert np.array_equal(np.unique(store.regions_array.values), np.arange(1, len(store.regions()) + 1))
    whole = store.area(bbox=(0, 0, 324, 339), crs="pixel")
    assert whole["pixels"] == sum(row["pixels"] for row in store.stats["classes"].values())


def test_regions_command_filters_sorts_and_writes_files(aber, capsys, tmp_path) -> None:
    import pandas as pd

    sizes = [r[1] for r in scipy_table(open_store(aber).mask.values, 8)[0] if r[0] == 1]
    code, out, err = cli(capsys, "regions", str(aber), "--class", "vegetation", "--min-area", "1000", "--json",
                         "--out", str(tmp_path / "veg.parquet"))  # fmt: skip
    assert code == 0, err
    result = json.loads(out)
    assert result["matched"] == len(result["regions"]) == sum(s >= 10 for s in sizes)
    assert [r["pixels"] for r in result["regions"]] == sorted((s for s in sizes if s >= 10), reverse=True)
    assert len(pd.read_parquet(tmp_path / "veg.parquet")) == result["matched"]
    code, out, _ = cli(capsys, "regions", str(aber))
    assert code == 0 and "8-connected" in out and "more (--limit N" in out


def test_regions_of_an_existing_store_can_be_labelled_again(aber, capsys, tmp_path) -> None:
    copy = tmp_path / "copy.zarr"
    shutil.copytree(aber, copy)
    mask_before = open_store(copy).mask.values.copy()
    code, _, err = cli(capsys, "regions", str(copy), "--compute", "--connectivity", "4", "--classes", "water",
                       "--no-progress")  # fmt: skip
    assert code == 0, err
    store = open_store(copy)
    expected = ndimage.label(mask_before == 2)[1]
    assert store.meta["regions"]["count"] == expected and store.meta["regions"]["classes"] == ["water"]
    assert store.status == "complete" and np.array_equal(store.mask.values, mask_before)
    assert store.stats["classes"]["water"]["regions"] == expected and "regions" not in store.stats["classes"]["other"]
    assert "mean_b3" in store.regions().columns  # the source is unchanged, so band means are back


def test_volume_box_and_point_queries(ct, capsys) -> None:
    store = open_store(ct)
    mask = store.mask.values
    affine = np.asarray(store.meta["volume"]["affine"])
    index = np.stack(np.indices(mask.shape), axis=-1).reshape(-1, 3).astype(np.float64)
    patient = (index @ affine[:3, :3].T + affine[:3, 3]).reshape(*mask.shape, 3)
    centre = patient[10, 256, 256]
    lo, hi = centre - np.array([60, 40, 7]), centre + np.array([50, 30, 9])
    box = ",".join(f"{v:.3f}" for v in [*lo, *hi])
    lo_r = np.array([float(v) for v in box.split(",")[:3]])
    hi_r = np.array([float(v) for v in box.split(",")[3:]])
    inside = np.all((patient >= lo_r) & (patient <= hi_r), axis=-1)
    code, out, err = cli(capsys, "query", str(ct), "--bbox", box, "--json")
    assert code == 0, err
    result = json.loads(out)
    got = [result["classes"][c]["pixels"] for c in store.classes]
    assert got == expected_counts(mask, inside, 5) and sum(got) > 1000
    code, out, _ = cli(capsys, "query", str(ct), "--bbox", "100,200,3,110,210,5", "--crs", "pixel", "--json")
    got = [json.loads(out)["classes"][c]["pixels"] for c in store.classes]
    assert got == expected_counts(mask[3:5, 200:210, 100:110], np.ones((2, 10, 10), bool), 5)
    point = ",".join(f"{v:.4f}" for v in patient[7, 300, 200])
    code, out, _ = cli(capsys, "query", str(ct), "--point", point, "--json")
    result = json.loads(out)
    assert result["index"] == [7, 300, 200] and result["class_id"] == int(mask[7, 300, 200])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["query", "{store}", "--bbox", "0,0,1,1", "--crs", "EPSG:99999"], "--crs 'EPSG:99999': not a CRS"),
        (["query", "{store}", "--bbox", "1,2,3"], "--bbox '1,2,3': expected 4 comma-separated numbers"),
        (["query", "{store}", "--bbox", "5,0,1,1"], "each minimum must not exceed its maximum"),
        (["regions", "{store}", "--class", "trees"], "no class 'trees'; classes: other, vegetation, water"),
        (["query", "{tmp}", "--point", "1,1"], "not a zarr store"),
        (["regions", "{tmp}/nothing.zarr"], "nothing.zarr: no such store"),
        (["zones", "{store}", "{tmp}/bad.geojson"], "bad.geojson: not valid GeoJSON: Expecting"),
        (["zones", "{store}", "{tmp}/point.geojson"], "point.geojson: not valid GeoJSON: feature 0 is a Point"),
        (["zones", "{store}", "{tmp}/open.geojson"], "open.geojson: not valid GeoJSON: feature 0: a ring must end"),
        (["zones", "{store}", "{tmp}/nofeatures.geojson"], "nofeatures.geojson: not valid GeoJSON: a Feature"),
        (["zones", "{store}", "{tmp}/missing.geojson"], "missing.geojson: no such file"),
    ],
)
def test_bad_queries_get_one_line_errors(aber, capsys, tmp_path, args, message) -> None:
    (tmp_path / "bad.geojson").write_text('{"type": "FeatureCollection", "features": [')
    (tmp_path / "point.geojson").write_text(json.dumps({"type": "Point", "coordinates": [-4.08, 52.41]}))
    ring = [[-4.08, 52.40], [-4.07, 52.40], [-4.07, 52.41]]
    (tmp_path / "open.geojson").write_text(json.dumps({"type": "Polygon", "coordinates": [[*ring, [-4.0, 52.0]]]}))
    (tmp_path / "nofeatures.geojson").write_text(json.dumps({"type": "FeatureCollection"}))
    argv = [a.format(store=aber, tmp=tmp_path) for a in args]
    code, out, err = cli(capsys, *argv)
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("raymask: error: ") and message in err, err
