"""The region table's columns, from folded per-region sums (pure: no I/O).

One row per region, stored in the store's ``region_table`` group as one 1-D zarr array per
column (the documented format, also in the README):

* ``id`` (the value in the ``regions`` array), ``class`` (class id), ``pixels`` or ``voxels``;
* the area or volume in the store's measure unit: ``area_m2``/``area_ha`` (maps), ``area_mm2``
  (medical images), ``volume_mm3``/``volume_ml`` (volumes);
* the bounding box in array indices, half-open (``row_start``..``row_stop``, ``col_*``, ``slice_*``)
  and the centroid in array indices (``centroid_row``...: the mean pixel index, as
  ``scipy.ndimage.center_of_mass`` gives it);
* maps: the box's outer pixel edges and the centroid in the map CRS (``x_min``..``y_max``,
  ``centroid_x``, ``centroid_y``) and in WGS84 (``lon_*``, ``lat_*``, ``centroid_lon``,
  ``centroid_lat``; the box from its four corners);
* volumes: the centroid and the box of voxel centres in DICOM patient coordinates (LPS, mm):
  ``centroid_x_mm``.., ``x_min_mm``..``z_max_mm``;
* the mean source value per band: ``mean_hu`` (CT), ``mean_value`` (one band) or ``mean_b{N}``;
* ``mean_probability``: the mean probability of the region's class over its pixels, where the
  store keeps probabilities (``output.probabilities``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from pipeline.core.georef import Georef
from pipeline.core.regions import RegionStats
from pipeline.core.stats import M2_PER_HA, MM3_PER_ML
from pipeline.core.transform import apply_affine, to_map

AXIS_NAMES = {2: ("row", "col"), 3: ("slice", "row", "col")}


@dataclass(frozen=True)
class TableContext:
    """What turns pixel sums into world columns: the store's measure unit and geometry, the source bands."""

    ndim: int
    measure_unit: str | None  # "m2", "mm2", "mm3" or None
    georef: Georef
    affine: np.ndarray | None = None  # volumes: voxel (k, j, i, 1) -> patient (x, y, z, 1)
    bands: tuple[int, ...] = ()  # source bands whose means are kept; () when no source was read
    modality: str | None = None
    probabilities: bool = False  # the store keeps per-class probabilities: a mean_probability column


def intensity_columns(context: TableContext) -> list[str]:
    if not context.bands:
        return []
    if context.modality == "CT" and len(context.bands) == 1:
        return ["mean_hu"]
    if len(context.bands) == 1:
        return ["mean_value"]
    return [f"mean_b{b}" for b in context.bands]


def columns(stats: RegionStats, first_id: int, context: TableContext) -> dict[str, np.ndarray]:
    """Table rows ``first_id, first_id + 1, ...`` for the regions in ``stats`` (in that order)."""
    n = len(stats)
    axes = AXIS_NAMES[context.ndim]
    out: dict[str, np.ndarray] = {
        "id": np.arange(first_id, first_id + n, dtype=np.int64),
        "class": stats.classes.astype(np.int64),
        "voxels" if context.ndim == 3 else "pixels": stats.pixels.astype(np.int64),
    }
    if context.measure_unit == "m2":
        out["area_m2"] = stats.measure
        out["area_ha"] = stats.measure / M2_PER_HA
    elif context.measure_unit == "mm2":
        out["area_mm2"] = stats.measure
    elif context.measure_unit == "mm3":
        out["volume_mm3"] = stats.measure
        out["volume_ml"] = stats.measure / MM3_PER_ML
    for a, name in enumerate(axes):
        out[f"{name}_start"] = stats.start[:, a].astype(np.int64)
        out[f"{name}_stop"] = stats.stop[:, a].astype(np.int64)
    centroid = stats.index_sum / np.maximum(stats.pixels, 1)[:, None]
    for a, name in enumerate(axes):
        out[f"centroid_{name}"] = centroid[:, a]
    if context.ndim == 2 and context.georef.transform is not None:
        out.update(_map_columns(stats, centroid, context.georef))
    if context.ndim == 3 and context.affine is not None:
        out.update(_patient_columns(stats, centroid, context.affine))
    for b, name in enumerate(intensity_columns(context)):
        out[name] = stats.intensity_sum[:, b] / np.maximum(stats.pixels, 1)
    if context.probabilities:
        out["mean_probability"] = stats.probability_sum / np.maximum(stats.pixels, 1)
    return out


def _map_columns(stats: RegionStats, centroid: np.ndarray, georef: Georef) -> dict[str, np.ndarray]:
    """Box (outer pixel edges) and centroid (pixel centres: index + 0.5) in the map CRS and in lon/lat."""
    assert georef.transform is not None
    out: dict[str, np.ndarray] = {}
    corners = [
        to_map(georef.transform, row, col)
        for row, col in itertools.product((stats.start[:, 0], stats.stop[:, 0]), (stats.start[:, 1], stats.stop[:, 1]))
    ]
    xs, ys = np.stack([c[0] for c in corners]), np.stack([c[1] for c in corners])
    out["x_min"], out["y_min"], out["x_max"], out["y_max"] = xs.min(0), ys.min(0), xs.max(0), ys.max(0)
    cx, cy = to_map(georef.transform, centroid[:, 0] + 0.5, centroid[:, 1] + 0.5)
    out["centroid_x"], out["centroid_y"] = cx, cy
    crs = georef.crs()
    if crs is not None:
        from pyproj import CRS, Transformer

        to_lonlat = Transformer.from_crs(crs, CRS.from_epsg(4326), always_xy=True)
        lon, lat = to_lonlat.transform(xs.ravel(), ys.ravel())
        lon, lat = np.asarray(lon).reshape(xs.shape), np.asarray(lat).reshape(ys.shape)
        out["lon_min"], out["lat_min"], out["lon_max"], out["lat_max"] = lon.min(0), lat.min(0), lon.max(0), lat.max(0)
        clon, clat = to_lonlat.transform(cx, cy)
        out["centroid_lon"], out["centroid_lat"] = np.asarray(clon), np.asarray(clat)
    return out


def _patient_columns(stats: RegionStats, centroid: np.ndarray, affine: np.ndarray) -> dict[str, np.ndarray]:
    """Centroid and box of voxel centres in patient coordinates (mm); voxel index = its centre."""
    out: dict[str, np.ndarray] = {}
    centre = apply_affine(affine, centroid)
    ends = [(stats.start[:, a], stats.stop[:, a] - 1) for a in range(3)]
    corners = np.stack([apply_affine(affine, np.stack(c, axis=1)) for c in itertools.product(*ends)])
    for a, name in enumerate("xyz"):
        out[f"centroid_{name}_mm"] = centre[:, a]
    for a, name in enumerate("xyz"):
        out[f"{name}_min_mm"] = corners[:, :, a].min(0)
        out[f"{name}_max_mm"] = corners[:, :, a].max(0)
    return out
