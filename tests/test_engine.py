"""Where units run: in this process or on Ray actors, same bytes; timings; a quiet console; the
GPU-ready paths of the worker (batches in flight, autocast, staging buffers) on the CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
import zarr
from rasterio.enums import ColorInterp

from pipeline.cli import main
from pipeline.config import RuntimeConfig, config_from_dict, load_config
from pipeline.core.plan import Target, pick_engine
from pipeline.jobs.run import prepare
from tests.conftest import (
    ROOT,
    S2,
    GeoTiffFactory,
    chunk_bytes,
    processes_mentioning,
    unet_job,
    units_done,
    write_config,
)
from workers.models.network import NetworkModel, PinnedStaging
from workers.unit_worker import UnitWorker

DEMO = ROOT / "configs" / "aerial-vegetation.yaml"
RAYMASK = [sys.executable, "-m", "pipeline.cli"]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*RAYMASK, *args],
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
    )


@pytest.mark.slow  # a driver of its own, which starts its own Ray
def test_a_small_job_runs_in_this_process_and_writes_what_ray_writes(tmp_path: Path) -> None:
    """No Ray is running in a fresh `raymask run`: the 9-chunk demo runs in process, and its
    mask, regions and statistics are byte-identical to the same job on Ray actors."""
    out = {}
    for engine in ("auto", "ray"):
        store = tmp_path / f"{engine}.zarr"
        result = run_cli(
            "run", str(DEMO), "--json", "--set", f"runtime.engine={engine}", "--set", f"output.path={store}"
        )
        assert result.returncode == 0, result.stderr
        out[engine] = json.loads(result.stdout)
        assert not [line for line in result.stderr.splitlines() if line.strip()], result.stderr  # a quiet console
    assert out["auto"]["engine"] == "process" and out["ray"]["engine"] == "ray"
    assert out["auto"]["timings"]["startup_s"] < 0.01 < out["ray"]["timings"]["startup_s"]
    for summary in out.values():
        t = summary["timings"]
        assert t["total_s"] >= t["startup_s"] + t["workers_s"] + t["compute_s"] + t["regions_s"] - 1e-6
        assert summary["units_per_s"] == pytest.approx(summary["units_run"] / t["compute_s"])
    assert out["auto"]["classes"] == out["ray"]["classes"]
    for array in ("mask", "regions"):
        a = {p.relative_to(tmp_path / "auto.zarr"): p.read_bytes() for p in (tmp_path / "auto.zarr" / array).rglob("*")
             if p.is_file() and p.name != "zarr.json"}  # fmt: skip
        b = {p.relative_to(tmp_path / "ray.zarr"): p.read_bytes() for p in (tmp_path / "ray.zarr" / array).rglob("*")
             if p.is_file() and p.name != "zarr.json"}  # fmt: skip
        assert a and a == b


def test_the_engine_follows_the_job_size_the_address_and_a_running_ray() -> None:
    base = RuntimeConfig()

    def pick(runtime: RuntimeConfig = base, units: int = 1, running: bool = False, env: str | None = None) -> str:
        return pick_engine(runtime, units, ray_running=running, ray_address=env)

    assert pick(units=32) == "process"
    assert pick(units=33) == "ray"
    assert pick(RuntimeConfig(small_job_units=100), units=64) == "process"
    assert pick(RuntimeConfig(address="auto")) == "ray"
    assert pick(env="127.0.0.1:6379") == "ray"
    assert pick(running=True) == "ray"  # a Ray job or a test session: Ray is up, use it
    assert pick(RuntimeConfig(engine="process"), units=10_000, running=True) == "process"
    assert pick(RuntimeConfig(engine="ray")) == "ray"


def rgba_with_nodata(path: Path) -> Path:
    """4 bands, nodata 0, band 4 flagged alpha: GDAL warns 'nodata shadows alpha' on every mask read."""
    rng = np.random.default_rng(5)
    data = rng.integers(0, 255, size=(4, 600, 600), dtype=np.uint8)
    from affine import Affine

    profile = dict(driver="GTiff", width=600, height=600, count=4, dtype="uint8", nodata=0, crs="EPSG:32631",
                   transform=Affine(1.0, 0, 500000, 0, -1.0, 5700000), tiled=True, blockxsize=128,
                   blockysize=128)  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        dst.colorinterp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.alpha]
    return path


@pytest.mark.slow  # end to end, several seconds: `make test` runs it, `make check` does not
@pytest.mark.parametrize("engine", ["process", "ray"])
def test_a_healthy_run_prints_the_summary_and_nothing_else(tmp_path: Path, engine: str, ray_address: str) -> None:
    """Worker warnings (here GDAL's nodata-shadows-alpha, once per window) are handled where they
    arise and noted once in the summary; Ray's own lines stay out of the console (a driver of its
    own that joins this session's Ray; test_a_small_job_runs_in_this_process... starts one)."""
    image = rgba_with_nodata(tmp_path / "rgba.tif")
    config = write_config(
        tmp_path / "job.yaml",
        source={"path": str(image), "bands": [1, 2, 3, 4]},
        model={"kind": "rgb-vegetation"},
        tiling={"chunk": 64},  # 100 units: Ray under engine auto
        output={"path": f"{tmp_path}/rgba.zarr", "preview": False},
        runtime={"engine": engine},
    )
    result = run_cli("run", str(config), "--no-progress", env={"RAY_ADDRESS": ray_address if engine == "ray" else ""})
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr
    notes = [line for line in result.stdout.splitlines() if line.startswith("note")]
    assert len([n for n in notes if "shadows its alpha band" in n]) == 1, result.stdout
    with rasterio.open(image) as src:
        expected_invalid = int((src.read() == 0).any(axis=0).sum())
    assert int((zarr.open_array(str(tmp_path / "rgba.zarr" / "mask"))[:] == 255).sum()) == expected_invalid


def test_gdal_masks_and_the_fast_validity_agree(tmp_path: Path, make_geotiff: GeoTiffFactory) -> None:
    """The integer-nodata shortcut equals GDAL's read_masks; float nodata and alpha still go to GDAL."""
    from pipeline.core.geometry import Box
    from pipeline.sources.geotiff import RasterSource

    rng = np.random.default_rng(2)
    cases = {
        "uint16": (rng.integers(0, 4, size=(3, 50, 40)).astype(np.uint16), 0),
        "int16": (rng.integers(-3, 3, size=(3, 50, 40)).astype(np.int16), -3),
        "float32": (rng.normal(size=(3, 50, 40)).round(1).astype(np.float32), 0.0),
        "none": (rng.integers(0, 4, size=(3, 50, 40)).astype(np.uint8), None),
    }
    for name, (data, nodata) in cases.items():
        path = make_geotiff(data, name=f"{name}.tif", nodata=nodata)
        source = RasterSource(paths=(str(path),), bands=(3, 1))
        box = Box((3, 5), (47, 33))
        for cache in (None, {}):
            values, valid = source.read(box, cache=cache)
            with rasterio.open(path) as src:
                window = ((3, 47), (5, 33))
                np.testing.assert_array_equal(values, src.read([3, 1], window=window))
                np.testing.assert_array_equal(valid, (src.read_masks([3, 1], window=window) > 0).all(axis=0))
            assert values.dtype == data.dtype


@pytest.mark.parametrize(
    ("batch_size", "in_flight", "prefetch", "io_threads"), [(1, 1, 1, 1), (4, 2, 2, 2), (3, 3, 1, 0)]
)
def test_the_worker_pipeline_writes_every_unit_once_whatever_its_depth(
    tmp_path: Path, make_geotiff: GeoTiffFactory, scripted_unet, batch_size: int, in_flight: int, prefetch: int,
    io_threads: int,
) -> None:  # fmt: skip
    """Batches of equal windows, several in flight, reads ahead (or inline, io_threads 0): the same
    mask as one window at a time."""
    from pipeline.core.plan import pending_units
    from pipeline.jobs.run import create_store

    image = make_geotiff(np.random.default_rng(1).normal(size=(3, 150, 130)).astype(np.float32))
    model = scripted_unet(3, 3)
    results = {}
    for name, depth in (("reference", (1, 1, 1, 1)), ("tested", (batch_size, in_flight, prefetch, io_threads))):
        config = config_from_dict({
            "source": {"path": str(image)},
            "model": {"kind": "torchscript", "path": str(model), "classes": ["a", "b", "c"], "stride": 4,
                      "receptive_radius": 20},
            "tiling": {"chunk": 32, "halo": 24},
            "output": {"path": str(tmp_path / f"{name}.zarr"), "preview": False},
        })  # fmt: skip
        job = prepare(config)
        store = create_store(job)
        target = Target(job.source, job.grid, "replicate", str(store.path), job.pixel_measure, 3)
        worker = UnitWorker(
            {0: target}, config.model, batch_size=depth[0], in_flight=depth[1], prefetch=depth[2], io_threads=depth[3]
        )
        units = [(0, u.index) for u in pending_units(job.grid, store.units_done())]
        rows = list(worker.process(units))
        worker.close()
        assert sorted(r["unit"] for r in rows) == sorted(u for _, u in units)
        assert all(r["error"] == "" for r in rows)
        assert store.units_done().all()
        results[name] = np.asarray(store.mask[:])
    np.testing.assert_array_equal(results["tested"], results["reference"])


def test_a_failing_model_call_fails_only_its_units(tmp_path: Path, make_geotiff: GeoTiffFactory) -> None:
    """A window the model cannot take (the wrong band count) is an error row naming the model file."""
    import torch

    from pipeline.core.plan import pending_units
    from pipeline.jobs.run import create_store
    from tests.conftest import tiny_unet

    model = tmp_path / "four-band.pt"
    torch.jit.save(torch.jit.script(tiny_unet(4, 3)), str(model))
    image = make_geotiff(np.zeros((2, 64, 64), dtype=np.float32))
    config = config_from_dict({
        "source": {"path": str(image)},
        "model": {"kind": "torchscript", "path": str(model), "classes": ["a", "b", "c"], "stride": 4},
        "tiling": {"chunk": 32, "halo": 8},
        "output": {"path": str(tmp_path / "bad.zarr"), "preview": False},
    })  # fmt: skip
    job = prepare(config)
    store = create_store(job)
    target = Target(job.source, job.grid, "replicate", str(store.path), job.pixel_measure, 3)
    worker = UnitWorker({0: target}, config.model)
    rows = list(worker.process([(0, u.index) for u in pending_units(job.grid, store.units_done())]))
    worker.close()
    assert len(rows) == 4 and all(r["error"] and r["error_type"] for r in rows)
    assert not store.units_done().any()


def test_autocast_runs_on_the_cpu_and_is_reported_not_exact(
    tmp_path: Path, make_geotiff: GeoTiffFactory, scripted_unet
) -> None:
    image = make_geotiff(np.random.default_rng(3).normal(size=(3, 96, 96)).astype(np.float32))
    model = scripted_unet(3, 3)
    config = write_config(
        tmp_path / "bf16.yaml",
        source={"path": str(image)},
        model={"kind": "torchscript", "path": str(model), "classes": ["a", "b", "c"], "stride": 4,
               "receptive_radius": 20, "precision": "bfloat16"},
        tiling={"chunk": 32, "halo": 24},
        output={"path": f"{tmp_path}/bf16.zarr", "preview": False},
        runtime={"engine": "process"},
    )  # fmt: skip
    assert main(["run", str(config), "--no-progress"]) == 0
    job = prepare(load_config(config))
    assert not job.exact
    meta = json.loads((tmp_path / "bf16.zarr" / "zarr.json").read_text())["attributes"]["raymask"]
    assert meta["model"]["exact_tiling"] is False
    labels = np.asarray(zarr.open_array(str(tmp_path / "bf16.zarr" / "mask"))[:])
    reference = NetworkModel(job.config.model.model_copy(update={"precision": "float32"}))  # type: ignore[union-attr]
    with rasterio.open(image) as src:
        pixels, valid = src.read()[None], np.ones((1, 96, 96), dtype=bool)
    want = reference.predict(pixels, valid)[0]
    assert (labels == want).mean() > 0.9  # bfloat16 rounds: close to float32, not equal by promise
    autocast = NetworkModel(job.config.model).logits(pixels, valid)  # type: ignore[arg-type]
    exact = reference.logits(pixels, valid)
    assert 0 < np.abs(autocast - exact).max() < 0.5  # the network really ran in bfloat16


def test_staging_buffers_rotate_so_a_buffer_in_flight_is_never_refilled() -> None:
    staging = PinnedStaging(slots=3, pin=False)  # the CPU path: same rotation, no page locking
    shape, dtype = (2, 4, 8, 8), np.dtype(np.uint8)
    taken = [staging.take(shape, dtype) for _ in range(6)]
    ids = [t.data_ptr() for t in taken]
    assert len(set(ids[:3])) == 3 and ids[3:] == ids[:3]  # three distinct buffers, then reused in turn
    other = staging.take((1, 4, 8, 8), dtype)
    assert other.data_ptr() not in ids  # another shape has buffers of its own
    assert taken[0].shape == shape and taken[0].dtype.itemsize == 1


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_a_unit_whose_workers_keep_dying_fails_with_a_worker_error_and_resumes_later(
    tmp_path: Path, make_geotiff: GeoTiffFactory, scripted_unet, capsys: pytest.CaptureFixture[str]
) -> None:
    """max_retries 0: the first real actor death fails the units it held; the store stays
    incomplete, and the same command then finishes it byte-identical to an undisturbed run."""
    config = unet_job(tmp_path, make_geotiff, scripted_unet, store="fragile.zarr", seed=6)
    store = tmp_path / "fragile.zarr"
    result: dict[str, int] = {}
    run = threading.Thread(
        target=lambda: result.setdefault(
            "code", main(["run", str(config), "--no-progress", "--set", "runtime.max_retries=0"])
        )
    )
    run.start()
    deadline = time.monotonic() + 120
    while units_done(store) < 4 and time.monotonic() < deadline and run.is_alive():
        time.sleep(0.05)
    for pid in processes_mentioning("ray::UnitWorker"):
        os.kill(pid, signal.SIGKILL)
    run.join(timeout=300)
    assert result.get("code") == 75  # a WorkerError is transient: the same command again resumes
    err = [line for line in capsys.readouterr().err.splitlines() if "(raylet)" not in line]  # Ray's own notice
    assert len(err) == 1 and err[0].startswith("raymask: error: ") and "its worker died 1 times" in err[0], err
    assert json.loads((store / "zarr.json").read_text())["attributes"]["raymask"]["status"] == "incomplete"
    assert main(["run", str(config), "--json"]) == 0
    # the session Ray's "(raylet) A worker died" notice about the killed actor may reach this process's
    # stdout at any moment (it is this test process's Ray, not the run's); the summary is the rest
    out = [line for line in capsys.readouterr().out.splitlines() if "(raylet)" not in line]
    assert json.loads("\n".join(out))["status"] == "complete"
    assert main(["run", str(config), "--json", "--set", f"output.path={tmp_path}/clean.zarr"]) == 0
    capsys.readouterr()
    assert chunk_bytes(store) == chunk_bytes(tmp_path / "clean.zarr")


@pytest.mark.slow  # end to end, several seconds: `make test` runs it, `make check` does not
@pytest.mark.parametrize("engine", ["process", "ray"])
def test_a_model_that_cannot_load_is_one_line_on_either_engine(tmp_path: Path, engine: str, ray_address: str) -> None:
    model = tmp_path / "broken.pt"
    model.write_bytes(b"not a TorchScript archive")
    config = write_config(
        tmp_path / "job.yaml",
        source={"path": str(S2), "bands": [3, 8]},
        model={"kind": "torchscript", "path": str(model), "classes": ["a", "b"], "stride": 1, "receptive_radius": 0},
        output={"path": f"{tmp_path}/broken.zarr", "preview": False},
        runtime={"engine": engine},
    )
    result = run_cli("run", str(config), "--no-progress", env={"RAY_ADDRESS": ray_address if engine == "ray" else ""})
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("raymask: error: ") and "not a TorchScript file" in lines[0], lines


def _pid(_: int) -> int:
    return os.getpid()


@pytest.mark.usefixtures("ray_session")
def test_a_handful_of_chunk_tasks_runs_in_the_driver_and_more_go_to_ray() -> None:
    from pipeline.jobs.executors import RayExecutor

    executor = RayExecutor(serial_up_to=2)
    assert set(executor.map(_pid, [1, 2])) == {os.getpid()}
    assert os.getpid() not in set(executor.map(_pid, [1, 2, 3]))


@pytest.mark.slow  # end to end, several seconds: `make test` runs it, `make check` does not
@pytest.mark.usefixtures("ray_session")
def test_actors_the_cluster_cannot_place_do_not_hold_up_the_run(
    tmp_path: Path, make_geotiff: GeoTiffFactory, scripted_unet, capsys: pytest.CaptureFixture[str]
) -> None:
    """Three 1-CPU actors asked of a 2-CPU Ray: the run completes with the actors that start (the
    third's ready() never answers), and the mask is the one a single actor writes. How many of the
    two did work depends on how fast the second starts (on a loaded machine the first may finish
    alone), so the count is bounded, not fixed."""
    config = unet_job(tmp_path, make_geotiff, scripted_unet, store="asked.zarr", seed=8)
    sets = ["--set", "runtime.actors=3", "--set", "runtime.actor_cpus=1"]
    assert main(["run", str(config), "--json", "--no-progress", *sets]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["status"] == "complete" and 1 <= summary["workers"]["actors"] <= 2, summary["workers"]
    one = ["--set", "runtime.actors=1", "--set", f"output.path={tmp_path}/one.zarr"]
    assert main(["run", str(config), "--json", "--no-progress", *one]) == 0
    assert json.loads(capsys.readouterr().out)["workers"]["actors"] == 1
    assert chunk_bytes(tmp_path / "asked.zarr") == chunk_bytes(tmp_path / "one.zarr")


def _raise(exc: Exception) -> None:
    raise exc


@pytest.mark.usefixtures("ray_session")
def test_unwrap_finds_the_raymask_error_a_ray_task_raised_by_its_type() -> None:
    from pipeline.errors import ConfigError, SourceNotFound
    from pipeline.jobs.cluster import unwrap
    from pipeline.jobs.executors import RayExecutor

    for error in (SourceNotFound("scene.tif: no such file"), ConfigError("regions.classes: no class 'x'")):
        with pytest.raises(Exception) as caught:
            list(RayExecutor().map(_raise, [error, error]))  # two items: real Ray tasks, not this process
        assert type(caught.value).__name__.startswith("RayTaskError")
        found = unwrap(caught.value)
        assert type(found) is type(error) and str(found) == str(error)
        try:  # chained by a wrapper of our own
            raise RuntimeError("labelling failed") from caught.value
        except RuntimeError as wrapped:
            assert type(unwrap(wrapped)) is type(error)
    other = ValueError("not ours")
    assert unwrap(other) is other
