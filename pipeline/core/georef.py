"""Georeferencing without I/O: CF grid-mapping attributes, pixel-centre coordinates, pixel areas.

A transform is kept in GDAL order ``(x0, dx, rx, y0, ry, dy)``: the outer corner of pixel
(0, 0) and the pixel size, so pixel ``(row, col)``'s centre is at ``col + 0.5, row + 0.5``.
Writing corners where centres belong (or the reverse) is the classic half-pixel shift.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from pyproj import CRS, Geod

GeoTransform = tuple[float, float, float, float, float, float]


@dataclass(frozen=True)
class Georef:
    """A CRS (WKT, or None for a plain image) and a GDAL geotransform (or None)."""

    crs_wkt: str | None
    transform: GeoTransform | None

    @property
    def is_rotated(self) -> bool:
        return self.transform is not None and (self.transform[2] != 0 or self.transform[4] != 0)

    def crs(self) -> CRS | None:
        return CRS.from_wkt(self.crs_wkt) if self.crs_wkt else None


def pixel_centres(transform: GeoTransform, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """1-D y and x coordinates of pixel centres for a north-up (unrotated) grid."""
    x0, dx, _, y0, _, dy = transform
    rows, cols = shape
    y = y0 + (np.arange(rows, dtype=np.float64) + 0.5) * dy
    x = x0 + (np.arange(cols, dtype=np.float64) + 0.5) * dx
    return y, x


def cf_grid_mapping(georef: Georef) -> dict[str, Any]:
    """Attributes of a CF ``spatial_ref`` variable, as rioxarray and GDAL read them."""
    attrs: dict[str, Any] = {}
    crs = georef.crs()
    if crs is not None:
        attrs.update(crs.to_cf())
        attrs["crs_wkt"] = georef.crs_wkt
        attrs["spatial_ref"] = georef.crs_wkt
    if georef.transform is not None:
        attrs["GeoTransform"] = " ".join(repr(float(v)) for v in georef.transform)
    return attrs


def row_pixel_areas(georef: Georef, height: int) -> np.ndarray | None:
    """Area in m² of one pixel in each row, or None when the grid has no CRS.

    Projected CRS: ``|det(transform)|`` times the square of the unit's size in metres (planar
    area, as GIS tools report it). Geographic CRS: the geodesic area of one pixel on the CRS's
    ellipsoid, per row, since it shrinks towards the poles.
    """
    crs = georef.crs()
    if crs is None or georef.transform is None:
        return None
    x0, dx, rx, y0, ry, dy = georef.transform
    if crs.is_geographic:
        if georef.is_rotated:
            raise ValueError("geodesic areas need a north-up grid; this geographic grid is rotated")
        geod = Geod(ellps="WGS84") if crs.ellipsoid is None else crs.get_geod()
        if geod is None:
            geod = Geod(ellps="WGS84")
        tops = y0 + np.arange(height, dtype=np.float64) * dy
        bottoms = tops + dy
        lons = [x0, x0 + dx, x0 + dx, x0]
        areas = np.empty(height, dtype=np.float64)
        for row in range(height):
            area, _ = geod.polygon_area_perimeter(lons, [tops[row], tops[row], bottoms[row], bottoms[row]])
            areas[row] = abs(area)
        return areas
    unit = _metres_per_unit(crs)
    return np.full(height, abs(dx * dy - rx * ry) * unit * unit, dtype=np.float64)


def _metres_per_unit(crs: CRS) -> float:
    axis = crs.axis_info[0] if crs.axis_info else None
    factor = getattr(axis, "unit_conversion_factor", None)
    return float(factor) if factor else 1.0
