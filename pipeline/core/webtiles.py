"""Web-map tiles over a store's pixel grid: which pixels a tile shows, at which zoom.

The viewer shows a 2-D store in its own pixel space (Leaflet's ``CRS.Simple``), never reprojected,
so what is drawn is what is stored. At the deepest zoom ``max_zoom`` a 256-pixel tile shows 256 store
pixels; each zoom out halves that, so at zoom ``z`` one screen pixel covers ``2 ** (max_zoom - z)``
store pixels (the ``step``). Tile ``(x, y)`` starts at column ``x * 256 * step`` and row
``y * 256 * step``; tiles past the image's edge show nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

TILE = 256


def max_zoom(shape: tuple[int, int], tile: int = TILE) -> int:
    """The zoom at which a tile shows ``tile`` pixels: the fewest halvings that fit the image in one tile."""
    longest = max(int(shape[0]), int(shape[1]), 1)
    return max(0, math.ceil(math.log2(longest / tile))) if longest > tile else 0


@dataclass(frozen=True)
class TileWindow:
    """The store pixels under a tile: rows ``[row0, row1)``, columns ``[col0, col1)``, read every
    ``step`` pixels; ``rows`` x ``cols`` is the part of the tile they fill (the rest is empty)."""

    row0: int
    row1: int
    col0: int
    col1: int
    step: int

    @property
    def rows(self) -> int:
        return -(-(self.row1 - self.row0) // self.step)

    @property
    def cols(self) -> int:
        return -(-(self.col1 - self.col0) // self.step)


def tile_window(shape: tuple[int, int], z: int, x: int, y: int, tile: int = TILE) -> TileWindow | None:
    """The pixels tile ``(z, x, y)`` shows, or None for a tile outside the image (or a zoom past the
    deepest, or a negative index)."""
    top = max_zoom(shape, tile)
    if z < 0 or z > top or x < 0 or y < 0:
        return None
    step = 2 ** (top - z)
    span = tile * step
    row0, col0 = y * span, x * span
    if row0 >= shape[0] or col0 >= shape[1]:
        return None
    return TileWindow(row0, min(row0 + span, int(shape[0])), col0, min(col0 + span, int(shape[1])), step)


def level_for(step: int, levels: int) -> int:
    """The coarsest stored level (level ``k`` halves ``k`` times) that still has at least one pixel per
    screen pixel at ``step``: reading it, then every ``step / 2 ** level``-th pixel, draws the tile."""
    return max(0, min(levels, int(math.log2(step)))) if step >= 1 else 0
