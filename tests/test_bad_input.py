"""Bad input: one line on stderr naming the file and the problem, a non-zero exit, no complete store.

These run the installed console entry point in a subprocess, as a user would.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import S2, GeoTiffFactory, write_config

RAYMASK = [sys.executable, "-m", "pipeline.cli"]


def raymask(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*RAYMASK, *args], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def write_job(
    tmp_path: Path, source: str, *, model: str = "{kind: ndvi, red: 1, nir: 2}", bands: str = "[3, 8]"
) -> Path:
    config = tmp_path / "job.yaml"
    config.write_text(
        f"source: {{path: {source}, bands: {bands}}}\nmodel: {model}\n"
        f"tiling: {{chunk: 64, halo: 8}}\noutput: {{path: '{tmp_path}/out.zarr'}}\n"
    )
    return config


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("raymask: error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def assert_no_complete_store(tmp_path: Path) -> None:
    meta = tmp_path / "out.zarr" / "zarr.json"
    assert not meta.exists() or '"complete"' not in meta.read_text()


def test_missing_file(tmp_path: Path) -> None:
    result = raymask("run", str(write_job(tmp_path, "data/missing.tif")))
    assert_one_line_error(result, "data/missing.tif: file not found")
    assert_no_complete_store(tmp_path)


def test_not_a_raster(tmp_path: Path) -> None:
    (tmp_path / "notes.tif").write_text("hello")
    result = raymask("run", str(write_job(tmp_path, f"'{tmp_path}/notes.tif'")))
    assert_one_line_error(result, "notes.tif: not a raster GDAL can read")
    assert_no_complete_store(tmp_path)


def test_band_out_of_range(tmp_path: Path) -> None:
    result = raymask("run", str(write_job(tmp_path, f"'{S2}'", bands="[3, 11]")))
    assert_one_line_error(result, "sen2_20210527_aber_subset.tif: band 11 requested, but the file has 10")
    assert_no_complete_store(tmp_path)


def test_model_band_position_out_of_range(tmp_path: Path) -> None:
    result = raymask("run", str(write_job(tmp_path, f"'{S2}'", model="{kind: ndvi, red: 1, nir: 3}")))
    assert_one_line_error(result, "model.nir: band position 3, but only 2 bands are selected")


def test_band_files_on_different_grids(tmp_path: Path, make_geotiff: GeoTiffFactory) -> None:
    a = make_geotiff(np.ones((1, 20, 20), np.uint16), name="red.tif")
    b = make_geotiff(np.ones((1, 20, 21), np.uint16), name="nir.tif")
    result = raymask("run", str(write_job(tmp_path, f"['{a}', '{b}']", bands="[1, 2]")))
    assert_one_line_error(result, f"{b}: not on the grid of {a}", "shape (20, 21) vs (20, 20)")
    assert_no_complete_store(tmp_path)


def test_stride_that_does_not_divide_the_chunk(tmp_path: Path) -> None:
    model = "{kind: torchscript, path: m.pt, classes: [a, b], stride: 24}"
    result = raymask("run", str(write_job(tmp_path, f"'{S2}'", model=model)))
    assert_one_line_error(result, "job.yaml", "tiling.chunk (64) must be a multiple of the model stride (24)")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("tiling.chunk=0", "tiling.chunk: Input should be greater than 0 (got 0)"),
        ("tiling.chunk=-64", "tiling.chunk: Input should be greater than 0 (got -64)"),
        ("tiling.halo=-8", "tiling.halo: Input should be greater than or equal to 0 (got -8)"),
        (
            "tiling.padding=8",
            "unknown key 'tiling.padding' (allowed: chunk, halo, chunks_per_unit, edge, stitch, window, overlap, "
            "weights, sigma)",
        ),
    ],
)
def test_bad_tiling_and_unknown_keys(tmp_path: Path, override: str, message: str) -> None:
    result = raymask("run", str(write_job(tmp_path, f"'{S2}'")), "--set", override)
    assert_one_line_error(result, "job.yaml", message)
    assert_no_complete_store(tmp_path)


def test_unwritable_output_path(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where a folder should be")
    result = raymask("run", str(write_job(tmp_path, f"'{S2}'")), "--set", f"output.path={blocker}/out.zarr")
    assert_one_line_error(result, f"{blocker}/out.zarr: cannot create the output folder")


def test_output_path_that_is_not_a_store_is_never_deleted(tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("keep me")
    result = raymask("run", str(write_job(tmp_path, f"'{S2}'")), "--set", f"output.path={precious}", "--overwrite")
    assert_one_line_error(result, f"{precious}: not a zarr store")
    assert (precious / "thesis.txt").read_text() == "keep me"


def test_missing_model_file(tmp_path: Path) -> None:
    model = "{kind: torchscript, path: nowhere.pt, classes: [a, b], stride: 1}"
    result = raymask("run", str(write_job(tmp_path, f"'{S2}'", model=model)))
    assert_one_line_error(result, "nowhere.pt: model file not found")


def test_info_on_something_that_is_not_a_store(tmp_path: Path) -> None:
    assert_one_line_error(raymask("info", str(tmp_path / "nothing.zarr")), "nothing.zarr: no such store")


def test_unreachable_cluster_fails_fast(tmp_path: Path) -> None:
    result = raymask("run", str(write_job(tmp_path, f"'{S2}'")), "--set", "runtime.address=127.0.0.1:1")
    assert result.returncode == 75  # transient: a scheduler may retry
    assert "cannot reach a Ray cluster at '127.0.0.1:1'" in result.stderr.splitlines()[-1]
    assert_no_complete_store(tmp_path)


def test_dicom_series_with_a_missing_slice(tmp_path: Path) -> None:
    import shutil

    import pydicom

    from tests.conftest import CT_SERIES

    folder = tmp_path / "series"
    shutil.copytree(CT_SERIES, folder)
    ordered = sorted(
        folder.iterdir(), key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2])
    )
    ordered[10].unlink()
    config = tmp_path / "job.yaml"
    out = {"path": f"{tmp_path}/out.zarr"}
    write_config(config, source={"path": str(folder)}, model={"kind": "hu-tissue"}, output=out)
    result = raymask("run", str(config))
    assert_one_line_error(
        result, f"{folder}:", "missing slice: step of 4.000 mm between positions -786.500 and -782.500 mm"
    )
    assert not (tmp_path / "out.zarr").exists()


@pytest.mark.slow  # end to end, several seconds: `make test` runs it, `make check` does not
def test_truncated_dicom_fails_in_ingest_with_one_line_and_an_incomplete_store(tmp_path: Path) -> None:
    import shutil

    from tests.conftest import CT_SERIES

    folder = tmp_path / "series"
    shutil.copytree(CT_SERIES, folder)
    victim = sorted(folder.iterdir())[4]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    config = tmp_path / "job.yaml"
    out = {"path": f"{tmp_path}/out.zarr"}
    write_config(config, source={"path": str(folder)}, model={"kind": "hu-tissue"}, output=out)
    result = raymask("run", str(config), "--set", "runtime.address=local")
    lines = [line for line in result.stderr.splitlines() if line.startswith("raymask:")]
    assert result.returncode == 1 and lines, result.stderr
    assert lines[-1].startswith(f"raymask: error: {victim}: cannot decode pixel data"), lines[-1]
    assert_no_complete_store(tmp_path)


def test_a_rotated_geographic_grid_is_refused_before_any_store_exists(tmp_path: Path) -> None:
    """Geodesic pixel areas need a north-up grid: a rotated lon/lat grid is one line, and no store
    (not even an incomplete one) is left behind."""
    import numpy as np
    import rasterio
    from rasterio.crs import CRS
    from rasterio.transform import Affine

    path = tmp_path / "rotated.tif"
    transform = Affine(0.0001, 0.00002, -4.1, 0.00002, -0.0001, 52.4)  # rotated, in degrees
    with rasterio.open(path, "w", driver="GTiff", width=32, height=32, count=2, dtype="uint8",
                       crs=CRS.from_epsg(4326), transform=transform) as dst:  # fmt: skip
        dst.write(np.random.default_rng(0).integers(0, 255, (2, 32, 32), dtype=np.uint8))
    result = raymask("run", str(write_job(tmp_path, f"'{path}'", bands="[1, 2]")))
    assert_one_line_error(result, "rotated.tif: geodesic areas need a north-up grid")
    assert not (tmp_path / "out.zarr").exists()
    assert not list(tmp_path.glob(".out.zarr*"))
