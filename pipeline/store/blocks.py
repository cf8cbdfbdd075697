"""Build a mask store from label blocks computed here (imported masks, synthetic benchmarks, tests).

The store is the same as a job writes (one work unit per chunk, statistics per unit, status
``complete`` at the end), without a model or a source: its provenance says so.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline import __version__
from pipeline.core.colors import default_color
from pipeline.core.geometry import Box, TileGrid
from pipeline.core.georef import Georef
from pipeline.core.stats import class_table
from pipeline.core.volume import VolumeGeometry
from pipeline.store import MaskStore, StoreLayout


def store_from_blocks(
    path: str | Path,
    shape: tuple[int, ...],
    chunk: tuple[int, ...],
    classes: list[str],
    fill: Callable[[Box], np.ndarray],
    *,
    georef: Georef | None = None,
    volume: VolumeGeometry | None = None,
    origin: str = "imported",
) -> MaskStore:
    """A complete store whose chunk ``box`` holds ``fill(box)`` (uint8 class ids, 255 = nodata)."""
    georef = georef or Georef(None, None)
    grid = TileGrid.chunked(shape, chunk)
    layout = StoreLayout(
        grid=grid,
        classes=tuple((name, default_color(i)) for i, name in enumerate(classes)),
        georef=georef,
        provenance={"raymask_version": __version__, "identity": {"origin": origin}, "origin": origin},
        volume=volume,
    )
    store = MaskStore.create(path, layout)
    pixel_measure = store.pixel_measure()
    for unit in grid.units():
        labels = np.asarray(fill(unit.core), dtype=np.uint8)
        store.write_unit(unit, labels, pixel_measure=pixel_measure, n_classes=len(classes))
    measure_unit = layout.measure_unit
    store.mark_complete({"classes": class_table(store.totals(), classes, measure_unit), "measure": measure_unit})
    return store
