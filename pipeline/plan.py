"""Work units from the tile grid and the store's state: what is left to do."""

from __future__ import annotations

import numpy as np

from pipeline.geometry import TileGrid, WorkUnit


def pending_units(grid: TileGrid, done: np.ndarray) -> list[WorkUnit]:
    """Units not yet written, in row-major order. ``done`` is a boolean array over the unit grid."""
    if done.shape != grid.unit_grid_shape:
        raise ValueError(f"done-mask shape {done.shape} does not match the unit grid {grid.unit_grid_shape}")
    return [unit for unit in grid.units() if not done[unit.index]]
