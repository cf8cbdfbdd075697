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
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.cli import main
from tests.conftest import GeoTiffFactory, kill_all, processes_mentioning


def chunk_bytes(store: Path) -> dict[str, bytes]:
    root = store / "mask" / "c"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def units_done(store: Path) -> int:
    try:
        return int((zarr.open_array(str(store / "units" / "pixels"), mode="r")[..., 0] >= 0).sum())
    except Exception:  # the store may not exist yet, or be mid-creation
        return 0


def unet_job(tmp_path: Path, make_geotiff: GeoTiffFactory, scripted_unet, *, store: str, seed: int) -> Path:
    """A 512 x 448 job of 56 tiles for the tiny U-Net, one tile per model call, so it runs long enough to hit."""
    image = make_geotiff(np.random.default_rng(seed).normal(size=(3, 512, 448)).astype(np.float32))
    model = scripted_unet(3, 3)
    config = tmp_path / "job.yaml"
    config.write_text(
        f"source: {{path: '{image}'}}\n"
        f"model: {{kind: torchscript, path: '{model}', classes: [a, b, c], stride: 4, receptive_radius: 20}}\n"
        "tiling: {chunk: 64, halo: 24}\n"
        f"output: {{path: '{tmp_path}/{store}', preview: false}}\n"
        "runtime: {batch_size: 1}\n"
    )
    return config


@pytest.mark.usefixtures("ray_session")
def test_a_killed_driver_resumes_and_ends_byte_identical(
    tmp_path: Path, make_geotiff: GeoTiffFactory, scripted_unet, capsys: pytest.CaptureFixture[str]
) -> None:
    config = unet_job(tmp_path, make_geotiff, scripted_unet, store="killed.zarr", seed=3)
    killed = tmp_path / "killed.zarr"
    total = (512 // 64) * (448 // 64)

    ray_tmp = tempfile.mkdtemp(prefix="rk", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    driver = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "run", str(config), "--no-progress", "--set", "runtime.address=local"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, "RAY_TMPDIR": ray_tmp},
    )
    try:
        deadline = time.monotonic() + 180
        while units_done(killed) < 8 and time.monotonic() < deadline and driver.poll() is None:
            time.sleep(0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
        kill_all(lambda: processes_mentioning(ray_tmp))
        shutil.rmtree(ray_tmp, ignore_errors=True)
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
    actors = processes_mentioning("MapBatches(Predictor)")
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
