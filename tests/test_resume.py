"""Resume after an interrupted run: the driver is killed for real, mid-run, then the job is run again."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main
from tests.conftest import (
    GeoTiffFactory,
    assert_store_equals_scipy,
    chunk_bytes,
    descendants,
    kill_all,
    processes_mentioning,
    unet_job,
    units_done,
    write_config,
)

pytestmark = pytest.mark.slow  # kills drivers and workers, and runs them again


def kill_driver_when(config: Path, ready: Callable[[], bool], *, timeout: float, verb: str = "run") -> None:
    """Run ``raymask run CONFIG`` (or ``verb``: ``raymask batch CONFIG``, its runtime as configured)
    as its own process with its own Ray; SIGKILL it and every Ray process it started, all at once,
    as soon as ``ready()`` (or the driver ends, or ``timeout``)."""
    ray_tmp = tempfile.mkdtemp(prefix="rk", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    extra = ["--set", "runtime.address=local"] if verb == "run" else []
    driver = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", verb, str(config), "--no-progress", *extra],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, "RAY_TMPDIR": ray_tmp},
    )
    try:
        deadline = time.monotonic() + timeout
        while not ready() and time.monotonic() < deadline and driver.poll() is None:
            time.sleep(0.05)
    finally:
        tree = descendants(driver.pid)  # Ray's processes too: workers rename themselves (ray::...)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)
        for pid in tree:  # the machine is lost at once, as when a node dies
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        driver.wait(timeout=30)
        kill_all(lambda: processes_mentioning(ray_tmp))
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.usefixtures("ray_session")
def test_a_killed_driver_resumes_and_ends_byte_identical(
    tmp_path: Path, make_geotiff: GeoTiffFactory, scripted_unet, capsys: pytest.CaptureFixture[str]
) -> None:
    config = unet_job(tmp_path, make_geotiff, scripted_unet, store="killed.zarr", seed=3)
    killed = tmp_path / "killed.zarr"
    total = (512 // 64) * (448 // 64)

    kill_driver_when(config, lambda: units_done(killed) >= 8, timeout=180)
    done_at_kill = units_done(killed)
    assert 0 < done_at_kill < total, f"kill did not land mid-run ({done_at_kill}/{total})"
    assert json.loads((killed / "zarr.json").read_text())["attributes"]["raymask"]["status"] == "incomplete"

    assert main(["run", str(config), "--json"]) == 0
    resumed = json.loads(capsys.readouterr().out)
    assert resumed["status"] == "complete"
    assert resumed["units_skipped"] == done_at_kill
    assert resumed["units_run"] == total - done_at_kill

    assert main(["run", str(config), "--json", "--set", f"output.path={tmp_path}/clean.zarr"]) == 0
    clean = json.loads(capsys.readouterr().out)
    assert clean["units_run"] == total and clean["classes"] == resumed["classes"]
    assert chunk_bytes(killed) == chunk_bytes(tmp_path / "clean.zarr")


@pytest.mark.usefixtures("ray_session")
def test_a_killed_predict_actor_is_replaced_and_the_mask_is_byte_identical(
    tmp_path: Path, make_geotiff: GeoTiffFactory, scripted_unet, capsys: pytest.CaptureFixture[str]
) -> None:
    import threading

    config = unet_job(tmp_path, make_geotiff, scripted_unet, store="disturbed.zarr", seed=4)
    disturbed = tmp_path / "disturbed.zarr"
    result: dict[str, int] = {}
    worker = threading.Thread(target=lambda: result.setdefault("code", main(["run", str(config), "--no-progress"])))
    worker.start()
    deadline = time.monotonic() + 120
    while units_done(disturbed) < 8 and time.monotonic() < deadline and worker.is_alive():
        time.sleep(0.05)
    actors = processes_mentioning("ray::UnitWorker")
    assert actors, "no predict actor process found"
    for pid in actors:
        os.kill(pid, signal.SIGKILL)  # a real process death, mid-run
    killed_at = units_done(disturbed)
    worker.join(timeout=300)
    for pid in actors:  # the processes really died; the job went on with a restarted actor
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert result.get("code") == 0
    assert 0 < killed_at < 56
    capsys.readouterr()

    assert main(["run", str(config), "--json", "--set", f"output.path={tmp_path}/clean.zarr"]) == 0
    capsys.readouterr()
    assert json.loads((disturbed / "zarr.json").read_text())["attributes"]["raymask"]["status"] == "complete"
    assert chunk_bytes(disturbed) == chunk_bytes(tmp_path / "clean.zarr")


@pytest.mark.usefixtures("ray_session")
def test_a_driver_killed_while_labelling_regions_resumes_with_the_regions_only(
    tmp_path: Path, make_geotiff: GeoTiffFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    from scipy import ndimage

    from pipeline.query import open_store

    rng = np.random.default_rng(11)
    image = ndimage.uniform_filter(rng.random((2, 512, 512)), size=(1, 7, 7)).astype(np.float32)
    path = make_geotiff(image)
    store = tmp_path / "labelled.zarr"
    config = write_config(
        tmp_path / "job.yaml",
        source={"path": str(path)},
        model={"kind": "ndvi", "red": 1, "nir": 2, "water_below": -0.05, "vegetation_above": 0.05},
        tiling={"chunk": 32, "chunks_per_unit": 4},  # 256 chunks to label, in 16 work units
        output={"path": str(store), "preview": False},
        regions={"connectivity": 8},
    )
    scratch = tmp_path / ".labelled.zarr.regions" / "chunks"
    kill_driver_when(config, lambda: scratch.exists() and len(list(scratch.glob("*.npz"))) >= 20, timeout=240)
    labelled_at_kill = len(list(scratch.glob("*.npz")))
    assert 20 <= labelled_at_kill < 256, f"kill did not land while labelling ({labelled_at_kill} chunks)"
    meta = json.loads((store / "zarr.json").read_text())["attributes"]["raymask"]
    assert meta["status"] == "incomplete" and "regions" not in meta  # all units done, not complete

    assert main(["run", str(config), "--json", "--no-progress"]) == 0
    resumed = json.loads(capsys.readouterr().out)
    assert resumed["status"] == "complete" and resumed["units_run"] == 0 and resumed["units_skipped"] == 16
    view = open_store(store)
    assert_store_equals_scipy(view._store, view.mask.values, 8)
    assert not scratch.parent.exists()
