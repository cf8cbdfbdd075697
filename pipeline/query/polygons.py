"""Region polygons out of a store: GeoParquet 1.1, FlatGeobuf, GeoPackage, GeoJSON.

One feature per region of the store's ``regions`` array (exact global ids across chunks, see
``pipeline.jobs.regions``), with the region table's columns as attributes plus ``class_name`` and
``perimeter``. The geometry is the exact pixel-edge outline with its holes, so a feature's area is
its pixels times the pixel area on projected grids. Chunk by chunk: one task per chunk traces its
pieces (``workers.polygon_tasks``); regions inside a chunk are written as they come, and the pieces
of regions that cross a chunk cut are merged here (integer vertices: an exact union, no seam line).
Memory is a chunk's features plus the pieces of the crossing regions.

Every format is written through one GeoParquet file built beside the output and renamed into place
(or streamed from it into GDAL's writer for the other formats), so nothing half written is ever at
the output path.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import RuntimeConfig
from pipeline.core.geometry import TileGrid
from pipeline.core.georef import crs_name
from pipeline.core.transform import to_map
from pipeline.errors import QueryError, StoreError
from pipeline.store import COMPLETE, MaskStore
from pipeline.store.location import StorePath, relative

FORMATS = {".parquet": "GeoParquet", ".fgb": "FlatGeobuf", ".gpkg": "GPKG", ".geojson": "GeoJSON"}
BATCH = 20_000  # features per written batch


def export_polygons(
    store: MaskStore,
    out: Path,
    *,
    classes: list[str] | None = None,
    min_area: float | None = None,
    simplify: float | None = None,
    connectivity: int | None = None,
    address: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write ``store``'s region polygons to ``out`` (format from its suffix); returns a summary."""
    suffix = out.suffix.lower()
    if suffix not in FORMATS:
        raise QueryError(
            f"{out}: unknown export format {suffix or '(no suffix)'}; use .tif, {', '.join(FORMATS)} or .nii.gz"
        )
    info = store.info
    if store.mask.ndim != 2:
        raise QueryError(f"{store.path}: a volume store; polygons are for 2-D stores")
    if info.status != COMPLETE:
        raise StoreError(f"{store.path}: the store is {info.status}; finish the job before exporting polygons")
    regions = info.regions
    if regions is None:
        raise StoreError(f"{store.path}: no regions labelled; run `raymask regions {store.path} --compute` first")
    if connectivity is not None and connectivity != regions.connectivity:
        raise QueryError(
            f"{store.path}: the regions are {regions.connectivity}-connected; relabel them with "
            f"`raymask regions {store.path} --compute --connectivity {connectivity}` to export {connectivity}-connected"
        )
    names = info.class_names
    wanted = None
    if classes:
        unknown = [c for c in classes if c not in names]
        if unknown:
            raise QueryError(f"{store.path}: no class {unknown[0]!r}; classes: {', '.join(names)}")
        wanted = tuple(names.index(c) for c in classes)
    table = store.region_table()
    area_column = next((c for c in ("area_m2", "area_mm2") if c in table), None)
    if min_area is not None and area_column is None:
        raise QueryError(f"{store.path}: regions have no area (no CRS or pixel spacing)")
    scratch = out.with_name(f".{out.name}.polygons-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    (scratch / "chunks").mkdir(parents=True)
    try:
        n_chunks = _trace(store, scratch / "chunks", regions.count - regions.crossing + 1, wanted, address, progress)
        staging = scratch / "features.parquet"
        features = _write_parquet(
            store, scratch / "chunks", n_chunks, staging, wanted=wanted, min_area=min_area, area_column=area_column,
            simplify=simplify,
        )  # fmt: skip
        if suffix == ".parquet":
            os.replace(staging, out)
        else:
            written = scratch / f"features{suffix}"
            _convert(staging, written, FORMATS[suffix], store)
            os.replace(written, out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {
        "path": str(out),
        "format": FORMATS[suffix],
        "features": features,
        "crs": "EPSG:4326" if suffix == ".geojson" and info.crs else crs_name(info.crs),
        "connectivity": regions.connectivity,
        "simplified": simplify,
    }


def _trace(
    store: MaskStore, folder: Path, first_crossing: int, wanted: tuple[int, ...] | None, address: str | None,
    progress: bool,
) -> int:  # fmt: skip
    """One task per chunk of the regions array; returns the number of chunks."""
    from pipeline.jobs.cluster import ray_session, unwrap
    from pipeline.jobs.regions import _bar
    from pipeline.jobs.run import choose_engine, executor_for
    from workers.polygon_tasks import PolygonTask, polygon_task

    array = store.regions()
    shape = tuple(int(n) for n in array.shape)
    grid = TileGrid.chunked(shape, tuple(int(n) for n in array.chunks))
    boxes = [grid.chunk_box(i) for i in np.ndindex(*grid.grid_shape)]
    regions_path = str(store.path / store.info.arrays.regions) if store.info.arrays.regions else ""
    mask_path = str(store.path / store.mask_path)
    tasks = [
        PolygonTask(regions_path, mask_path, str(folder), i, box, first_crossing, wanted) for i, box in enumerate(boxes)
    ]
    runtime = RuntimeConfig(address=address)
    engine = choose_engine(runtime, len(tasks))
    try:
        with ray_session(address, enabled=engine == "ray"):
            for _ in _bar(executor_for(engine, runtime).map(polygon_task, tasks), len(tasks), "polygons", progress):
                pass
    except Exception as exc:
        raise unwrap(exc) from exc
    return len(tasks)


def _write_parquet(
    store: MaskStore, folder: Path, n_chunks: int, path: Path, *, wanted: tuple[int, ...] | None,
    min_area: float | None, area_column: str | None, simplify: float | None,
) -> int:  # fmt: skip
    """Stream the features into one GeoParquet 1.1 file, chunk order, then the crossing regions."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import shapely

    table = store.region_table()
    columns = sorted(table.array_keys())
    info = store.info
    writer: pq.ParquetWriter | None = None
    crossing: dict[int, list[bytes]] = {}
    count = 0

    def rows(ids: np.ndarray) -> dict[str, np.ndarray]:
        """The table's columns for ``ids`` (read as one slice: a chunk's interior ids are consecutive)."""
        lo, hi = int(ids.min()) - 1, int(ids.max())
        return {c: np.asarray(table[c][lo:hi])[ids - 1 - lo] for c in columns}  # type: ignore[index]

    def emit(ids: np.ndarray, geometries: np.ndarray) -> None:
        nonlocal writer, count
        if not len(ids):
            return
        attrs = rows(ids)
        keep = np.ones(len(ids), dtype=bool)
        if min_area is not None and area_column is not None:
            keep &= attrs[area_column] >= min_area
        if not keep.any():
            return
        geometries = _to_map(geometries[keep], info.transform)
        if simplify:
            geometries = shapely.simplify(geometries, simplify, preserve_topology=True)
        data: dict[str, Any] = {"id": attrs["id"][keep], "class": attrs["class"][keep]}
        data["class_name"] = [info.class_names[c] for c in attrs["class"][keep]]
        data.update({c: attrs[c][keep] for c in columns if c not in ("id", "class")})
        data["perimeter"] = shapely.length(geometries)
        data["geometry"] = pa.array(shapely.to_wkb(geometries), type=pa.binary())
        batch = pa.table(data)
        if writer is None:
            writer = pq.ParquetWriter(path, batch.schema.with_metadata(_geo_metadata(info.crs)))
        writer.write_table(batch.replace_schema_metadata(writer.schema.metadata))
        count += batch.num_rows

    pending: list[tuple[np.ndarray, np.ndarray]] = []
    for chunk in range(n_chunks):
        part = pq.read_table(folder / f"{chunk}.parquet")
        ids = part["id"].to_numpy()
        inside = ~part["crossing"].to_numpy()
        wkb = np.asarray(part["geometry"].to_pylist(), dtype=object)
        for i, blob in zip(ids[~inside], wkb[~inside]):
            crossing.setdefault(int(i), []).append(blob)
        pending.append((ids[inside], shapely.from_wkb(wkb[inside])))
        if sum(len(p[0]) for p in pending) >= BATCH:
            emit(*_concat(pending))
            pending.clear()
    emit(*_concat(pending))
    order = sorted(crossing)
    for start in range(0, len(order), BATCH):
        ids = np.asarray(order[start : start + BATCH], dtype=np.int64)
        merged = np.asarray([shapely.union_all(shapely.from_wkb(crossing.pop(int(i)))) for i in ids], dtype=object)
        emit(ids, merged)
    if writer is None:  # no feature at all: an empty file with the same columns
        empty = {"id": pa.array([], pa.int64()), "class": pa.array([], pa.int64()),
                 "class_name": pa.array([], pa.string()), "perimeter": pa.array([], pa.float64()),
                 "geometry": pa.array([], pa.binary())}  # fmt: skip
        schema = pa.schema(pa.table(empty).schema).with_metadata(_geo_metadata(info.crs))
        writer = pq.ParquetWriter(path, schema)
    writer.close()
    return count


def _concat(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    if not parts:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=object)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _to_map(geometries: np.ndarray, transform: list[float] | None) -> np.ndarray:
    """Pixel-edge geometries (x = column, y = row) in the store's CRS (unchanged without a transform)."""
    import shapely

    if transform is None:
        return geometries
    gt = tuple(transform)

    def move(coords: np.ndarray) -> np.ndarray:
        x, y = to_map(gt, coords[:, 1], coords[:, 0])  # type: ignore[arg-type]
        return np.column_stack([x, y])

    return np.asarray(shapely.transform(geometries, move), dtype=object)


def _geo_metadata(crs_wkt: str | None) -> dict[bytes, bytes]:
    """GeoParquet 1.1 file metadata: one WKB geometry column, its types and its CRS as PROJJSON."""
    column: dict[str, Any] = {"encoding": "WKB", "geometry_types": ["Polygon", "MultiPolygon"]}
    if crs_wkt:
        from pyproj import CRS

        column["crs"] = CRS.from_wkt(crs_wkt).to_json_dict()
    else:
        column["crs"] = None
    geo = {"version": "1.1.0", "primary_column": "geometry", "columns": {"geometry": column}}
    return {b"geo": json.dumps(geo).encode()}


def _convert(staging: Path, out: Path, driver: str, store: MaskStore) -> None:
    """Stream the GeoParquet features into GDAL's writer (pyogrio): FlatGeobuf, GeoPackage, GeoJSON
    (reprojected to WGS84 lon/lat, as RFC 7946 says, when the store has a CRS)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import pyogrio

    crs = store.info.crs
    target = "EPSG:4326" if driver == "GeoJSON" and crs else crs
    parquet = pq.ParquetFile(staging)
    schema = parquet.schema_arrow.remove_metadata()
    geometry = schema.get_field_index("geometry")
    schema = schema.set(
        geometry, pa.field("geometry", pa.binary(), metadata={b"ARROW:extension:name": b"geoarrow.wkb"})
    )

    def batches() -> Iterator[pa.RecordBatch]:
        for batch in parquet.iter_batches(batch_size=BATCH):
            if driver == "GeoJSON" and crs:
                batch = batch.set_column(geometry, "geometry", _reproject(batch.column(geometry), crs))
            yield pa.RecordBatch.from_arrays(batch.columns, schema=schema)

    reader = pa.RecordBatchReader.from_batches(schema, batches())
    layer = store.path.name.removesuffix(".zarr") or "regions"
    pyogrio.write_arrow(reader, out, driver=driver, layer=layer, geometry_name="geometry",
                        geometry_type="Unknown", crs=target)  # fmt: skip


def _reproject(wkb: Any, crs_wkt: str) -> Any:
    import pyarrow as pa
    import shapely
    from pyproj import CRS, Transformer

    to_lonlat = Transformer.from_crs(CRS.from_wkt(crs_wkt), CRS.from_epsg(4326), always_xy=True)
    geometries = shapely.from_wkb(np.asarray(wkb.to_pylist(), dtype=object))
    moved = shapely.transform(geometries, lambda c: np.column_stack(to_lonlat.transform(c[:, 0], c[:, 1])))
    return pa.array(shapely.to_wkb(moved), type=pa.binary())


def merge_polygons(
    root: StorePath, stores: list[StorePath], out: Path, *, address: str | None = None, progress: bool = True
) -> dict[str, Any]:
    """Every store's region polygons in one GeoParquet file, a ``store`` column naming the source (its
    path under ``root``). Volumes, incomplete stores and stores without regions are left out and named
    in ``skipped``. Stores on one CRS keep it; on several, every geometry is reprojected to lon/lat
    (OGC:CRS84, vertices only). Columns are the union of the stores' (null where a store has none).
    Streamed: one store's features at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pyproj import CRS

    scratch = out.with_name(f".{out.name}.merge-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    parts: list[tuple[str, Path, str | None]] = []
    skipped: dict[str, str] = {}
    try:
        for path in stores:
            name = relative(path, root)
            store = MaskStore.open(path)
            info = store.info
            reason = (
                "a volume" if info.volume is not None
                else f"the store is {info.status}" if info.status != COMPLETE
                else "no regions labelled" if info.regions is None
                else None
            )  # fmt: skip
            if reason:
                skipped[name] = reason
                continue
            part = scratch / f"{len(parts)}.parquet"
            export_polygons(store, part, address=address, progress=progress)
            parts.append((name, part, info.crs))
        if not parts:
            raise QueryError(f"{root}: no store there has region polygons ({len(stores)} stores looked at)")
        crs_list = [CRS.from_wkt(c) if c else None for _, _, c in parts]
        same = all(c == crs_list[0] for c in crs_list) if crs_list else True
        target = crs_list[0] if same and crs_list else CRS.from_string("OGC:CRS84")
        if not same and any(c is None for c in crs_list):
            raise QueryError(f"{root}: some stores have no CRS and others do; their polygons cannot share a file")
        schemas = [pq.read_schema(p).remove_metadata() for _, p, _ in parts]
        schema = pa.unify_schemas([pa.schema([("store", pa.string())]), *schemas], promote_options="permissive")
        wkt = target.to_wkt() if target is not None else None
        staging = scratch / "merged.parquet"
        count = 0
        with pq.ParquetWriter(staging, schema.with_metadata(_geo_metadata(wkt))) as writer:
            for (name, part, crs), _ in zip(parts, schemas, strict=True):
                for batch in pq.ParquetFile(part).iter_batches(batch_size=BATCH):
                    if not same and crs:
                        index = batch.schema.get_field_index("geometry")
                        batch = batch.set_column(index, "geometry", _reproject(batch.column(index), crs))
                    columns = {f: batch.column(f) for f in batch.schema.names}
                    columns["store"] = pa.array([name] * batch.num_rows, pa.string())
                    arrays = [
                        columns[f.name].cast(f.type) if f.name in columns else pa.nulls(batch.num_rows, f.type)
                        for f in schema
                    ]
                    writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=writer.schema))
                    count += batch.num_rows
        os.replace(staging, out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {
        "path": str(out),
        "format": "GeoParquet",
        "features": count,
        "stores": [name for name, _, _ in parts],
        "skipped": skipped,
        "crs": crs_name(wkt) if wkt else None,
        "reprojected": not same,
    }


def polygon_suffix(out: str | Path) -> bool:
    """Whether ``out`` names a polygon format (the other exports: .tif)."""
    return Path(out).suffix.lower() in FORMATS
