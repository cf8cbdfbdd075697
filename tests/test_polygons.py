"""Region polygons (`raymask export STORE OUT.parquet|.fgb|.gpkg|.geojson`) from the bundled demo
store, read back with geopandas: one feature per region, the exact pixel-edge outline (area = pixels
x pixel area on every feature), no seam where a region crosses chunk cuts, equal to an independent
whole-image `rasterio.features.shapes` + dissolve; filters; one-line errors for bad requests."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio.features
import shapely
from affine import Affine

from pipeline.cli import main
from pipeline.store import MaskStore
from tests.conftest import S2, write_config
from tests.test_bad_input import assert_one_line_error, raymask

FORMATS = (".parquet", ".fgb", ".gpkg", ".geojson")


@pytest.fixture(scope="module")
def aber(shipped_store) -> Path:  # type: ignore[no-untyped-def]
    store, _ = shipped_store("aerial-vegetation.yaml")
    return Path(store)


def export(store: Path, out: Path, *extra: str, capsys: pytest.CaptureFixture[str]) -> dict:
    assert main(["export", str(store), str(out), "--json", *extra]) == 0
    return dict(json.loads(capsys.readouterr().out))


def reference(store: MaskStore) -> dict[int, shapely.Geometry]:
    """Independently: the whole regions array through rasterio.features.shapes, dissolved by id."""
    ids = np.asarray(store.regions()[:]).astype(np.int32)
    transform = Affine.from_gdal(*store.info.transform)
    frame = gpd.GeoDataFrame(
        [{"id": int(v), "geometry": shapely.geometry.shape(g)}
         for g, v in rasterio.features.shapes(ids, mask=ids > 0, connectivity=4, transform=transform)],
        geometry="geometry",
    )  # fmt: skip
    return dict(frame.dissolve("id").geometry.items())


def test_polygons_are_the_exact_region_outlines_in_every_format(
    aber: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = MaskStore.open(aber)
    info = store.info
    assert info.regions is not None and info.regions.crossing > 0  # some regions cross chunk cuts
    pixel_area = abs(info.transform[1] * info.transform[5] - info.transform[2] * info.transform[4])
    table = {name: np.asarray(a[:]) for name, a in store.region_table().arrays()}
    expected = reference(store)
    for suffix in FORMATS:
        out = tmp_path / f"aber{suffix}"
        result = export(aber, out, capsys=capsys)
        assert result["features"] == info.regions.count == len(table["id"])
        frame = gpd.read_file(out) if suffix != ".parquet" else gpd.read_parquet(out)
        assert len(frame) == info.regions.count and frame["id"].is_unique
        assert {"class_name", "perimeter", "area_m2", "centroid_x", "mean_b3"} <= set(frame.columns)
        if suffix == ".geojson":  # RFC 7946: WGS84 lon/lat
            assert frame.crs.to_epsg() == 4326
            assert frame.total_bounds[0] > -5 and frame.total_bounds[2] < -3  # Aberystwyth
            continue
        assert frame.crs == rasterio.crs.CRS.from_wkt(info.crs)
        assert frame.geometry.is_valid.all()
        assert set(frame.geometry.geom_type) <= {"Polygon", "MultiPolygon"}
        # polygon area = pixels x pixel area, on every feature
        np.testing.assert_allclose(frame.geometry.area, frame["pixels"] * pixel_area, rtol=1e-9)
        np.testing.assert_allclose(frame["area_m2"], frame.geometry.area, rtol=1e-9)
        # dissolving by id changes nothing: one feature per region, crossing ones included, no seam
        assert len(frame.dissolve("id")) == len(frame)
        # the same outline as the whole-image trace, feature by feature
        for row in frame.itertuples():
            other = expected[row.id]
            assert shapely.symmetric_difference(row.geometry, other).area <= 1e-6 * other.area, row.id
        # no two features of one class share an edge (4-connected regions touch at corners at most)
        tree = shapely.STRtree(frame.geometry.values)
        left, right = tree.query(frame.geometry.values, predicate="intersects")
        pairs = (left < right) & (frame["class"].values[left] == frame["class"].values[right])
        shared = shapely.intersection(frame.geometry.values[left[pairs]], frame.geometry.values[right[pairs]])
        assert (shapely.length(shared) == 0).all()


def test_eight_connected_regions_come_out_as_one_feature_each(
    aber: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    copy = tmp_path / "aber8.zarr"
    shutil.copytree(aber, copy)
    assert main(["regions", str(copy), "--compute", "--connectivity", "8", "--json", "--no-progress"]) == 0
    capsys.readouterr()
    store = MaskStore.open(copy)
    assert store.info.regions is not None and store.info.regions.connectivity == 8
    result = export(copy, tmp_path / "aber8.parquet", "--connectivity", "8", capsys=capsys)
    frame = gpd.read_parquet(tmp_path / "aber8.parquet")
    assert result["features"] == len(frame) == store.info.regions.count
    assert (frame.geometry.geom_type == "MultiPolygon").any()  # pieces that touch only at a corner
    assert frame.geometry.is_valid.all()
    pixel_area = abs(store.info.transform[1] * store.info.transform[5])
    np.testing.assert_allclose(frame.geometry.area, frame["pixels"] * pixel_area, rtol=1e-9)
    expected = reference(store)
    for row in frame.itertuples():
        assert shapely.symmetric_difference(row.geometry, expected[row.id]).area <= 1e-6 * row.geometry.area


def test_filters_and_simplification(aber: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    export(aber, tmp_path / "all.parquet", capsys=capsys)
    every = gpd.read_parquet(tmp_path / "all.parquet")
    water = export(aber, tmp_path / "water.gpkg", "--class", "water", "--min-area", "5000", capsys=capsys)
    frame = gpd.read_file(tmp_path / "water.gpkg")
    assert water["features"] == len(frame) > 0
    assert set(frame["class_name"]) == {"water"} and (frame["area_m2"] >= 5000).all()
    assert len(frame) == int(((every["class_name"] == "water") & (every["area_m2"] >= 5000)).sum())
    export(aber, tmp_path / "simple.fgb", "--simplify", "15", capsys=capsys)
    simple = gpd.read_file(tmp_path / "simple.fgb")
    assert len(simple) == len(every) and simple.geometry.is_valid.all()
    vertices = shapely.get_num_coordinates(simple.geometry.values).sum()
    assert vertices < 0.8 * shapely.get_num_coordinates(every.geometry.values).sum()


def test_bad_polygon_requests_are_one_line_and_leave_nothing(
    aber: Path,
    shipped_store,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],  # type: ignore[no-untyped-def]
) -> None:
    assert_one_line_error(raymask("export", str(aber), str(tmp_path / "x.shp")), "unknown export format .shp")
    assert_one_line_error(raymask("export", str(aber), str(tmp_path / "x.parquet"), "--class", "forest"),
                          "no class 'forest'")  # fmt: skip
    assert_one_line_error(raymask("export", str(aber), str(tmp_path / "x.parquet"), "--connectivity", "8"),
                          "the regions are 4-connected")  # fmt: skip
    ct, _ = shipped_store("ct-tissue.yaml")
    assert_one_line_error(raymask("export", str(ct), str(tmp_path / "x.gpkg")), "a volume store; polygons are for 2-D")
    (tmp_path / "taken.parquet").write_bytes(b"mine")
    assert_one_line_error(raymask("export", str(aber), str(tmp_path / "taken.parquet")), "already exists")
    assert (tmp_path / "taken.parquet").read_bytes() == b"mine"
    config = write_config(
        tmp_path / "noregions.yaml",
        source={"path": str(S2), "bands": [3, 8]},
        model={"kind": "ndvi", "red": 1, "nir": 2},
        output={"path": f"{tmp_path}/noregions.zarr", "preview": False},
        regions={"enabled": False},
        runtime={"engine": "process"},
    )
    assert main(["run", str(config), "--json"]) == 0
    capsys.readouterr()
    assert_one_line_error(raymask("export", str(tmp_path / "noregions.zarr"), str(tmp_path / "x.fgb")),
                          "no regions labelled")  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("x.", ".x."))) == []


def test_polygons_from_an_incomplete_store_or_into_an_unwritable_folder_are_refused(aber: Path, tmp_path: Path) -> None:
    import shutil

    assert_one_line_error(raymask("export", str(aber), "/proc/regions.parquet"), "/proc/regions.parquet: cannot write")
    copy = tmp_path / "half.zarr"
    shutil.copytree(aber, copy)
    MaskStore.open(copy, mode="r+").update_meta(status="incomplete")
    result = raymask("export", str(copy), str(tmp_path / "half.fgb"))
    assert_one_line_error(result, "the store is incomplete; finish the job before exporting polygons")
    assert not (tmp_path / "half.fgb").exists()
