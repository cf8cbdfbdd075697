"""The Ray Data pipeline: read tasks -> predict actor pool -> write tasks, over one or many inputs.

Rows carry only an input key and a unit index in, and counts out; pixels go from the source to
the actors to the store without passing through the driver. With ``isolate`` (batch runs), a
failure while reading, predicting or writing one input's unit becomes an error row for that
input instead of stopping the pipeline, so one bad file never stops the others.

Fault tolerance is Ray Data's: a read or write task whose worker dies is retried (Ray's default,
3 times), and a dead predict actor is restarted and its batches re-run, without limit. Every
stage is idempotent (chunks are rewritten whole), so a retry is harmless.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from pipeline.config import ModelConfig, RuntimeConfig
from pipeline.geometry import TileGrid, inside_image, pad_to_window
from pipeline.inputs import Source
from pipeline.stats import Measure
from pipeline.store import MaskStore


@dataclass(frozen=True)
class Target:
    """One input's part of a stream: where its pixels come from and where its labels go."""

    source: Source
    grid: TileGrid
    edge: str
    store: str
    measure: Measure
    n_classes: int


def stream(
    targets: dict[int, Target],
    units: list[tuple[int, tuple[int, ...]]],
    *,
    model: ModelConfig,
    runtime: RuntimeConfig,
    isolate: bool = False,
    progress: bool = True,
) -> Iterator[dict[str, Any]]:
    """Yield one small row per finished unit: ``key``, ``unit``, ``error`` ("" when it landed)."""
    import ray
    import ray.data
    from ray.data import ActorPoolStrategy, Dataset
    from tqdm import tqdm

    from workers.predictor import Predictor

    gpus = ray.cluster_resources().get("GPU", 0.0)
    auto = 1.0 if gpus >= 1 else 0.0
    gpus_per_actor = auto if runtime.gpus_per_actor == "auto" else float(runtime.gpus_per_actor)
    cpus = ray.cluster_resources().get("CPU", 1.0)
    actors = runtime.actors or (max(1, int(gpus // gpus_per_actor)) if gpus_per_actor else max(1, int(cpus // 2)))
    # Torch threads: an actor reserves actor_cpus so the read and write stages keep a CPU, but
    # those stages mostly wait on I/O; sharing the cores among the actors measured faster
    # (bench/RESULTS.md: 2 threads 3.96 vs 1 thread 2.52 tiles/s model-only on 2 cores).
    threads = runtime.threads or max(1, int(cpus // actors))
    items = [{"key": key, "unit": np.asarray(unit, dtype=np.int64)} for key, unit in units]
    ds: Dataset = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map(partial(_read_stage, targets=targets, isolate=isolate), num_cpus=runtime.io_cpus)
    ds = ds.map_batches(
        Predictor,
        fn_constructor_kwargs={"model": model, "threads": threads, "isolate": isolate},
        batch_size=runtime.batch_size,
        compute=ActorPoolStrategy(size=actors),
        num_cpus=runtime.actor_cpus,
        num_gpus=gpus_per_actor,
    )
    ds = ds.map(partial(_write_stage, targets=targets, isolate=isolate), num_cpus=runtime.io_cpus)
    bar = tqdm(total=len(items), unit="tile", desc="raymask", disable=not progress, dynamic_ncols=True, smoothing=0.1)
    try:
        for row in ds.iter_rows():
            bar.update(1)
            yield row
    finally:
        bar.close()


def _read_stage(row: dict[str, Any], *, targets: dict[int, Target], isolate: bool) -> dict[str, Any]:
    target = targets[int(row["key"])]
    grid = target.grid
    unit = grid.unit(tuple(int(i) for i in row["unit"]))
    try:
        data, valid = target.source.read(inside_image(unit.read, grid.shape))
    except Exception as exc:
        if not isolate:
            raise
        return _error_row(row, len(grid.shape), exc)
    return {
        "key": row["key"],
        "unit": row["unit"],
        "error": "",
        "image": pad_to_window(data, unit.read, grid.shape, edge=target.edge),
        "valid": pad_to_window(valid, unit.read, grid.shape, edge=target.edge),
        "core_start": np.subtract(unit.core.start, unit.read.start),
        "core_stop": np.subtract(unit.core.stop, unit.read.start),
    }


def _write_stage(row: dict[str, Any], *, targets: dict[int, Target], isolate: bool) -> dict[str, Any]:
    result = {"key": row["key"], "unit": row["unit"], "error": str(row["error"])}
    if result["error"]:
        return result
    target = targets[int(row["key"])]
    unit = target.grid.unit(tuple(int(i) for i in row["unit"]))
    try:
        store = MaskStore.open(target.store, mode="r+")
        store.write_unit(unit, row["labels"], measure=target.measure, n_classes=target.n_classes)
    except Exception as exc:
        if not isolate:
            raise
        result["error"] = describe(exc)
    return result


def _error_row(row: dict[str, Any], ndim: int, exc: BaseException) -> dict[str, Any]:
    empty = (0,) * ndim
    return {
        "key": row["key"],
        "unit": row["unit"],
        "error": describe(exc),
        "image": np.zeros((1, *empty), dtype=np.float32),
        "valid": np.zeros(empty, dtype=bool),
        "core_start": np.zeros(ndim, dtype=np.int64),
        "core_stop": np.zeros(ndim, dtype=np.int64),
    }


def describe(exc: BaseException) -> str:
    """One line for the report, then the traceback."""
    return f"{' '.join(str(exc).split())}\n{''.join(traceback.format_exception(exc))}"
