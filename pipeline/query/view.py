"""Read and query finished mask stores: the Python API behind ``raymask regions | query | zones``.

>>> import pipeline
>>> s = pipeline.open_store("out/aber-vegetation.zarr")
>>> s.mask                      # dask-backed xarray DataArray (CRS through rioxarray)
>>> s.regions(cls="vegetation", min_area=100).head()
>>> s.area(bbox=(-4.09, 52.40, -4.06, 52.42), crs="EPSG:4326")

Queries read only the chunks that the box, point or zone touches, one dask task per chunk
(the threaded scheduler), and never hold more than a chunk per thread. Pixels count when their
centre lies inside the shape (see ``pipeline.core.selection``).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import zarr

from pipeline.core.geometry import Box, TileGrid
from pipeline.core.selection import (
    Zone,
    bounding_window,
    box_ring,
    centre_window,
    check_box,
    densify,
    index_window,
    parse_zones,
)
from pipeline.core.stats import NODATA, ChunkStats, class_table, count_classes, merge
from pipeline.core.transform import PIXEL_TRANSFORM, GeoTransform, axis_centres, to_index, voxel_centres
from pipeline.core.transform import centres as pixel_centres
from pipeline.errors import QueryError, one_line
from pipeline.store import COMPLETE, MaskStore

PIXEL, PATIENT = "pixel", "patient"

Selector = Callable[[Box], "np.ndarray | None"]  # True where a pixel of the box is selected; None: all


def open_store(path: str | Path) -> StoreView:
    """Open a raymask store for reading and querying (any status; see ``.status``)."""
    return StoreView(MaskStore.open(path))


class StoreView:
    """A mask store, read-only: its arrays as xarray, its classes, statistics and regions, and queries."""

    def __init__(self, store: MaskStore) -> None:
        self._store = store
        info = self.info = store.info
        self.path = store.path
        self.meta = store.meta  # the raw record, as stored
        self.classes: list[str] = info.class_names
        self.shape: tuple[int, ...] = tuple(info.shape)
        self.measure_unit: str | None = info.measure_unit
        self.georef = store.georef
        volume = info.volume
        self.affine: np.ndarray | None = np.asarray(volume.affine) if volume else None
        self.spacing: tuple[float, ...] | None = tuple(volume.spacing_mm) if volume else None

    def __repr__(self) -> str:
        return f"<raymask store {self.path} {self.status} {'x'.join(map(str, self.shape))} classes={self.classes}>"

    # -- what the store says ---------------------------------------------------------------------

    @property
    def status(self) -> str:
        return self._store.status

    @property
    def stats(self) -> dict[str, Any]:
        return dict(self.info.stats or {})

    @property
    def crs(self) -> Any:
        """The store's pyproj CRS, or None (volumes, plain images)."""
        return self.georef.crs()

    @property
    def transform(self) -> tuple[float, ...] | None:
        return self.georef.transform

    def class_id(self, name: str) -> int:
        if name not in self.classes:
            raise QueryError(f"{self.path}: no class {name!r}; classes: {', '.join(self.classes)}")
        return self.classes.index(name)

    # -- arrays ------------------------------------------------------------------------------

    @property
    def mask(self) -> Any:
        """The class ids as a lazy (dask) xarray DataArray; 255 = nodata (``rio.nodata``), the classes
        as CF ``flag_values`` / ``flag_meanings`` attributes."""
        out = self._dataarray(self._store.mask, "mask")
        info = self._store.info
        out.attrs.update(
            long_name="class id",
            flag_values=[c.id for c in info.classes],
            flag_meanings=" ".join(c.name.replace(" ", "_") for c in info.classes),
            flag_colors=[c.color for c in info.classes],
            nodata=info.nodata,
        )
        return out

    @property
    def regions_array(self) -> Any:
        """Region ids (0 = none) as a lazy xarray DataArray, matching the rows of :meth:`regions`."""
        return self._dataarray(self._store.regions(), "regions")

    def _dataarray(self, array: zarr.Array, name: str) -> Any:
        import dask.array as da
        import xarray as xr

        data = da.from_zarr(array, chunks=array.chunks)
        if self.affine is not None:
            assert self.spacing is not None
            mm = {ax: np.arange(n) * s for ax, n, s in zip(("z", "y", "x"), self.shape, self.spacing)}
            out = xr.DataArray(data, dims=("z", "y", "x"), coords=mm, name=name)
            out.attrs.update(units="mm along the volume's own axes", affine=self.affine.tolist())
            return out
        dims = ("y", "x")
        coords: dict[str, Any] = {}
        if self.georef.transform is not None and not self.georef.is_rotated:
            y, x = axis_centres(self.georef.transform, (self.shape[0], self.shape[1]))
            coords = {"y": y, "x": x}
        out = xr.DataArray(data, dims=dims, coords=coords, name=name)
        if self.georef.crs_wkt is not None:
            import rioxarray  # noqa: F401  (registers .rio)

            out = out.rio.write_crs(self.georef.crs_wkt)
            if self.georef.transform is not None:
                from affine import Affine

                out = out.rio.write_transform(Affine.from_gdal(*self.georef.transform))
        return out

    # -- regions -----------------------------------------------------------------------------

    def regions(
        self,
        cls: str | Sequence[str] | None = None,
        *,
        min_pixels: int | None = None,
        min_area: float | None = None,
        min_volume: float | None = None,
    ) -> Any:
        """The region table as a pandas DataFrame (one row per region, ``class_name`` added).

        ``min_area`` is in the store's area unit (m² for maps, mm² for medical images),
        ``min_volume`` in mm³; ``min_pixels`` counts pixels or voxels.
        """
        import pandas as pd

        table = self._store.region_table()
        names = sorted(table.array_keys())
        frame = pd.DataFrame({name: np.asarray(cast(zarr.Array, table[name])[:]) for name in names})
        order = ["id", "class"] + [n for n in names if n not in ("id", "class")]
        frame = frame[order]
        frame.insert(2, "class_name", [self.classes[c] for c in frame["class"]] if len(frame) else [])
        keep = np.ones(len(frame), dtype=bool)
        if cls is not None:
            wanted = [cls] if isinstance(cls, str) else list(cls)
            keep &= frame["class"].isin([self.class_id(c) for c in wanted]).to_numpy()
        size = "voxels" if "voxels" in frame else "pixels"
        if min_pixels is not None:
            keep &= (frame[size] >= min_pixels).to_numpy()
        if min_area is not None:
            column = next((c for c in ("area_m2", "area_mm2") if c in frame), None)
            if column is None:
                raise QueryError(f"{self.path}: regions have no area (no CRS or pixel spacing); use --min-pixels")
            keep &= (frame[column] >= min_area).to_numpy()
        if min_volume is not None:
            if "volume_mm3" not in frame:
                raise QueryError(f"{self.path}: not a volume; use --min-area or --min-pixels")
            keep &= (frame["volume_mm3"] >= min_volume).to_numpy()
        return frame[keep].reset_index(drop=True)

    # -- queries ----------------------------------------------------------------------------

    def default_crs(self) -> str:
        if self.affine is not None:
            return PATIENT
        return "store" if self.georef.crs_wkt is not None else PIXEL

    def area(self, bbox: Sequence[float], crs: str | None = None) -> dict[str, Any]:
        """Class counts and areas (volumes) of the pixels whose centres lie in ``bbox``.

        2-D: ``(minx, miny, maxx, maxy)`` in ``crs`` (default the store's; any CRS pyproj knows,
        or ``pixel`` for column/row coordinates). Volumes: ``(xmin, ymin, zmin, xmax, ymax, zmax)``
        in patient mm (``crs="patient"``, the default) or in voxel indices (``crs="pixel"``).
        """
        crs = crs or self.default_crs()
        bbox = tuple(float(v) for v in bbox)
        ndim = len(self.shape)
        if len(bbox) != 2 * ndim:
            raise QueryError(f"--bbox: a {ndim}-D store takes {2 * ndim} numbers, got {len(bbox)}")
        check_box(bbox)
        window, selector = self._box_selection(bbox, crs)
        result = self._reduce(window, selector)
        result["query"] = {"bbox": list(bbox), "crs": crs}
        if window.size == 0:
            result["note"] = "the box does not overlap the image"
        return result

    def at(self, point: Sequence[float], crs: str | None = None) -> dict[str, Any]:
        """The class (and region) of the pixel or voxel under ``point``."""
        crs = crs or self.default_crs()
        point = tuple(float(v) for v in point)
        ndim = len(self.shape)
        if len(point) != ndim:
            raise QueryError(f"--point: a {ndim}-D store takes {ndim} numbers, got {len(point)}")
        index = self._point_index(point, crs)
        out: dict[str, Any] = {"store": str(self.path), "query": {"point": list(point), "crs": crs}}
        if index is None:
            out.update(inside=False, index=None, class_id=None, class_name=None, region=None)
            out["note"] = "the point is outside the image"
            return out
        value = int(self._store.read_mask(Box(index, tuple(i + 1 for i in index))).reshape(-1)[0])
        out.update(inside=True, index=list(index), class_id=None if value == NODATA else value)
        out["class_name"] = None if value == NODATA else self.classes[value]
        out["region"] = None
        if self._store.regions_info is not None:
            rid = int(np.asarray(self._store.regions()[index]))
            out["region"] = self._region_row(rid) if rid else None
        return out

    def zones(self, source: str | Path | dict[str, Any], crs: str | None = None) -> list[dict[str, Any]]:
        """Class areas inside each polygon of a GeoJSON file (or dict); one entry per feature."""
        if self.affine is not None:
            raise QueryError(f"{self.path}: a volume store; zones take 2-D map or image stores")
        name = str(source) if not isinstance(source, dict) else "<geojson>"
        doc = _load_geojson(source) if not isinstance(source, dict) else source
        zones, declared = parse_zones(doc, name)
        zone_crs = crs or _geojson_crs(declared)
        results = []
        for zone in zones:
            window, selector = self._zone_selection(zone, zone_crs)
            result = self._reduce(window, selector)
            result["zone"] = {"index": zone.index, "properties": zone.properties}
            results.append(result)
        return results

    # -- selections -------------------------------------------------------------------------

    def _box_selection(self, bbox: tuple[float, ...], crs: str) -> tuple[Box, Selector | None]:
        if self.affine is not None:
            return self._volume_box(bbox, crs)
        shape2 = (self.shape[0], self.shape[1])
        if crs == PIXEL:
            return centre_window(PIXEL_TRANSFORM, bbox, shape2), None
        transform = self._need_map(crs)
        target = self._crs(crs)
        if target is None or target == self.crs:
            if not self.georef.is_rotated:
                return centre_window(transform, bbox, shape2), None
            xs, ys = box_ring(bbox, 2)
            inside = _in_box(bbox)
            return index_window(transform, xs, ys, shape2), lambda b: inside(*pixel_centres(transform, b))
        from pyproj import Transformer

        to_store = Transformer.from_crs(target, self.crs, always_xy=True)
        to_query = Transformer.from_crs(self.crs, target, always_xy=True)
        xs, ys = to_store.transform(*box_ring(bbox))
        window = index_window(transform, np.asarray(xs), np.asarray(ys), shape2)
        inside = _in_box(bbox)

        def select(box: Box) -> np.ndarray:
            x, y = pixel_centres(transform, box)
            qx, qy = to_query.transform(x.ravel(), y.ravel())
            return inside(np.asarray(qx).reshape(x.shape), np.asarray(qy).reshape(y.shape))

        return window, select

    def _volume_box(self, bbox: tuple[float, ...], crs: str) -> tuple[Box, Selector | None]:
        assert self.affine is not None
        xmin, ymin, zmin, xmax, ymax, zmax = bbox
        if crs == PIXEL:  # x = column, y = row, z = slice; voxel k spans [k, k + 1)
            window = centre_window(PIXEL_TRANSFORM, (xmin, ymin, xmax, ymax), (self.shape[1], self.shape[2]))
            z0 = max(0, int(np.ceil(zmin - 0.5 - 1e-9)))
            z1 = min(self.shape[0], int(np.floor(zmax - 0.5 + 1e-9)) + 1)
            return Box((z0, *window.start), (max(z0, z1), *window.stop)), None
        if crs != PATIENT:
            raise QueryError(f"--crs {crs}: a volume store takes 'patient' (mm) or 'pixel' (voxel indices)")
        corners = np.array([[x, y, z] for x in (xmin, xmax) for y in (ymin, ymax) for z in (zmin, zmax)])
        inverse = np.linalg.inv(self.affine)
        index = corners @ inverse[:3, :3].T + inverse[:3, 3]
        window = bounding_window([index[:, a] for a in range(3)], self.shape)
        lo, hi = np.array([xmin, ymin, zmin]), np.array([xmax, ymax, zmax])
        affine = self.affine

        def select(box: Box) -> np.ndarray:
            centres = voxel_centres(affine, box)
            return np.all((centres >= lo - 1e-9) & (centres <= hi + 1e-9), axis=-1)

        return window, select

    def _zone_selection(self, zone: Zone, crs: str) -> tuple[Box, Selector]:
        from rasterio.features import geometry_mask

        shape2 = (self.shape[0], self.shape[1])
        transform = PIXEL_TRANSFORM if crs == PIXEL else self._need_map(crs)
        target = None if crs == PIXEL else self._crs(crs)
        convert: Callable[[np.ndarray], np.ndarray] = lambda ring: ring  # noqa: E731
        if target is not None and target != self.crs:
            from pyproj import Transformer

            to_store = Transformer.from_crs(target, self.crs, always_xy=True)

            def convert(ring: np.ndarray) -> np.ndarray:
                dense = densify(ring)
                x, y = to_store.transform(dense[:, 0], dense[:, 1])
                return np.stack([np.asarray(x), np.asarray(y)], axis=1)

        polygons = (
            [zone.geometry["coordinates"]] if zone.geometry["type"] == "Polygon" else zone.geometry["coordinates"]
        )
        rings = [[convert(np.asarray(r, dtype=np.float64)[:, :2]) for r in polygon] for polygon in polygons]
        if any(not np.isfinite(r).all() for polygon in rings for r in polygon):
            raise QueryError(f"zone {zone.index}: cannot be placed in the store's CRS (outside its area of use)")
        geometry = {"type": "MultiPolygon", "coordinates": [[r.tolist() for r in polygon] for polygon in rings]}
        points = np.vstack([r for polygon in rings for r in polygon])
        window = index_window(transform, points[:, 0], points[:, 1], shape2)
        from affine import Affine

        base = Affine.from_gdal(*transform)

        def select(box: Box) -> np.ndarray:
            at = base * Affine.translation(box.start[1], box.start[0])
            return geometry_mask([geometry], out_shape=box.shape, transform=at, invert=True)

        return window, select

    def _point_index(self, point: tuple[float, ...], crs: str) -> tuple[int, ...] | None:
        if self.affine is not None:
            if crs == PIXEL:
                index = tuple(int(np.floor(v)) for v in (point[2], point[1], point[0]))
            elif crs == PATIENT:
                inverse = np.linalg.inv(self.affine)
                frac = inverse[:3, :3] @ np.asarray(point) + inverse[:3, 3]
                index = tuple(int(np.floor(v + 0.5)) for v in frac)
            else:
                raise QueryError(f"--crs {crs}: a volume store takes 'patient' (mm) or 'pixel' (voxel indices)")
        else:
            x, y = point
            transform = PIXEL_TRANSFORM
            if crs != PIXEL:
                transform = self._need_map(crs)
                target = self._crs(crs)
                if target is not None and target != self.crs:
                    from pyproj import Transformer

                    x, y = Transformer.from_crs(target, self.crs, always_xy=True).transform(x, y)
            row, col = to_index(transform, x, y)
            if not (np.isfinite(col) and np.isfinite(row)):
                return None
            index = (int(np.floor(row)), int(np.floor(col)))
        if any(i < 0 or i >= n for i, n in zip(index, self.shape)):
            return None
        return index

    def _need_map(self, crs: str) -> GeoTransform:
        if self.georef.transform is None or self.georef.crs_wkt is None:
            raise QueryError(f"{self.path}: the store has no CRS; give coordinates with --crs pixel")
        return self.georef.transform

    def _crs(self, text: str) -> Any:
        """A pyproj CRS for ``text``; None means the store's own."""
        if text == "store":
            return None
        from pyproj import CRS
        from pyproj.exceptions import CRSError

        try:
            return CRS.from_user_input(text)
        except CRSError as exc:
            raise QueryError(f"--crs {text!r}: not a CRS that PROJ knows ({one_line(exc, 160)})") from exc

    # -- reductions -------------------------------------------------------------------------

    def _reduce(self, window: Box, selector: Selector | None) -> dict[str, Any]:
        import dask
        from rasterio.errors import NotGeoreferencedWarning

        store = self._store
        grid = TileGrid.chunked(self.shape, tuple(store.mask.chunks))
        blocks = [b for b in _chunks_in(grid, window)]
        n = len(self.classes)
        pixel_measure = store.pixel_measure()

        def one(box: Box) -> ChunkStats:
            labels = store.read_mask(box)
            if selector is not None:
                selected = selector(box)
                if selected is not None:
                    labels = np.where(selected, labels, NODATA).astype(np.uint8)
            rows = pixel_measure[box.start[0] : box.stop[0]] if isinstance(pixel_measure, np.ndarray) else pixel_measure
            return count_classes(labels, n, rows)

        with warnings.catch_warnings():  # here, not in the threads: the filters are process-wide
            # rasterize's scratch raster says it has no geotransform; the zone's transform is passed explicitly
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            parts = dask.compute(*[dask.delayed(one)(b) for b in blocks], scheduler="threads") if blocks else ()
        total = merge(parts, n)
        return {
            "store": str(self.path),
            "status": self.status,
            "window": {"start": list(window.start), "stop": list(window.stop)},
            "chunks_read": len(blocks),
            "measure": self.measure_unit,
            "pixels": int(total.pixels.sum()),
            "classes": class_table(total, self.classes, self.measure_unit),
        }

    def _region_row(self, rid: int) -> dict[str, Any]:
        table = self._store.region_table()
        row = {
            name: np.asarray(cast(zarr.Array, table[name])[rid - 1 : rid])[0].item()
            for name in sorted(table.array_keys())
        }
        row["class_name"] = self.classes[int(row["class"])]
        return row


def _chunks_in(grid: TileGrid, window: Box) -> list[Box]:
    """The parts of ``window`` in each store chunk it touches (no reads)."""
    if window.size == 0:
        return []
    first = [a // c for a, c in zip(window.start, grid.chunk)]
    last = [(b - 1) // c for b, c in zip(window.stop, grid.chunk)]
    out = []
    for index in np.ndindex(*[b - a + 1 for a, b in zip(first, last)]):
        chunk = grid.chunk_box(tuple(i + f for i, f in zip(index, first)))
        part = chunk.intersect(window)
        if part.size:
            out.append(part)
    return out


def _in_box(bbox: Sequence[float]) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    minx, miny, maxx, maxy = bbox

    def inside(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return (x >= minx) & (x <= maxx) & (y >= miny) & (y <= maxy)

    return inside


def _load_geojson(path: str | Path) -> Any:
    try:
        text = Path(path).read_text()
    except FileNotFoundError as exc:
        raise QueryError(f"{path}: no such file") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise QueryError(f"{path}: cannot read ({exc})") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise QueryError(f"{path}: not valid GeoJSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc


def _geojson_crs(declared: str | None) -> str:
    """RFC 7946 GeoJSON is WGS84 longitude/latitude; older files may name another CRS."""
    if declared is None or declared in ("urn:ogc:def:crs:OGC:1.3:CRS84", "urn:ogc:def:crs:OGC::CRS84"):
        return "OGC:CRS84"
    return declared


def incomplete_warnings(view: StoreView) -> list[str]:
    """Warnings for a store that is not complete (unwritten chunks read as nodata)."""
    return [] if view.status == COMPLETE else [f"{view.path} is {view.status}: unwritten chunks read as nodata"]


__all__ = ["StoreView", "open_store"]
