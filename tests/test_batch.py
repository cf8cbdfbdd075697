"""`raymask batch` and `raymask catalog`: skip, resume, new and changed files, failure isolation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.cli import main
from pipeline.store import MaskStore
from tests.conftest import CT_SERIES, EDGE_CASES, ROOT, S2, GeoTiffFactory, write_config

pytestmark = pytest.mark.usefixtures("ray_session")


def batch(capsys: pytest.CaptureFixture[str], config: Path, *extra: str) -> tuple[int, dict]:
    code = main(["batch", str(config), "--json", *extra])
    return code, json.loads(capsys.readouterr().out)


def by_input(report: dict) -> dict[str, dict]:
    return {Path(r["input"]).name: r for r in report["results"]}


@pytest.fixture
def archive(tmp_path: Path, make_geotiff: GeoTiffFactory) -> Path:
    """scenes/: two Sentinel-2 copies and two small scenes, one of them in a subfolder."""
    scenes = tmp_path / "scenes"
    (scenes / "a").mkdir(parents=True)
    shutil.copy(S2, scenes / "aber.tif")
    shutil.copy(S2, scenes / "a" / "b.tif")
    rng = np.random.default_rng(0)
    for name in ("a_b.tif", "small.tif"):
        data = rng.integers(1, 3000, size=(10, 70, 90)).astype(np.uint16)
        shutil.move(make_geotiff(data, name=name), scenes / name)
    return scenes


def nightly_config(tmp_path: Path, scenes: Path) -> Path:
    return write_config(
        tmp_path / "nightly.yaml",
        inputs=[f"{scenes}/**/*.tif"],
        source={"bands": [3, 8]},
        model={"kind": "ndvi"},
        tiling={"chunk": 64},
        output={"root": f"{tmp_path}/masks"},
    )


@pytest.mark.slow  # end to end, several seconds: `make test` runs it, `make check` does not
def test_scheduled_semantics(tmp_path: Path, archive: Path, capsys: pytest.CaptureFixture[str], make_geotiff) -> None:
    config = nightly_config(tmp_path, archive)
    root = tmp_path / "masks"
    code, first = batch(capsys, config)
    assert code == 0 and first["counts"] == {"done": 4, "resumed": 0, "skipped": 0, "busy": 0, "failed": 0}
    # Names mirror the input paths: a/b.tif and a_b.tif never collide, nothing leaves the root.
    stores = sorted(str(p.relative_to(root)) for p in root.rglob("*.zarr"))
    assert stores == ["a/b.tif.zarr", "a_b.tif.zarr", "aber.tif.zarr", "small.tif.zarr"]
    assert json.loads((root / "batch-report.json").read_text())["ok"] is True
    aber = zarr.open_group(root / "aber.tif.zarr", mode="r")
    assert aber.attrs["raymask"]["status"] == "complete"

    code, second = batch(capsys, config)  # right after: no inference at all
    assert code == 0 and second["counts"]["skipped"] == 4 and all(r["units_run"] == 0 for r in second["results"])
    assert main(["batch", str(config)]) == 0
    assert "4 skipped (already complete)" in capsys.readouterr().out

    rng = np.random.default_rng(1)
    shutil.move(
        make_geotiff(rng.integers(1, 3000, (10, 40, 40)).astype(np.uint16), name="new.tif"), archive / "new.tif"
    )
    code, third = batch(capsys, config)  # one new file: only that one runs
    assert code == 0 and by_input(third)["new.tif"]["status"] == "done"
    assert third["counts"]["skipped"] == 4

    before = zarr.open_array(root / "small.tif.zarr" / "mask", mode="r")[:]
    changed = rng.integers(1, 3000, (10, 70, 90)).astype(np.uint16)
    shutil.move(make_geotiff(changed, name="small.tif"), archive / "small.tif")  # same name, new content
    code, fourth = batch(capsys, config)
    assert code == 0 and by_input(fourth)["small.tif"]["status"] == "done" and fourth["counts"]["skipped"] == 4
    after = zarr.open_array(root / "small.tif.zarr" / "mask", mode="r")[:]
    assert not np.array_equal(before, after)
    assert not list(root.rglob("*.next")) and not list(root.rglob("*.old-*"))


@pytest.mark.slow  # end to end, several seconds: `make test` runs it, `make check` does not
def test_a_failing_input_is_recorded_and_never_stops_the_others(
    tmp_path: Path, archive: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (archive / "notes.tif").write_text("not a raster")  # fails when opened
    truncated = archive / "truncated.tif"  # opens, then fails while its tiles are read
    shutil.copy(archive / "aber.tif", truncated)
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 3])
    code, report = batch(capsys, nightly_config(tmp_path, archive))
    assert code == 1
    results = by_input(report)
    assert results["notes.tif"]["status"] == "failed" and "not a raster GDAL can read" in results["notes.tif"]["error"]
    assert results["truncated.tif"]["status"] == "failed" and results["truncated.tif"]["traceback"]
    assert "the file is truncated or corrupt" in results["truncated.tif"]["error"]
    assert [results[n]["status"] for n in ("aber.tif", "b.tif", "a_b.tif", "small.tif")] == ["done"] * 4
    meta = json.loads((tmp_path / "masks" / "truncated.tif.zarr" / "zarr.json").read_text())
    assert meta["attributes"]["raymask"]["status"] == "incomplete"


@pytest.mark.slow  # end to end, several seconds: `make test` runs it, `make check` does not
def test_a_changed_file_that_fails_leaves_the_previous_store_complete(
    tmp_path: Path, archive: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = nightly_config(tmp_path, archive)
    assert batch(capsys, config)[0] == 0
    store = tmp_path / "masks" / "aber.tif.zarr"
    before = zarr.open_array(store / "mask", mode="r")[:]
    data = (archive / "aber.tif").read_bytes()
    (archive / "aber.tif").write_bytes(data[: len(data) // 3])  # a new version that breaks mid-read
    code, report = batch(capsys, config)
    assert code == 1 and by_input(report)["aber.tif"]["status"] == "failed"
    # The previous version is still there, complete and unchanged; the new one waits beside it.
    assert zarr.open_group(store, mode="r").attrs["raymask"]["status"] == "complete"
    np.testing.assert_array_equal(zarr.open_array(store / "mask", mode="r")[:], before)
    assert (tmp_path / "masks" / "aber.tif.zarr.next").is_dir()


@pytest.mark.slow  # end to end, several seconds: `make test` runs it, `make check` does not
def test_dicom_study_folders_split_into_series_and_the_catalog_lists_everything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study = tmp_path / "studies" / "patient1"
    shutil.copytree(CT_SERIES, study / "ct")
    shutil.copy(EDGE_CASES / "693_UNCR.dcm", study / "scout")  # a second series in the same study
    config = write_config(
        tmp_path / "dicom.yaml",
        inputs=[f"{tmp_path}/studies/*"],
        model={"kind": "hu-tissue"},
        tiling={"chunk": 256},
        output={"root": f"{tmp_path}/masks"},
    )
    code, report = batch(capsys, config)
    assert code == 0 and report["counts"]["done"] == 2
    stores = sorted(str(p.relative_to(tmp_path / "masks")) for p in (tmp_path / "masks").rglob("*.zarr"))
    assert len(stores) == 2 and all(s.startswith("patient1/CT-") for s in stores)

    assert main(["catalog", str(tmp_path / "masks"), "--json", "--out", str(tmp_path / "catalog.parquet")]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["status"] for r in rows} == {"complete"} and len(rows) == 2
    volume = next(r for r in rows if r["spacing_mm"])
    assert volume["shape"] == "20x512x512" and volume["bone_volume_ml"] > 0
    assert (volume["slices"], volume["rows"], volume["cols"]) == (20, 512, 512) and volume["epsg"] is None
    import pyarrow.parquet as pq

    assert pq.read_table(tmp_path / "catalog.parquet").num_rows == 2
    assert main(["catalog", str(tmp_path / "masks")]) == 0
    assert "complete" in capsys.readouterr().out


def test_bad_batch_inputs(tmp_path: Path, archive: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "bad.yaml"
    ndvi = {"kind": "ndvi"}
    write_config(config, inputs=[f"{tmp_path}/nothing/*.tif"], model=ndvi, output={"root": "out"})
    assert main(["batch", str(config)]) == 1
    assert capsys.readouterr().err.strip().endswith("nothing/*.tif: matches nothing")

    (tmp_path / "afile").write_text("x")
    write_config(config, inputs=[f"{archive}/*.tif"], model=ndvi, output={"root": f"{tmp_path}/afile"})
    assert main(["batch", str(config)]) == 1
    assert "the output root is a file" in capsys.readouterr().err

    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(archive / "small.tif", other / "small.tif")
    write_config(config, inputs=[f"{archive}/*.tif", f"{other}/*.tif"], model=ndvi, output={"root": f"{tmp_path}/m"})
    assert main(["batch", str(config)]) == 1
    assert "would share the store name small.tif.zarr" in capsys.readouterr().err


@pytest.mark.slow  # end to end, several seconds: `make test` runs it, `make check` does not
def test_the_shipped_nightly_config_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    code, report = batch(capsys, ROOT / "configs" / "archive-nightly.yaml", "--set", f"output.root={tmp_path}/archive")
    assert code == 0 and report["counts"]["done"] == 3
    written = sorted(where for r in report["results"] for where in r["exports"].values() if "not written" not in where)
    assert sorted(Path(w).suffix for w in written) == [".dcm", ".parquet", ".parquet"]
    assert all((tmp_path / "archive" / w).is_file() for w in written)


@pytest.mark.slow  # end to end, several seconds: `make test` runs it, `make check` does not
def test_batch_exports_beside_each_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """output.exports: each fitting export beside its store, named after it; rewritten for a new store,
    kept for a skipped one, written again when missing; an unfit one is named, not failed."""
    import geopandas as gpd
    import rasterio

    scenes = tmp_path / "scenes"
    (scenes / "a").mkdir(parents=True)
    shutil.copy(S2, scenes / "aber.tif")
    shutil.copy(S2, scenes / "a" / "b.tif")
    config = write_config(
        tmp_path / "nightly.yaml",
        inputs=[f"{scenes}/**/*.tif"],
        source={"bands": [3, 8]},
        model={"kind": "ndvi"},
        tiling={"chunk": 128},
        output={"root": f"{tmp_path}/masks", "exports": ["parquet", "cog", "seg"]},
    )
    root = tmp_path / "masks"
    code, report = batch(capsys, config)
    assert code == 0 and report["counts"]["done"] == 2
    result = by_input(report)["b.tif"]
    assert result["exports"]["parquet"] == "a/b.tif.parquet" and result["exports"]["cog"] == "a/b.tif.tif"
    assert result["exports"]["seg"].startswith("not written: a 2-D store")
    for name in ("aber.tif", "a/b.tif"):
        store = MaskStore.open(root / f"{name}.zarr")
        polygons = gpd.read_parquet(root / f"{name}.parquet")
        assert len(polygons) == store.info.regions.count
        with rasterio.open(root / f"{name}.tif") as cog:
            assert np.array_equal(cog.read(1), np.asarray(store.mask[:]))
    assert not list(root.rglob(".*writing*")) and not list(root.rglob(".*polygons-*"))

    stamp = (root / "aber.tif.parquet").stat().st_mtime_ns
    (root / "a" / "b.tif.tif").unlink()
    code, again = batch(capsys, config)
    assert code == 0 and again["counts"]["skipped"] == 2
    assert (root / "aber.tif.parquet").stat().st_mtime_ns == stamp  # kept
    assert (root / "a" / "b.tif.tif").is_file()  # written again
    assert main(["batch", str(config)]) == 0
    assert "exports parquet, cog" in capsys.readouterr().out


@pytest.mark.slow  # end to end, several seconds: `make test` runs it, `make check` does not
def test_batch_exports_volumes_as_seg_and_nifti(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import highdicom as hd
    import nibabel as nib

    shutil.copytree(CT_SERIES, tmp_path / "studies" / "p1" / "ct")
    config = write_config(
        tmp_path / "dicom.yaml",
        inputs=[f"{tmp_path}/studies/*"],
        model={"kind": "hu-tissue"},
        tiling={"chunk": [10, 256, 256]},
        output={"root": f"{tmp_path}/masks", "exports": ["seg", "nifti", "parquet"]},
    )
    code, report = batch(capsys, config)
    assert code == 0, report
    (result,) = report["results"]
    store_path = tmp_path / "masks" / result["store"]
    mask = np.asarray(MaskStore.open(store_path).mask[:])
    assert result["exports"]["parquet"].startswith("not written: a volume")
    seg = hd.seg.segread(tmp_path / "masks" / result["exports"]["seg"])
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["air", "lung", "fat", "soft tissue", "bone"]
    image = nib.load(tmp_path / "masks" / result["exports"]["nifti"])
    assert np.array_equal(np.asarray(image.dataobj).transpose(2, 1, 0), mask)
