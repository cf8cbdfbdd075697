"""Pure per-class statistics: pixel counts and areas per chunk, merged on the driver.

Workers count each chunk they write and return a few numbers; the driver never sees pixels.
``NODATA`` pixels are never counted. Areas come from a per-row pixel area (m²), which is one
constant for a projected grid and varies by latitude for a geographic one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

NODATA = 255
M2_PER_HA = 10_000.0


@dataclass(frozen=True)
class ChunkStats:
    """Counts and areas of each class in one chunk (index = class id)."""

    pixels: np.ndarray  # int64, one per class
    area_m2: np.ndarray  # float64, one per class; NaN when the grid has no area


def count_classes(labels: np.ndarray, n_classes: int, row_area: np.ndarray | None) -> ChunkStats:
    """Per-class pixel counts and areas of a 2-D label chunk; ``row_area`` has one value per row.

    Labels >= ``n_classes`` other than ``NODATA`` are a model bug and raise.
    """
    flat = labels.reshape(-1)
    valid = flat != NODATA
    if valid.any() and int(flat[valid].max()) >= n_classes:
        raise ValueError(f"label {int(flat[valid].max())} is outside the {n_classes} classes")
    pixels = np.bincount(flat[valid], minlength=n_classes).astype(np.int64)
    if row_area is None:
        return ChunkStats(pixels, np.full(n_classes, np.nan))
    weights = np.broadcast_to(np.asarray(row_area, dtype=np.float64)[:, None], labels.shape).reshape(-1)
    area = np.bincount(flat[valid], weights=weights[valid], minlength=n_classes)
    return ChunkStats(pixels, area.astype(np.float64))


def merge(parts: Iterable[ChunkStats], n_classes: int) -> ChunkStats:
    pixels = np.zeros(n_classes, dtype=np.int64)
    area = np.zeros(n_classes, dtype=np.float64)
    for part in parts:
        pixels += part.pixels
        area += part.area_m2
    return ChunkStats(pixels, area)


def class_table(total: ChunkStats, names: Sequence[str]) -> dict[str, dict[str, float | int | None]]:
    """``{name: {pixels, fraction, area_m2, area_ha}}``; fractions are of valid pixels; areas None without a CRS."""
    valid = int(total.pixels.sum())
    table: dict[str, dict[str, float | int | None]] = {}
    for cid, name in enumerate(names):
        area = float(total.area_m2[cid])
        has_area = not np.isnan(area)
        table[name] = {
            "id": cid,
            "pixels": int(total.pixels[cid]),
            "fraction": (int(total.pixels[cid]) / valid) if valid else 0.0,
            "area_m2": area if has_area else None,
            "area_ha": area / M2_PER_HA if has_area else None,
        }
    return table
