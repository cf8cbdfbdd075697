"""Hostile conditions found by trying raymask as a new user would (issue 11): nothing a command
writes may replace one of its inputs or an existing file unasked, an output that cannot be made is
one line before anything is written, and a run that cannot reach its cluster changes nothing.

These run the console entry point in a subprocess, as a user would.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import CT_SERIES, ROOT, GeoTiffFactory, write_config
from tests.test_bad_input import assert_one_line_error, raymask


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def scene_store(tmp_path: Path, make_geotiff: GeoTiffFactory) -> tuple[Path, Path, Path]:
    """A small two-band scene, its job config and the complete store made from it: (scene, config, store)."""
    rng = np.random.default_rng(3)
    scene = make_geotiff(rng.random((2, 40, 40)).astype(np.float32), name="scene.tif")
    store = tmp_path / "out" / "scene.zarr"
    config = write_config(
        tmp_path / "job.yaml",
        source={"path": str(scene)},
        model={"kind": "ndvi", "red": 1, "nir": 2},
        tiling={"chunk": 32},
        output={"path": str(store), "preview": False},
        runtime={"engine": "process"},
    )
    result = raymask("run", str(config))
    assert result.returncode == 0, result.stderr
    return scene, config, store


def test_export_never_replaces_the_source_image(scene_store: tuple[Path, Path, Path]) -> None:
    scene, _, store = scene_store
    before = digest(scene)
    for extra in ([], ["--overwrite"]):
        result = raymask("export", str(store), str(scene), *extra)
        assert_one_line_error(result, f"{scene}: is an input of this job")
        assert digest(scene) == before


def test_export_and_tables_refuse_an_existing_file_unless_asked(scene_store, tmp_path: Path) -> None:
    _, _, store = scene_store
    target = tmp_path / "mask.tif"
    target.write_bytes(b"someone else's file")
    assert_one_line_error(raymask("export", str(store), str(target)), f"{target}: already exists; pass --overwrite")
    assert target.read_bytes() == b"someone else's file"
    assert raymask("export", str(store), str(target), "--overwrite").returncode == 0
    assert target.read_bytes()[:4] in (b"II*\x00", b"MM\x00*")

    table = tmp_path / "regions.csv"
    table.write_text("keep me")
    assert_one_line_error(raymask("regions", str(store), "--out", str(table)), "already exists; pass --overwrite")
    assert table.read_text() == "keep me"
    assert raymask("regions", str(store), "--out", str(table), "--overwrite").returncode == 0
    assert table.read_text().startswith("id,")
    assert_one_line_error(raymask("catalog", str(store.parent), "--out", str(table)), "already exists")


def test_export_into_the_store_itself_is_refused(scene_store) -> None:
    _, _, store = scene_store
    assert_one_line_error(raymask("export", str(store), str(store / "mask.tif")), "lies inside the input folder")


def test_a_run_never_writes_its_store_over_or_inside_an_input(scene_store, tmp_path: Path) -> None:
    scene, config, _ = scene_store
    before = digest(scene)
    result = raymask("run", str(config), "--set", f"output.path={scene}", "--overwrite")
    assert_one_line_error(result, f"{scene}: is an input of this job")
    assert digest(scene) == before
    series = tmp_path / "series"
    shutil.copytree(CT_SERIES, series)
    ct = write_config(tmp_path / "ct.yaml", source={"path": str(series)}, model={"kind": "hu-tissue"},
                      output={"path": str(series / "ct.zarr")})  # fmt: skip
    assert_one_line_error(raymask("run", str(ct)), "lies inside the input folder")
    assert sorted(p.name for p in series.iterdir()) == sorted(p.name for p in CT_SERIES.iterdir())


@pytest.mark.parametrize("where", ["/proc/raymask.zarr", "/proc/raymask/deeper.zarr"])
def test_an_output_that_cannot_be_created_is_one_line(scene_store, where: str) -> None:
    _, config, _ = scene_store
    result = raymask("run", str(config), "--set", f"output.path={where}")
    assert_one_line_error(result, where)
    assert "Traceback" not in result.stderr


def test_an_export_that_cannot_be_created_is_one_line(scene_store) -> None:
    _, _, store = scene_store
    assert_one_line_error(raymask("export", str(store), "/proc/mask.tif"), "/proc/mask.tif: cannot write")


def test_an_unreachable_cluster_changes_nothing_at_the_output(scene_store, tmp_path: Path) -> None:
    _, config, store = scene_store
    fresh = tmp_path / "fresh.zarr"
    unreachable = ["--set", "runtime.address=127.0.0.1:1", "--set", "runtime.engine=auto"]
    result = raymask("run", str(config), *unreachable, "--set", f"output.path={fresh}")
    assert result.returncode == 75, result.stderr  # transient: try again when the cluster is back
    assert not fresh.exists()  # no empty incomplete store to trip the next run with other settings
    before = (store / "zarr.json").read_text()
    result = raymask("run", str(config), *unreachable, "--overwrite")
    assert result.returncode == 75, result.stderr
    assert (store / "zarr.json").read_text() == before  # the complete store is still there, untouched
    assert json.loads(before)["attributes"]["raymask"]["status"] == "complete"


def test_a_batch_that_cannot_reach_its_cluster_creates_nothing(tmp_path: Path, make_geotiff: GeoTiffFactory) -> None:
    make_geotiff(np.ones((2, 16, 16), np.uint16), name="a.tif")
    root = tmp_path / "root"
    config = write_config(tmp_path / "batch.yaml", inputs=[f"{tmp_path}/*.tif"], model={"kind": "ndvi"},
                          output={"root": str(root)}, runtime={"address": "127.0.0.1:1"})  # fmt: skip
    result = raymask("batch", str(config))
    assert result.returncode == 75, result.stderr
    assert "cannot reach a Ray cluster at '127.0.0.1:1'" in result.stderr.splitlines()[-1]
    assert not root.exists()  # no empty stores, no report: the next batch starts clean


def test_the_summary_names_the_ray_it_ran_on(scene_store, tmp_path: Path, ray_address: str) -> None:
    _, config, _ = scene_store
    here = raymask("run", str(config), "--set", f"output.path={tmp_path}/a.zarr", "--json")
    assert json.loads(here.stdout)["cluster"] == "this process (no Ray)"
    joined = raymask("run", str(config), "--set", f"output.path={tmp_path}/b.zarr", "--set", "runtime.engine=ray",
                     "--set", f"runtime.address={ray_address}", "--json")  # fmt: skip
    assert joined.returncode == 0, joined.stderr
    assert json.loads(joined.stdout)["cluster"].startswith(f"the Ray cluster at {ray_address} (1 node, 2 CPUs")
    text = raymask("run", str(config), "--set", f"output.path={tmp_path}/c.zarr")
    assert "ran on    this process (no Ray)" in text.stdout


def ct_copy(tmp_path: Path) -> tuple[Path, list[Path]]:
    """A copy of the bundled CT series and its files in slice order."""
    import pydicom

    folder = tmp_path / "series"
    shutil.copytree(CT_SERIES, folder)
    ordered = sorted(
        folder.iterdir(), key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2])
    )
    return folder, ordered


def ct_job(tmp_path: Path, folder: Path) -> Path:
    return write_config(tmp_path / "ct.yaml", source={"path": str(folder)}, model={"kind": "hu-tissue"},
                        output={"path": f"{tmp_path}/ct.zarr"})  # fmt: skip


def test_a_dicom_file_copied_into_its_series_is_named_as_a_copy(tmp_path: Path) -> None:
    folder, ordered = ct_copy(tmp_path)
    copy = folder / "zz-copy.dcm"
    shutil.copy(ordered[7], copy)
    result = raymask("run", str(ct_job(tmp_path, folder)))
    assert_one_line_error(result, "the same image as", "SOP Instance UID", "remove the copy")
    assert ordered[7].name in result.stderr and copy.name in result.stderr
    assert not (tmp_path / "ct.zarr").exists()


def test_a_slice_with_an_edited_orientation_is_named_as_the_odd_file(tmp_path: Path) -> None:
    import pydicom

    folder, ordered = ct_copy(tmp_path)
    odd = ordered[12]
    ds = pydicom.dcmread(odd)
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # a coronal header in an axial series
    ds.save_as(odd)
    result = raymask("run", str(ct_job(tmp_path, folder)))
    assert_one_line_error(result, f"{odd}: ImageOrientationPatient [1, 0, 0, 0, 0, -1] differs from the other 19 files")
    assert "missing" not in result.stderr


@pytest.mark.parametrize("engine", ["process", "ray"])
def test_a_model_given_the_wrong_band_count_says_so(
    tmp_path: Path, make_geotiff: GeoTiffFactory, scripted_unet, engine: str, ray_address: str
) -> None:
    scene = make_geotiff(np.random.default_rng(1).random((4, 48, 48)).astype(np.float32), name="four.tif")
    model = scripted_unet(4, 2)
    config = write_config(
        tmp_path / "job.yaml",
        source={"path": str(scene), "bands": [1, 2]},
        model={"kind": "torchscript", "path": str(model), "classes": ["a", "b"], "stride": 4, "receptive_radius": 8},
        tiling={"chunk": 16, "halo": 8},
        output={"path": f"{tmp_path}/out.zarr", "preview": False},
        runtime={"engine": engine, "max_retries": 1},
    )
    env = {"RAY_ADDRESS": ray_address} if engine == "ray" else {}
    result = raymask_env(env, "run", str(config), "--no-progress")
    assert_one_line_error(result, f"{model}: the model takes 4 input bands (its first layer), the job gives it 2")
    assert '"complete"' not in (tmp_path / "out.zarr" / "zarr.json").read_text()


def raymask_env(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL, env={**os.environ, **env})  # fmt: skip


def test_submit_refuses_a_relative_output_path_for_a_remote_head(tmp_path: Path) -> None:
    """Ray unpacks the working directory into a temporary folder on the head: a relative output
    would be written there and lost. Refused before anything is sent."""
    config = str(ROOT / "configs" / "aerial-vegetation.yaml")
    result = raymask_env({}, "submit", config, "--address", "198.51.100.7:8265")  # a documentation address
    assert_one_line_error(result, "output.path out/aber-vegetation.zarr is relative", "the cluster's nodes share")


def test_a_head_without_raymask_says_so_in_one_line(tmp_path: Path) -> None:
    """What a submitted job's shell runs first: without raymask on the head's PATH, one line and 127."""
    from pipeline.jobs.submit import ENTRYPOINT_CHECK

    done = subprocess.run(["/bin/sh", "-c", ENTRYPOINT_CHECK + "echo ran"], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin"}, timeout=30)  # fmt: skip
    assert done.returncode == 127 and done.stdout == ""
    assert done.stderr.strip() == (
        "raymask: error: raymask is not installed where the Ray head runs jobs (not on its PATH): "
        "pip install raymask there, or use an image that has it"
    )
    found = subprocess.run(["/bin/sh", "-c", ENTRYPOINT_CHECK + "echo ran"], capture_output=True, text=True,
                           env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}, timeout=30)  # fmt: skip
    assert found.returncode == 0 and found.stdout == "ran\n"


HOLD = """
import sys, time
from pathlib import Path
from pipeline.store.lease import store_lease
with store_lease(Path(sys.argv[1]), command="a test holder"):
    Path(sys.argv[2]).write_text("held")
    time.sleep(float(sys.argv[3]))
"""


def hold_lease(store: Path, seconds: float, tmp_path: Path) -> subprocess.Popen[str]:
    """Another process holding ``store``'s lease for ``seconds`` (returns once it holds it)."""
    flag = tmp_path / f"held-{store.name}"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(store), str(flag), str(seconds)], text=True)
    deadline = time.monotonic() + 60
    while not flag.exists():
        assert holder.poll() is None and time.monotonic() < deadline, "the holder never took the lease"
        time.sleep(0.05)
    return holder


def test_two_runs_of_one_config_never_write_one_store_together(
    tmp_path: Path, make_geotiff: GeoTiffFactory, scripted_unet
) -> None:
    """An overlapping cron or a retried CI job: the second run is refused with the holder named,
    and nothing of the first is disturbed."""
    scene = make_geotiff(np.random.default_rng(2).random((3, 256, 256)).astype(np.float32), name="big.tif")
    config = write_config(
        tmp_path / "job.yaml",
        source={"path": str(scene)},
        model={"kind": "torchscript", "path": str(scripted_unet(3, 3)), "classes": ["a", "b", "c"], "stride": 4,
               "receptive_radius": 8},
        tiling={"chunk": 16, "halo": 8},  # 256 units: seconds of work in one process
        output={"path": f"{tmp_path}/conc.zarr", "preview": False},
        runtime={"engine": "process"},
        regions={"enabled": False},
    )  # fmt: skip
    first = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(config), "--json", "--no-progress"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    lease = tmp_path / ".conc.zarr.lease"
    deadline = time.monotonic() + 60
    while not lease.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    second = raymask("run", str(config), "--no-progress")
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert_one_line_error(second, f"{tmp_path}/conc.zarr: in use by raymask run", f"pid {first.pid}", "--wait")
    assert json.loads(out)["units_run"] == 256 and not lease.exists()


def test_a_busy_store_is_waited_for_and_a_dead_holders_lease_taken_over(scene_store, tmp_path: Path) -> None:
    _, config, _ = scene_store
    store = tmp_path / "leased.zarr"
    holder = hold_lease(store, 3.0, tmp_path)
    started = time.monotonic()
    waited = raymask("run", str(config), "--set", f"output.path={store}", "--wait", "--no-progress")
    assert waited.returncode == 0, waited.stderr
    assert time.monotonic() - started > 1.5 and holder.wait(timeout=30) == 0  # it ran after the holder let go

    dead = tmp_path / "dead.zarr"
    holder = hold_lease(dead, 600.0, tmp_path)
    holder.kill()  # SIGKILL: no chance to release; the lease file stays behind
    holder.wait(timeout=30)
    assert (tmp_path / ".dead.zarr.lease").exists()
    taken = raymask("run", str(config), "--set", f"output.path={dead}", "--no-progress")
    assert taken.returncode == 0, taken.stderr
    assert not (tmp_path / ".dead.zarr.lease").exists()


def test_a_silent_lease_from_another_host_is_taken_over(scene_store, tmp_path: Path) -> None:
    _, config, _ = scene_store
    store = tmp_path / "remote.zarr"
    stale = {"id": "x", "command": "raymask run", "host": "elsewhere", "pid": 1, "started": "then",
             "heartbeat": time.time() - 600}  # fmt: skip
    (tmp_path / ".remote.zarr.lease").write_text(json.dumps(stale))
    assert raymask("run", str(config), "--set", f"output.path={store}", "--no-progress").returncode == 0
    fresh = {**stale, "heartbeat": time.time()}
    (tmp_path / ".remote.zarr.lease").write_text(json.dumps(fresh))
    busy = raymask("run", str(config), "--set", f"output.path={store}", "--overwrite", "--no-progress")
    assert_one_line_error(busy, "in use by raymask run (pid 1 on elsewhere")


def test_overlapping_batches_share_the_inputs(tmp_path: Path, make_geotiff: GeoTiffFactory) -> None:
    rng = np.random.default_rng(4)
    for name in ("a.tif", "b.tif", "c.tif"):
        make_geotiff(rng.random((2, 40, 40)).astype(np.float32), name=name)
    config = write_config(
        tmp_path / "nightly.yaml",
        inputs=[f"{tmp_path}/*.tif"],
        model={"kind": "ndvi", "red": 1, "nir": 2},
        output={"root": f"{tmp_path}/masks", "preview": False},
        runtime={"engine": "process"},
    )
    holder = hold_lease(tmp_path / "masks" / "b.tif.zarr", 600.0, tmp_path)
    try:
        result = raymask("batch", str(config), "--json", "--no-progress")
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert result.returncode == 0, result.stderr
    statuses = {Path(r["input"]).name: r["status"] for r in json.loads(result.stdout)["results"]}
    assert statuses == {"a.tif": "done", "b.tif": "busy", "c.tif": "done"}
    assert not (tmp_path / "masks" / "b.tif.zarr").exists()


@pytest.mark.parametrize(
    ("keyword", "value", "message"),
    [
        ("ImagePositionPatient", [0, 0], "ImagePositionPatient must be 3 finite numbers"),
        ("ImageOrientationPatient", [0, 0, 0, 0, 1, 0], "ImageOrientationPatient [0, 0, 0, 0, 1, 0] differs"),
        ("PixelSpacing", [0.5, 0], "PixelSpacing must be 2 positive finite numbers"),
        ("RescaleSlope", [1, 2], "RescaleSlope must be 1 finite numbers"),
    ],
)
def test_malformed_geometry_in_one_dicom_header_is_one_line(tmp_path: Path, keyword: str, value, message: str) -> None:
    """Found by tests/test_fuzz.py: these crashed the series assembler (ValueError, TypeError)."""
    import pydicom

    folder, ordered = ct_copy(tmp_path)
    ds = pydicom.dcmread(ordered[5])
    setattr(ds, keyword, value)
    ds.save_as(ordered[5])
    result = raymask("run", str(ct_job(tmp_path, folder)))
    assert_one_line_error(result, message)
    assert result.stderr.startswith(f"raymask: error: {ordered[5]}: ")


@contextlib.contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A small tmpfs mounted at ``where`` for the block (root only: the test is skipped otherwise)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where.mkdir(parents=True, exist_ok=True)
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_full_disk_is_one_line_and_the_run_resumes_once_space_is_freed(tmp_path: Path) -> None:
    """Disk full mid-run: one line naming the store and what to do, exit 1, the store incomplete;
    once there is space the same command resumes (units already written are skipped)."""
    with tmpfs(tmp_path / "small", "300k") as small:
        store = small / "aber.zarr"
        args = ("run", "configs/aerial-vegetation.yaml", "--set", f"output.path={store}", "--set", "tiling.chunk=64")
        full = subprocess.run([*RAYMASK_IN_ROOT, *args], capture_output=True, text=True, cwd=ROOT, timeout=300,
                              stdin=subprocess.DEVNULL)  # fmt: skip
        assert_one_line_error(full, f"{store}: No space left on device", "run the same command again")
        meta = json.loads((store / "zarr.json").read_text())["attributes"]["raymask"]
        assert meta["status"] == "incomplete"
        subprocess.run(["mount", "-o", "remount,size=32m", str(small)], check=True)
        again = subprocess.run([*RAYMASK_IN_ROOT, *args, "--json"], capture_output=True, text=True, cwd=ROOT,
                               timeout=300, stdin=subprocess.DEVNULL)  # fmt: skip
        assert again.returncode == 0, again.stderr
        summary = json.loads(again.stdout)
        assert summary["status"] == "complete"
        assert 0 < summary["units_skipped"] < summary["units_total"], summary  # it resumed


def test_queries_work_on_a_read_only_filesystem(scene_store, tmp_path: Path) -> None:
    """info, query, regions, zones and export only read: they work on a read-only mount (export
    writing elsewhere), and the one command that writes into the store says why it cannot."""
    _, _, store = scene_store
    with tmpfs(tmp_path / "ro", "16m") as ro:
        shutil.copytree(store, ro / "scene.zarr")
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        copy = str(ro / "scene.zarr")
        zones = tmp_path / "zones.geojson"
        zones.write_text(json.dumps({"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {},
            "geometry": {"type": "Polygon", "coordinates": [[[500000, 5700000], [500200, 5700000],
            [500200, 5699800], [500000, 5699800], [500000, 5700000]]]}}]}))  # fmt: skip
        for args in (["info", copy, "--json"], ["query", copy, "--bbox", "0,0,20,20", "--crs", "pixel", "--json"],
                     ["regions", copy, "--limit", "3"], ["zones", copy, str(zones), "--crs", "EPSG:32631"],
                     ["export", copy, str(tmp_path / "mask.tif")]):  # fmt: skip
            result = raymask(*args)
            assert result.returncode == 0, (args, result.stderr)
            assert result.stderr.strip() == "", (args, result.stderr)
        result = raymask("regions", copy, "--compute")
        assert_one_line_error(result, "Read-only file system")


RAYMASK_IN_ROOT = [sys.executable, "-m", "pipeline.cli"]
