"""The one transform type: a GDAL geotransform for rasters, a 4x4 affine for volumes.

A geotransform is kept in GDAL order ``(x0, dx, rx, y0, ry, dy)``: the outer corner of pixel
(0, 0) and the pixel size, so that pixel ``(row, col)``'s centre is at index ``(row + 0.5, col +
0.5)``. Writing corners where centres belong (or the reverse) is the classic half-pixel shift;
every conversion between pixel indices and map coordinates in raymask goes through this module.

A volume's affine maps a voxel index ``(z, y, x)`` to DICOM patient coordinates (mm); a voxel's
index *is* its centre there (DICOM positions name pixel centres).
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np

from pipeline.core.geometry import Box

C = TypeVar("C", np.ndarray, float)  # coordinates: arrays, or one number

GeoTransform = tuple[float, float, float, float, float, float]
PIXEL_TRANSFORM: GeoTransform = (0.0, 1.0, 0.0, 0.0, 0.0, 1.0)  # map coordinates = pixel indices


def to_map(transform: GeoTransform, rows: C, cols: C) -> tuple[C, C]:
    """Map ``(x, y)`` of fractional pixel indices (add 0.5 for centres; whole numbers are corners)."""
    x0, dx, rx, y0, ry, dy = transform
    return x0 + cols * dx + rows * rx, y0 + cols * ry + rows * dy


def to_index(transform: GeoTransform, xs: C, ys: C) -> tuple[C, C]:
    """Fractional ``(rows, cols)`` of map points: the inverse of ``to_map`` (floor gives the pixel)."""
    x0, dx, rx, y0, ry, dy = transform
    det = dx * dy - rx * ry
    cols = (dy * (xs - x0) - rx * (ys - y0)) / det
    rows = (-ry * (xs - x0) + dx * (ys - y0)) / det
    return rows, cols


def centres(transform: GeoTransform, box: Box) -> tuple[np.ndarray, np.ndarray]:
    """Map x and y of every pixel centre in ``box`` (2-D arrays of the box's shape; any rotation)."""
    rows = np.arange(box.start[0], box.stop[0], dtype=np.float64)[:, None] + 0.5
    cols = np.arange(box.start[1], box.stop[1], dtype=np.float64)[None, :] + 0.5
    return to_map(transform, rows, cols)


def axis_centres(transform: GeoTransform, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """1-D y and x coordinates of pixel centres of a north-up (unrotated) grid of ``shape``."""
    x0, dx, _, y0, _, dy = transform
    rows, cols = shape
    y = y0 + (np.arange(rows, dtype=np.float64) + 0.5) * dy
    x = x0 + (np.arange(cols, dtype=np.float64) + 0.5) * dx
    return y, x


def is_rotated(transform: GeoTransform) -> bool:
    return transform[2] != 0 or transform[4] != 0


def apply_affine(affine: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Patient coordinates ``(..., 3)`` of voxel indices ``(..., 3)`` (z, y, x)."""
    index = np.asarray(index, dtype=np.float64)
    return index @ affine[:3, :3].T + affine[:3, 3]


def voxel_centres(affine: np.ndarray, box: Box) -> np.ndarray:
    """Patient coordinates ``(*box.shape, 3)`` of every voxel centre in ``box``."""
    grids = np.meshgrid(*[np.arange(a, b, dtype=np.float64) for a, b in zip(box.start, box.stop)], indexing="ij")
    return apply_affine(affine, np.stack(grids, axis=-1))
