"""raymask: distributed batch segmentation of aerial and medical imagery into zarr mask stores.

The public API (everything else is internal and may move)::

    import pipeline

    config = pipeline.load_config("configs/aerial-vegetation.yaml", ["output.path=out/a.zarr"])
    summary = pipeline.run_job(config)            # RunSummary: status, classes, timings, workers
    store = pipeline.open_store("out/a.zarr")     # StoreView: xarray, regions, areas, zones, points
    report = pipeline.run_batch(pipeline.load_batch_config("configs/archive-nightly.yaml"))

Names are imported on first use: the CLI and Ray workers never pay for the ones they do not use.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "open_store": "pipeline.query.view",
    "StoreView": "pipeline.query.view",
    "load_config": "pipeline.config",
    "load_batch_config": "pipeline.config",
    "JobConfig": "pipeline.config",
    "BatchConfig": "pipeline.config",
    "run_job": "pipeline.jobs.run",
    "RunSummary": "pipeline.jobs.run",
    "run_batch": "pipeline.jobs.batch",
    "BatchReport": "pipeline.jobs.batch",
    "store_from_blocks": "pipeline.store.blocks",
    "RaymaskError": "pipeline.errors",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    return getattr(import_module(module), name)


def __dir__() -> list[str]:
    return sorted(__all__)
