"""Export a mask store to a Cloud-Optimized GeoTIFF that GDAL and QGIS open directly.

GDAL 3.10 cannot read zarr v3, so the store's mask goes out chunk by chunk (memory stays at one
chunk) into a tiled GeoTIFF with the store's CRS, transform, nodata and class colours. Where the store
has its lower-resolution levels (``pipeline.store.levels``), each goes into a GeoTIFF of its own and a
VRT names them as the mask's overviews, so GDAL's COG driver copies *those* (``OVERVIEWS=
FORCE_USE_EXISTING``): the COG's overviews are the store's levels, pixel for pixel. A store without
levels gets GDAL's mode overviews (class ids must not be averaged).

Class names travel as GDAL category names and a thematic raster attribute table (value, class,
pixels, area, red, green, blue), which GDAL keeps in ``OUT.tif.aux.xml`` beside the COG (GeoTIFF has
no tag for them); ``gdalinfo`` lists them and QGIS shows them. Both files appear only once complete.

With ``probabilities`` the store's per-class probabilities go out instead: one uint8 band per
class (0..254 for 0..1, scale 1/254 in the band metadata, 255 nodata), overviews averaged.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, cast
from xml.sax.saxutils import escape

import numpy as np
import rasterio
import rasterio.shutil
import zarr
from affine import Affine
from rasterio.crs import CRS
from rasterio.windows import Window

from pipeline.core.colors import rgb
from pipeline.core.geometry import Box
from pipeline.core.stats import NODATA, PROBABILITY_SCALE
from pipeline.errors import StoreError
from pipeline.store import MaskStore
from pipeline.store.meta import ClassEntry


def export_geotiff(store: MaskStore, out: Path, *, probabilities: bool = False) -> Path:
    info = store.info
    mask = store.mask
    if mask.ndim != 2:
        raise StoreError(
            f"{store.path}: a volume store; GeoTIFF export takes 2-D masks (read labels/mask/0 as OME-Zarr)"
        )
    probability = store.probability() if probabilities else None
    if probabilities and probability is None:
        raise StoreError(f"{store.path}: the store keeps no probabilities; run the job with output.probabilities: true")
    height, width = mask.shape
    profile: dict[str, object] = {
        "driver": "GTiff",
        "height": height,
        "width": width,
        "count": len(info.classes) if probability is not None else 1,
        "dtype": "uint8",
        "nodata": NODATA,
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
        "compress": "deflate",
    }
    if probability is not None:
        profile["interleave"] = "band"
    if info.crs:
        profile["crs"] = CRS.from_wkt(info.crs)
    if info.transform:
        profile["transform"] = Affine.from_gdal(*info.transform)
    if out.exists() and out.is_dir():
        raise StoreError(f"{out}: is a directory, expected a .tif path")
    out.parent.mkdir(parents=True, exist_ok=True)
    levels = [] if probability is not None else list(info.levels or [])
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.writing-") as tmp:
        staging = Path(tmp) / "mask.tif"
        with rasterio.open(staging, "w", **profile) as dst:
            if probability is not None:
                bands = probability
                _copy_chunks(
                    bands.shape, bands.chunks, lambda box: np.asarray(bands[(slice(None), *box.slices())]), dst
                )
            else:  # read_mask: a missing or damaged chunk is one line naming it, never a hole in the export
                _copy_chunks(mask.shape, mask.chunks, lambda box: store.read_mask(box)[None], dst)
            if probability is not None:
                for c in info.classes:
                    dst.set_band_description(c.id + 1, c.name)
                    dst.update_tags(c.id + 1, scale=f"{1 / PROBABILITY_SCALE!r}", meaning="class probability")
                    dst.set_band_unit(c.id + 1, "probability x 254")
                dst.scales = [1 / PROBABILITY_SCALE] * len(info.classes)
            else:
                dst.write_colormap(1, _colormap(info.classes))
                dst.update_tags(1, **{f"class_{c.id}": c.name for c in info.classes})
        source = staging
        if probability is None:
            for level in levels:
                array = cast(zarr.Array, store.group[level["mask"]])
                rows, cols = level["shape"]
                with rasterio.open(
                    Path(tmp) / f"level{level['level']}.tif", "w",
                    **{**profile, "height": rows, "width": cols,
                       **({"transform": Affine.from_gdal(*level["transform"])} if level.get("transform") else {})},
                ) as dst:  # fmt: skip
                    _copy_chunks(array.shape, array.chunks, partial(_read_level, array), dst)
            source = Path(tmp) / "mask.vrt"
            source.write_text(_vrt(store, staging, levels, (height, width)))
        written = Path(tmp) / "out.tif"
        rasterio.shutil.copy(
            source, written, driver="COG", compress="deflate",
            resampling="average" if probability is not None else "mode",
            overview_resampling="average" if probability is not None else "mode",
            **({"overviews": "FORCE_USE_EXISTING"} if levels else {}),
        )  # fmt: skip
        aux = written.with_name(written.name + ".aux.xml")
        if aux.exists():
            os.replace(aux, out.with_name(out.name + ".aux.xml"))
        os.replace(written, out)
    return out


def _read_level(array: zarr.Array, box: Box) -> np.ndarray:
    return np.asarray(array[box.slices()])[None]


def _copy_chunks(shape: tuple[int, ...], chunks: tuple[int, ...], read: Callable[[Box], np.ndarray], dst: Any) -> None:
    """An array of ``shape`` (bands first where it has three axes) into ``dst``, one chunk of
    ``chunks`` at a time, each read by ``read`` as (bands, rows, cols)."""
    height, width = shape[-2:]
    chunk_rows, chunk_cols = chunks[-2:]
    for row in range(0, height, chunk_rows):
        for col in range(0, width, chunk_cols):
            box = Box((row, col), (min(row + chunk_rows, height), min(col + chunk_cols, width)))
            window = Window(col, row, box.shape[1], box.shape[0])  # type: ignore[call-arg]
            dst.write(read(box), window=window)


def _vrt(store: MaskStore, level0: Path, levels: list[dict[str, Any]], shape: tuple[int, int]) -> str:
    """A VRT of the mask GeoTIFF with the store's levels as its overviews, its class names as category
    names and a thematic raster attribute table, and its colours."""
    info = store.info
    counts = {name: row for name, row in ((info.stats or {}).get("classes") or {}).items()}
    unit = info.measure_unit
    source = '<SourceFilename relativeToVRT="1">{}</SourceFilename><SourceBand>1</SourceBand>'
    overviews = "".join("<Overview>" + source.format(f"level{lv['level']}.tif") + "</Overview>" for lv in levels)
    categories = "".join(f"<Category>{escape(c.name)}</Category>" for c in info.classes)
    colors = "".join('<Entry c1="{}" c2="{}" c3="{}" c4="255"/>'.format(*rgb(c.color)) for c in info.classes)
    # GDAL field types: 0 integer, 1 real, 2 string; usages: 0 generic, 1 pixel count, 2 name, 5 min-max,
    # 6/7/8 red/green/blue
    fields = [("value", 0, 5), ("class", 2, 2), ("pixels", 0, 1)]
    if unit:
        fields.append((f"area_{unit}", 1, 0))
    fields += [("red", 0, 6), ("green", 0, 7), ("blue", 0, 8)]
    defs = "".join(
        f'<FieldDefn index="{i}"><Name>{n}</Name><Type>{t}</Type><Usage>{u}</Usage></FieldDefn>'
        for i, (n, t, u) in enumerate(fields)
    )
    rows = []
    for c in info.classes:
        row = counts.get(c.name, {})
        values: list[object] = [c.id, escape(c.name), int(row.get("pixels", 0))]
        if unit:
            values.append(float(row.get(f"area_{unit}", 0.0)))
        values += list(rgb(c.color))
        rows.append(f'<Row index="{c.id}">' + "".join(f"<F>{v}</F>" for v in values) + "</Row>")
    geo = f"<GeoTransform>{', '.join(repr(float(v)) for v in info.transform)}</GeoTransform>" if info.transform else ""
    srs = f"<SRS>{escape(info.crs)}</SRS>" if info.crs else ""
    return (
        f'<VRTDataset rasterXSize="{shape[1]}" rasterYSize="{shape[0]}">{srs}{geo}'
        f'<VRTRasterBand dataType="Byte" band="1"><NoDataValue>{NODATA}</NoDataValue>'
        f"<ColorInterp>Palette</ColorInterp><CategoryNames>{categories}</CategoryNames>"
        f"<ColorTable>{colors}</ColorTable>"
        f'<GDALRasterAttributeTable tableType="thematic">{defs}{"".join(rows)}</GDALRasterAttributeTable>'
        f"<SimpleSource>{source.format(escape(level0.name))}</SimpleSource>{overviews}"
        f"</VRTRasterBand></VRTDataset>"
    )


def _colormap(classes: list[ClassEntry]) -> dict[int, tuple[int, int, int, int]]:
    cmap = {c.id: (*rgb(c.color), 255) for c in classes}
    cmap[NODATA] = (0, 0, 0, 0)
    return cmap  # type: ignore[return-value]
