"""Georeferencing without I/O: a grid's CRS and transform, CF grid-mapping attributes, pixel areas.

Transforms are GDAL geotransforms (``pipeline.core.transform``: pixel corners and centres).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from pyproj import CRS, Geod

from pipeline.core.stats import PixelMeasure
from pipeline.core.transform import GeoTransform, is_rotated


@dataclass(frozen=True)
class Georef:
    """A CRS (WKT, or None for a plain image) and a GDAL geotransform (or None)."""

    crs_wkt: str | None
    transform: GeoTransform | None

    @property
    def is_rotated(self) -> bool:
        return self.transform is not None and is_rotated(self.transform)

    def crs(self) -> CRS | None:
        return CRS.from_wkt(self.crs_wkt) if self.crs_wkt else None


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


def crs_name(wkt: str | None) -> str | None:
    """A CRS's name for a person (the first quoted string of its WKT: "WGS 84 / UTM zone 30N")."""
    return wkt.split('"')[1] if wkt and '"' in wkt else wkt


def pixel_measure(
    georef: Georef, height: int, *, voxel_mm3: float | None = None, pixel_area_mm2: float | None = None
) -> PixelMeasure:
    """What one pixel measures: mm³ per voxel (volumes), mm² (medical images), m² per image row
    (maps with a CRS), or None (a plain image: statistics in pixels only)."""
    if voxel_mm3 is not None:
        return voxel_mm3
    if pixel_area_mm2 is not None:
        return pixel_area_mm2
    return row_pixel_areas(georef, height)


def corner_bounds(
    crs_wkt: str | None, transform: GeoTransform | list[float] | None, shape: tuple[int, ...] | list[int]
) -> tuple[list[float] | None, list[float] | None, list[list[float]] | None]:
    """A 2-D grid's outer edges: (min x, min y, max x, max y) in its CRS, the same in WGS84 lon/lat,
    and its four corners in lon/lat (a footprint ring); Nones where there is no transform or CRS."""
    from pipeline.core.transform import to_map

    if transform is None or len(shape) != 2:
        return None, None, None
    rows, cols = np.array([0, 0, shape[0], shape[0]]), np.array([0, shape[1], shape[1], 0])
    xs, ys = to_map(tuple(transform), rows, cols)  # type: ignore[arg-type]
    box = [float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())]
    if not crs_wkt:
        return box, None, None
    from pyproj import Transformer

    to_lonlat = Transformer.from_crs(CRS.from_wkt(crs_wkt), CRS.from_epsg(4326), always_xy=True)
    lon, lat = (np.asarray(v, dtype=float) for v in to_lonlat.transform(xs, ys))
    ring = [[float(a), float(b)] for a, b in zip(lon, lat)]
    return box, [float(lon.min()), float(lat.min()), float(lon.max()), float(lat.max())], ring
