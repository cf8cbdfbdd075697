"""List every raymask store under a folder: source, status, shape, CRS or spacing, class measures."""

from __future__ import annotations

import csv
import importlib.util
import io
from pathlib import Path
from typing import Any

from pipeline.config import URL
from pipeline.core.georef import corner_bounds, crs_name
from pipeline.errors import StoreError
from pipeline.store import MaskStore
from pipeline.store.location import ObjectPath, StorePath, list_keys, relative, store_path


def find_stores(root: StorePath | str) -> list[StorePath]:
    """Stores under ``root``, a folder or an ``s3://`` prefix (new versions still being built,
    ``*.zarr.next``, are not listed; on object storage, one listing of the prefix)."""
    where = store_path(root)
    if isinstance(where, ObjectPath):
        if not where.url.startswith("s3://"):
            raise StoreError(f"{root}: a URL; the catalog lists folders and s3:// prefixes")
        found: list[StorePath] = []
        for key in sorted(list_keys(where)):
            name = key.removesuffix("/zarr.json")
            if key.endswith(".zarr/zarr.json") and not any(p.endswith(".zarr") for p in name.split("/")[:-1]):
                found.append(where / name)
        return found
    if URL.match(str(root)):
        raise StoreError(f"{root}: a URL; the catalog lists folders and s3:// prefixes")
    root = where
    if not root.is_dir():
        raise StoreError(f"{root}: not a folder")
    found = []
    for path in sorted(root.rglob("*.zarr")):
        if path.is_dir() and (path / "zarr.json").is_file() and not any(p.suffix == ".zarr" for p in path.parents):
            found.append(path)
    return found


def catalog_rows(root: StorePath | str) -> list[dict[str, Any]]:
    rows = []
    stores = find_stores(root)
    base = store_path(root)
    for path in stores:
        try:
            store = MaskStore.open(path)
        except StoreError:
            continue  # a zarr store that raymask did not write
        info = store.info
        row: dict[str, Any] = {
            "store": relative(path, base),
            "source": ";".join(info.source.paths if info.source else []),
            "status": info.status,
            "shape": "x".join(str(v) for v in info.shape),
            **dict(zip(("slices", "rows", "cols")[-len(info.shape) :], info.shape)),  # the shape, as numbers
            "crs": crs_name(info.crs),
            "epsg": _epsg(info.crs),
            "spacing_mm": "x".join(f"{v:g}" for v in info.volume.spacing_mm) if info.volume else None,
            "completed": info.completed,
        }
        _, lonlat, ring = corner_bounds(info.crs, info.transform, info.shape)
        if lonlat is not None and ring is not None:
            row.update(zip(("lon_min", "lat_min", "lon_max", "lat_max"), lonlat))
            row["footprint"] = "POLYGON ((" + ", ".join(f"{x!r} {y!r}" for x, y in [*ring, ring[0]]) + "))"
        for name, stats in (info.stats or {}).get("classes", {}).items():
            for key in ("area_ha", "volume_ml", "area_cm2"):
                if stats.get(key) is not None:
                    row[f"{name}_{key}"] = stats[key]
            row.setdefault(f"{name}_pixels", stats.get("pixels"))
        rows.append(row)
    return rows


def _epsg(wkt: str | None) -> int | None:
    if not wkt:
        return None
    from pyproj import CRS

    return CRS.from_wkt(wkt).to_epsg()


UNITS = {"ha": "ha", "ml": "mL", "cm2": "cm²"}  # how the measure columns' units are written for people


def _unit_of(column: str) -> str | None:
    if column in ("lon_min", "lat_min", "lon_max", "lat_max"):
        return "degree"
    suffix = column.rsplit("_", 1)[-1]
    return UNITS.get(suffix) if column.endswith(("_area_ha", "_volume_ml", "_area_cm2")) else None


def _with_footprints(table: Any) -> tuple[Any, bytes]:
    """``table`` with a WKB ``geometry`` column from its WKT footprints, and GeoParquet metadata."""
    import json

    import pyarrow as pa
    import shapely
    from pyproj import CRS

    wkt = table.column("footprint").to_pylist()
    geometries = [shapely.to_wkb(shapely.from_wkt(w)) if w else None for w in wkt]
    table = table.append_column("geometry", pa.array(geometries, pa.binary()))
    present = [shapely.from_wkt(w) for w in wkt if w]
    column: dict[str, Any] = {
        "encoding": "WKB",
        "geometry_types": ["Polygon"],
        "crs": CRS.from_string("OGC:CRS84").to_json_dict(),
    }
    if present:
        column["bbox"] = list(shapely.total_bounds(present))
    geo = {"version": "1.1.0", "primary_column": "geometry", "columns": {"geometry": column}}
    return table, json.dumps(geo).encode()


def to_csv(rows: list[dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_table_file(rows: list[dict[str, Any]], out: Path) -> None:
    """The catalog as .csv, or as .parquet: GeoParquet 1.1 with each store's footprint as its geometry
    (lon/lat, OGC:CRS84; null for stores without a CRS), so QGIS or geopandas map the archive, and each
    measure column's unit in its field metadata (``unit``: ha, mL, cm², degree)."""
    if out.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = list(dict.fromkeys(k for row in rows for k in row))
        table = pa.Table.from_pylist([{c: row.get(c) for c in columns} for row in rows]) if rows else pa.table({})
        fields = [f.with_metadata({"unit": _unit_of(f.name)}) if _unit_of(f.name) else f for f in table.schema]
        table = table.cast(pa.schema(fields))
        if "footprint" in table.column_names and importlib.util.find_spec("shapely") is not None:  # [export]
            table, geo = _with_footprints(table)
            table = table.replace_schema_metadata({b"geo": geo})
        pq.write_table(table, out)
    elif out.suffix == ".csv":
        out.write_text(to_csv(rows))
    else:
        raise StoreError(f"{out}: write .csv or .parquet")


def write_frame(frame: Any, out: Path) -> None:
    """A pandas DataFrame as .csv or .parquet (region tables)."""
    if out.suffix not in (".csv", ".parquet"):
        raise StoreError(f"{out}: write .csv or .parquet")
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".parquet":
        frame.to_parquet(out, index=False)
    else:
        frame.to_csv(out, index=False)


def render(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no raymask stores"
    lines = [f"{'store':<40} {'status':<11} {'shape':<14} {'crs / spacing':<28} measures"]
    for row in rows:
        where = row["crs"] or (f"{row['spacing_mm']} mm" if row["spacing_mm"] else "-")
        measures = ", ".join(
            f"{k.rsplit('_', 2)[0]} {v:,.2f} {UNITS[k.rsplit('_', 1)[1]]}"
            for k, v in row.items()
            if k.endswith(("_area_ha", "_volume_ml", "_area_cm2")) and v is not None
        )
        lines.append(f"{row['store']:<40} {row['status']:<11} {row['shape']:<14} {where:<28} {measures}")
    return "\n".join(lines)
