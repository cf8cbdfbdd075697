"""Lower-resolution levels (issue 13, deliverable 4): the pure rules property-tested against brute
force, the levels of the bundled stores checked against an independent computation and validated by
ome-zarr-models, and the COG export's overviews equal to them, with class names GDAL lists."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import rasterio
import zarr
from affine import Affine
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from ome_zarr_models.v05.image import Image
from ome_zarr_models.v05.multiscales import Multiscale

from pipeline.cli import main
from pipeline.core.pyramid import level_shapes, level_transform, mean2x, mode2x, ngff_scale_translation
from pipeline.store import MaskStore
from pipeline.store.levels import write_levels
from tests.conftest import ROOT, S2

NODATA = 255


# -- the pure rules, against brute force ----------------------------------------------------------


def brute_mode(labels: np.ndarray, nodata: int) -> np.ndarray:
    rows, cols = -(-labels.shape[0] // 2), -(-labels.shape[1] // 2)
    out = np.full((rows, cols), nodata, dtype=labels.dtype)
    for r in range(rows):
        for c in range(cols):
            block = [int(v) for v in labels[2 * r : 2 * r + 2, 2 * c : 2 * c + 2].ravel() if v != nodata]
            if block:
                counts = {v: block.count(v) for v in block}
                out[r, c] = min(v for v in counts if counts[v] == max(counts.values()))
    return out


def block_mode(labels: np.ndarray, nodata: int) -> np.ndarray:
    """The same by counting each class over 2 x 2 blocks (whole arrays at once; argmax takes the
    first, so the smaller class, on a tie)."""
    pad = [(0, 0)] * (labels.ndim - 2) + [(0, labels.shape[-2] % 2), (0, labels.shape[-1] % 2)]
    padded = np.pad(labels, pad, constant_values=nodata)
    r, c = padded.shape[-2] // 2, padded.shape[-1] // 2
    classes = np.array(sorted(set(np.unique(labels).tolist()) - {nodata}), dtype=labels.dtype)
    counts = np.stack([(padded == v).reshape(*padded.shape[:-2], r, 2, c, 2).sum(axis=(-3, -1)) for v in classes])
    out = classes[counts.argmax(axis=0)]
    return np.where(counts.max(axis=0) > 0, out, nodata).astype(labels.dtype)


@settings(max_examples=200, deadline=None)
@given(arrays(np.uint8, st.tuples(st.integers(1, 9), st.integers(1, 9)), elements=st.sampled_from([0, 1, 2, 7, 255])))
def test_mode_is_the_most_frequent_label_of_each_block(labels: np.ndarray) -> None:
    assert np.array_equal(mode2x(labels, NODATA), brute_mode(labels, NODATA))


@settings(max_examples=100, deadline=None)
@given(
    arrays(np.uint32, st.tuples(st.integers(1, 3), st.integers(1, 7), st.integers(1, 7)), elements=st.integers(0, 4))
)
def test_mode_of_region_ids_keeps_leading_axes(ids: np.ndarray) -> None:
    got = mode2x(ids, 0)
    assert got.dtype == np.uint32
    for k in range(ids.shape[0]):
        assert np.array_equal(got[k], brute_mode(ids[k], 0))


@settings(max_examples=200, deadline=None)
@given(
    arrays(np.float32, st.tuples(st.integers(1, 9), st.integers(1, 9)),
           elements=st.one_of(st.floats(-1000, 3000, width=32), st.just(np.nan)))
)  # fmt: skip
def test_mean_is_the_mean_of_the_finite_values_of_each_block(image: np.ndarray) -> None:
    got = mean2x(image)
    assert got.dtype == np.float32
    for r in range(got.shape[0]):
        for c in range(got.shape[1]):
            block = image[2 * r : 2 * r + 2, 2 * c : 2 * c + 2]
            finite = block[np.isfinite(block)]
            if finite.size:
                assert got[r, c] == pytest.approx(float(np.mean(finite.astype(np.float64))), rel=1e-6, abs=1e-3)
            else:
                assert np.isnan(got[r, c])


@given(st.integers(1, 100_000), st.integers(1, 100_000), st.sampled_from([64, 256, 512]))
def test_levels_halve_until_one_chunk(rows: int, cols: int, chunk: int) -> None:
    shapes = level_shapes((rows, cols), (chunk, chunk))
    previous = (rows, cols)
    for shape in shapes:
        assert shape == (-(-previous[0] // 2), -(-previous[1] // 2))
        previous = shape
    assert previous[0] <= chunk and previous[1] <= chunk
    if shapes:  # the level before the last did not fit yet
        before = shapes[-2] if len(shapes) > 1 else (rows, cols)
        assert before[0] > chunk or before[1] > chunk


@given(st.integers(0, 6), st.integers(0, 50), st.integers(0, 50))
def test_level_geometry_has_no_half_pixel_shift(level: int, row: int, col: int) -> None:
    base = Affine(10.0, 0.0, 500_000.0, 0.0, -10.0, 4_000_000.0)
    k = 2**level
    scaled = Affine.from_gdal(*level_transform(base.to_gdal(), level))
    # a level pixel's corner is the corner of the block of level-0 pixels it covers
    assert scaled * (col, row) == pytest.approx(base * (col * k, row * k))
    assert scaled * (col + 1, row + 1) == pytest.approx(base * ((col + 1) * k, (row + 1) * k))
    # NGFF's centre-based form: a level pixel's centre is its block's centre in level-0 units
    scale, translation = ngff_scale_translation([10.0, 10.0], level)
    assert row * scale[0] + translation[0] == pytest.approx(10.0 * (row * k + (k - 1) / 2))


# -- the bundled stores ---------------------------------------------------------------------------


def test_volume_levels_validate_as_ngff_and_equal_an_independent_reduction(shipped_store) -> None:  # type: ignore[no-untyped-def]
    ct, _ = shipped_store("ct-tissue.yaml")
    store = MaskStore.open(ct)
    levels = store.info.levels
    assert levels and [lv["shape"] for lv in levels] == [[20, 256, 256]]  # chunk (10, 256, 256): one step
    group = zarr.open_group(ct, mode="r")
    image = Image.from_zarr(group)  # ome-zarr-models: the image and every label image have as many levels
    assert [d.path for d in image.ome_attributes.multiscales[0].datasets] == ["0", "1"]
    mask = np.asarray(group["labels/mask/0"][:])
    level1 = np.asarray(group["labels/mask/1"][:])
    assert np.array_equal(level1, block_mode(mask, NODATA))
    hu = np.asarray(group["0"][:], dtype=np.float64)
    expected = hu.reshape(20, 256, 2, 256, 2).mean(axis=(2, 4))
    np.testing.assert_allclose(np.asarray(group["1"][:]), expected, rtol=1e-6, atol=1e-3)
    transforms = group["labels/mask"].attrs["ome"]["multiscales"][0]["datasets"][1]["coordinateTransformations"]
    spacing = store.info.volume.spacing_mm
    assert transforms[0]["scale"] == [spacing[0], spacing[1] * 2, spacing[2] * 2]
    assert transforms[1]["translation"] == [0.0, spacing[1] / 2, spacing[2] / 2]
    regions = np.asarray(group["labels/regions/1"][:])
    assert regions.shape == (20, 256, 256) and regions.dtype == group["labels/regions/0"].dtype


def test_map_levels_follow_the_same_layout(shipped_store) -> None:  # type: ignore[no-untyped-def]
    aber, _ = shipped_store("aerial-vegetation.yaml")
    store = MaskStore.open(aber)
    group = zarr.open_group(aber, mode="r")
    levels = store.info.levels
    assert [lv["shape"] for lv in levels] == [[170, 162], [85, 81]]  # 339 x 324, chunk 128
    previous = np.asarray(group["mask"][:])
    base = Affine.from_gdal(*store.info.transform)
    for lv in levels:
        array = np.asarray(group[lv["mask"]][:])
        assert np.array_equal(array, block_mode(previous, NODATA))
        assert Affine.from_gdal(*lv["transform"]) == base * Affine.scale(2 ** lv["level"])
        previous = array
    (multiscale,) = group["levels/mask"].attrs["multiscales"]
    Multiscale.model_validate(multiscale)  # NGFF's schema, though a map is not an OME-Zarr image
    assert [d["path"] for d in multiscale["datasets"]] == ["../../mask", "1", "2"]
    assert multiscale["datasets"][1]["coordinateTransformations"][0]["scale"] == [20.0, 20.0]
    assert [a["unit"] for a in multiscale["axes"]] == ["meter", "meter"]


def test_levels_are_rewritten_whole_and_follow_a_relabelling(shipped_store, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ct, _ = shipped_store("ct-tissue.yaml")
    copy = tmp_path / "ct.zarr"
    shutil.copytree(ct, copy)
    group = zarr.open_group(copy, mode="r+")
    group["labels/mask"].create_array("5", shape=(1, 1, 1), dtype="uint8")  # a cut-short attempt's leftover
    before = np.asarray(group["labels/mask/1"][:])
    store = MaskStore.open(copy, mode="r+")
    assert write_levels(store) == MaskStore.open(ct).info.levels
    group = zarr.open_group(copy, mode="r")
    assert sorted(group["labels/mask"].array_keys()) == ["0", "1"]
    assert np.array_equal(np.asarray(group["labels/mask/1"][:]), before)
    assert main(["regions", str(copy), "--compute", "--connectivity", "26", "--json"]) == 0
    group = zarr.open_group(copy, mode="r")
    Image.from_zarr(group)
    regions = np.asarray(group["labels/regions/0"][:])
    level1 = np.asarray(group["labels/regions/1"][:])
    for k in (0, 9, 19):  # region ids are many: slices checked one by one
        assert np.array_equal(level1[k], brute_mode(regions[k], 0))


def test_a_job_can_go_without_levels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "aber.zarr"
    argv = ["run", str(ROOT / "configs" / "aerial-vegetation.yaml"), "--set", f"output.path={store}"]
    argv += ["--set", f"source.path={S2}"]
    assert main([*argv, "--set", "output.levels=false", "--no-progress", "--json"]) == 0
    capsys.readouterr()
    assert MaskStore.open(store).info.levels is None and "levels" not in zarr.open_group(store, mode="r")
    out = tmp_path / "aber.tif"
    assert main(["export", str(store), str(out)]) == 0
    with rasterio.open(out) as cog:
        # GDAL's own overview rule instead: none for an image within its 512-pixel tile
        assert cog.overviews(1) == [] and np.array_equal(cog.read(1), np.asarray(MaskStore.open(store).mask[:]))


# -- the COG export -------------------------------------------------------------------------------


def test_the_cog_overviews_are_the_store_levels_and_gdal_lists_the_classes(shipped_store, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    aber, _ = shipped_store("aerial-vegetation.yaml")
    store = MaskStore.open(aber)
    out = tmp_path / "aber.tif"
    assert main(["export", str(aber), str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aber.tif", "aber.tif.aux.xml"]
    group = zarr.open_group(aber, mode="r")
    with rasterio.open(out) as cog:
        assert cog.overviews(1) == [2, 4]
        assert np.array_equal(cog.read(1), np.asarray(group["mask"][:]))
    for k, lv in enumerate(store.info.levels):
        with rasterio.open(out, overview_level=k) as overview:
            assert np.array_equal(overview.read(1), np.asarray(group[lv["mask"]][:]))
    gdalinfo = shutil.which("gdalinfo")
    assert gdalinfo, "gdalinfo not found: make test installs Debian's gdal-bin"
    info = json.loads(subprocess.run([gdalinfo, "-json", str(out)], capture_output=True, text=True, check=True).stdout)
    band = info["bands"][0]
    assert band["categories"] == ["other", "vegetation", "water"]
    assert band["noDataValue"] == 255
    rat = info["rat"]
    names = [f["name"] for f in rat["fieldDefn"]]
    rows = {row["f"][names.index("class")]: row["f"] for row in rat["row"]}
    stats = store.info.stats["classes"]
    for name, row in rows.items():
        assert row[names.index("pixels")] == stats[name]["pixels"]
        assert row[names.index("area_m2")] == pytest.approx(stats[name]["area_m2"])


def test_the_cog_export_of_a_store_missing_a_mask_chunk_is_one_line_and_writes_nothing(  # type: ignore[no-untyped-def]
    shipped_store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    aber, _ = shipped_store("aerial-vegetation.yaml")
    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(aber, damaged)
    chunk = damaged / "mask" / "c" / "0" / "1"
    assert chunk.is_file()
    chunk.unlink()
    out = tmp_path / "out" / "aber.tif"
    assert main(["export", str(damaged), str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "mask chunk 0/1 is missing" in err and str(damaged) in err, err
    assert not out.exists() and list(out.parent.iterdir()) == []
