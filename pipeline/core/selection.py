"""Pure geometry of queries: which pixels a box, a point or a polygon selects (no I/O).

The rule everywhere: a pixel (voxel) is selected when its centre lies inside the query shape,
boundary included. Pixel ``(row, col)`` of a GDAL transform has its centre at ``(col + 0.5,
row + 0.5)``; in ``pixel`` coordinates the same holds with the identity transform; a volume
voxel's centre is its index mapped by the patient affine.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.core.geometry import Box
from pipeline.core.transform import GeoTransform, to_index
from pipeline.errors import QueryError


def centre_window(transform: GeoTransform, bounds: Sequence[float], shape: tuple[int, int]) -> Box:
    """Rows and columns whose centres lie in ``(minx, miny, maxx, maxy)``, for an unrotated grid."""
    x0, dx, _, y0, _, dy = transform
    minx, miny, maxx, maxy = bounds
    cols = _axis_range(x0, dx, minx, maxx, shape[1])
    rows = _axis_range(y0, dy, miny, maxy, shape[0])
    start = (rows[0], cols[0])
    return Box(start, (max(rows[0], rows[1]), max(cols[0], cols[1])))


def _axis_range(origin: float, step: float, low: float, high: float, n: int) -> tuple[int, int]:
    """Indices i with ``origin + (i + 0.5) * step`` in ``[low, high]``, clipped to ``[0, n)``."""
    a, b = (low - origin) / step - 0.5, (high - origin) / step - 0.5
    a, b = min(a, b), max(a, b)
    first = max(0, math.ceil(a - 1e-9))
    last = min(n, math.floor(b + 1e-9) + 1)
    return first, max(first, last)


def index_window(transform: GeoTransform, xs: np.ndarray, ys: np.ndarray, shape: tuple[int, ...]) -> Box:
    """The smallest window of whole pixels (plus one on each side) around map points, clipped."""
    rows, cols = to_index(transform, xs, ys)
    return bounding_window([rows, cols], shape)


def bounding_window(index_coords: Sequence[np.ndarray], shape: tuple[int, ...]) -> Box:
    """A window covering fractional index coordinates (one list per axis), padded by a pixel, clipped."""
    start, stop = [], []
    for coords, n in zip(index_coords, shape):
        finite = np.asarray(coords, dtype=np.float64)
        finite = finite[np.isfinite(finite)]
        if not len(finite):
            return Box((0,) * len(shape), (0,) * len(shape))
        lo = min(max(0, math.floor(finite.min()) - 1), n)
        hi = max(lo, min(n, math.ceil(finite.max()) + 1))
        start.append(lo)
        stop.append(hi)
    return Box(tuple(start), tuple(stop))


def box_ring(bounds: Sequence[float], points_per_edge: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """The outline of a 2-D box, densified, for reprojection."""
    minx, miny, maxx, maxy = bounds
    t = np.linspace(0.0, 1.0, points_per_edge, endpoint=False)
    xs = np.concatenate(
        [minx + (maxx - minx) * t, np.full_like(t, maxx), maxx - (maxx - minx) * t, np.full_like(t, minx)]
    )
    ys = np.concatenate(
        [np.full_like(t, miny), miny + (maxy - miny) * t, np.full_like(t, maxy), maxy - (maxy - miny) * t]
    )
    return xs, ys


def parse_numbers(text: str, count: Sequence[int], what: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.replace(" ", "").split(","))
    except ValueError as exc:
        raise QueryError(f"{what} {text!r}: expected {' or '.join(map(str, count))} comma-separated numbers") from exc
    if len(values) not in count or not all(math.isfinite(v) for v in values):
        raise QueryError(f"{what} {text!r}: expected {' or '.join(map(str, count))} comma-separated numbers")
    return values


def check_box(bounds: Sequence[float], what: str = "--bbox") -> None:
    half = len(bounds) // 2
    if any(bounds[i] > bounds[i + half] for i in range(half)):
        raise QueryError(f"{what} {','.join(f'{v:g}' for v in bounds)}: each minimum must not exceed its maximum")


@dataclass(frozen=True)
class Zone:
    """One polygon zone: rings as ``(n, 2)`` coordinate arrays, GeoJSON-like, and its properties."""

    index: int
    properties: dict[str, Any]
    geometry: dict[str, Any]  # GeoJSON Polygon or MultiPolygon


def parse_zones(doc: Any, name: str) -> tuple[list[Zone], str | None]:
    """Polygons from a GeoJSON FeatureCollection, Feature or geometry; and the legacy ``crs`` name."""
    if not isinstance(doc, dict) or "type" not in doc:
        raise QueryError(f"{name}: not valid GeoJSON: expected an object with a 'type'")
    crs = None
    legacy = doc.get("crs")
    if isinstance(legacy, dict) and isinstance(legacy.get("properties"), dict):
        crs = legacy["properties"].get("name")
    kind = doc["type"]
    if kind == "FeatureCollection":
        features = doc.get("features")
        if not isinstance(features, list):
            raise QueryError(f"{name}: not valid GeoJSON: a FeatureCollection needs a 'features' list")
    elif kind == "Feature":
        features = [doc]
    else:
        features = [{"type": "Feature", "properties": {}, "geometry": doc}]
    zones = []
    for i, feature in enumerate(features):
        if not isinstance(feature, dict) or feature.get("type") != "Feature":
            raise QueryError(f"{name}: not valid GeoJSON: feature {i} is not a Feature")
        geometry = feature.get("geometry")
        _check_geometry(geometry, f"{name}: not valid GeoJSON: feature {i}")
        properties = feature.get("properties") or {}
        if not isinstance(properties, dict):
            raise QueryError(f"{name}: not valid GeoJSON: feature {i} has properties that are not an object")
        zones.append(Zone(i, properties, geometry))  # type: ignore[arg-type]
    if not zones:
        raise QueryError(f"{name}: no features: nothing to measure")
    return zones, crs


def _check_geometry(geometry: Any, where: str) -> None:
    if not isinstance(geometry, dict):
        raise QueryError(f"{where} has no geometry")
    kind = geometry.get("type")
    coords = geometry.get("coordinates")
    polygons: Any
    if kind == "Polygon":
        polygons = [coords]
    elif kind == "MultiPolygon":
        polygons = coords if isinstance(coords, list) else None
    else:
        raise QueryError(f"{where} is a {kind}; zones must be Polygon or MultiPolygon")
    if not isinstance(polygons, list):
        raise QueryError(f"{where} has no coordinates")
    for polygon in polygons:
        if not isinstance(polygon, list) or not polygon:
            raise QueryError(f"{where}: a polygon needs at least one ring")
        for ring in polygon:
            try:
                arr = np.asarray(ring, dtype=np.float64)
            except (TypeError, ValueError) as exc:
                raise QueryError(f"{where}: coordinates must be numbers") from exc
            if arr.ndim != 2 or arr.shape[1] < 2 or len(arr) < 4:
                raise QueryError(f"{where}: a ring needs at least 4 [x, y] positions")
            if not np.isfinite(arr).all():
                raise QueryError(f"{where}: coordinates must be finite numbers")
            if not np.array_equal(arr[0, :2], arr[-1, :2]):
                raise QueryError(f"{where}: a ring must end where it starts")


def densify(ring: np.ndarray, pieces: int = 16) -> np.ndarray:
    """Each segment cut into ``pieces``, so that a reprojected ring follows the curved edge."""
    ring = np.asarray(ring, dtype=np.float64)[:, :2]
    a, b = ring[:-1], ring[1:]
    t = np.linspace(0.0, 1.0, pieces, endpoint=False)[None, :, None]
    points = (a[:, None, :] + (b - a)[:, None, :] * t).reshape(-1, 2)
    return np.vstack([points, ring[-1:]])
