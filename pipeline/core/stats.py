"""Pure per-class statistics: pixel counts and areas per chunk, merged on the driver.

Workers count each chunk they write and return a few numbers; the driver never sees pixels.
``NODATA`` pixels are never counted. Areas come from a per-row pixel area (m²), which is one
constant for a projected grid and varies by latitude for a geographic one.

Vocabulary, here and everywhere: a *measure* is an area or a volume (of a class, a region, a work
unit: ``ChunkStats.measure``, ``units/measure`` in a store); the *pixel measure* is the measure of
one pixel (``PixelMeasure``: m² per image row, or one mm² or mm³); the *measure unit* says which
(``"m2"``, ``"mm2"``, ``"mm3"``; ``StoreMeta.measure_unit``, written ``measure`` on disk and in
summaries).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

NODATA = 255
M2_PER_HA = 10_000.0
PROBABILITY_SCALE = 254  # stored probabilities are uint8 round(p * 254); 255 = nodata (workers.models.prediction)


PixelMeasure = np.ndarray | float | None  # m² per pixel for each row, or mm² / mm³ per pixel, or nothing
MM3_PER_ML = 1_000.0


@dataclass(frozen=True)
class ChunkStats:
    """Counts and measures of each class in one chunk (index = class id)."""

    pixels: np.ndarray  # int64, one per class
    measure: np.ndarray  # float64, one per class: m², mm² or mm³; NaN without a measure


def count_classes(labels: np.ndarray, n_classes: int, row_area: PixelMeasure) -> ChunkStats:
    """Per-class pixel counts and areas of a label chunk.

    ``row_area`` has one value per row (first axis) of a 2-D chunk, or is one value per pixel or
    voxel, or None. Areas are exact counts times the per-row area (per-row counts first, so
    no float sum runs over every pixel: that was the slowest step of writing a chunk).

    Labels >= ``n_classes`` other than ``NODATA`` are a model bug and raise.
    """
    codes = np.asarray(labels, dtype=np.uint8)
    if isinstance(row_area, np.ndarray):
        rows = codes.shape[0]
        keys = (np.arange(rows, dtype=np.int64)[:, None] * 256 + codes.reshape(rows, -1)).reshape(-1)
        per_row = np.bincount(keys, minlength=rows * 256).reshape(rows, 256)
        counts = per_row.sum(axis=0)
    else:
        counts = np.bincount(codes.reshape(-1), minlength=256)
    stray = np.flatnonzero(counts[n_classes:NODATA])
    if stray.size:
        raise ValueError(f"label {int(stray[-1]) + n_classes} is outside the {n_classes} classes")
    pixels = counts[:n_classes].astype(np.int64)
    if row_area is None:
        return ChunkStats(pixels, np.full(n_classes, np.nan))
    if not isinstance(row_area, np.ndarray):
        return ChunkStats(pixels, pixels * float(row_area))
    area = per_row[:, :n_classes].astype(np.float64).T @ np.asarray(row_area, dtype=np.float64)
    return ChunkStats(pixels, area)


def merge(parts: Iterable[ChunkStats], n_classes: int) -> ChunkStats:
    pixels = np.zeros(n_classes, dtype=np.int64)
    area = np.zeros(n_classes, dtype=np.float64)
    for part in parts:
        pixels += part.pixels
        area += part.measure
    return ChunkStats(pixels, area)


def class_table(
    total: ChunkStats, names: Sequence[str], measure_unit: str | None
) -> dict[str, dict[str, float | int | None]]:
    """``{name: {id, pixels, fraction, ...}}`` with ``area_m2``/``area_ha`` (unit ``m2``),
    ``area_mm2`` (``mm2``) or ``volume_mm3``/``volume_ml`` (``mm3``); fractions are of valid pixels."""
    valid = int(total.pixels.sum())
    table: dict[str, dict[str, float | int | None]] = {}
    for cid, name in enumerate(names):
        row: dict[str, float | int | None] = {
            "id": cid,
            "pixels": int(total.pixels[cid]),
            "fraction": (int(total.pixels[cid]) / valid) if valid else 0.0,
        }
        value = float(total.measure[cid])
        if measure_unit == "m2":
            row.update(area_m2=value, area_ha=value / M2_PER_HA)
        elif measure_unit == "mm3":
            row.update(volume_mm3=value, volume_ml=value / MM3_PER_ML)
        elif measure_unit == "mm2":
            row.update(area_mm2=value, area_cm2=value / 100.0)
        table[name] = row
    return table


def decode_probability(values: np.ndarray) -> np.ndarray:
    """Stored uint8 probabilities as float32 in [0, 1]; nodata (255) becomes NaN."""
    out = values.astype(np.float32) / PROBABILITY_SCALE
    out[values == NODATA] = np.nan
    return out
