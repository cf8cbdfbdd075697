"""Export a mask store to a Cloud-Optimized GeoTIFF that GDAL and QGIS open directly.

GDAL 3.10 cannot read zarr v3, so the store's mask goes out chunk by chunk (memory stays at one
chunk) into a tiled GeoTIFF with the store's CRS, transform, nodata and class colours, which
GDAL's COG driver then copies with overviews (mode resampling: class ids must not be averaged).
With ``probabilities`` the store's per-class probabilities go out instead: one uint8 band per
class (0..254 for 0..1, scale 1/254 in the band metadata, 255 nodata), overviews averaged.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import rasterio
import rasterio.shutil
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
    chunk_rows, chunk_cols = mask.chunks
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        staging = Path(tmp) / "mask.tif"
        with rasterio.open(staging, "w", **profile) as dst:
            for row in range(0, height, chunk_rows):
                for col in range(0, width, chunk_cols):
                    box = Box((row, col), (min(row + chunk_rows, height), min(col + chunk_cols, width)))
                    window = Window(col, row, box.shape[1], box.shape[0])  # type: ignore[call-arg]
                    if probability is not None:
                        dst.write(probability[(slice(None), *box.slices())], window=window)
                    else:
                        dst.write(store.read_mask(box), 1, window=window)
            if probability is not None:
                for c in info.classes:
                    dst.set_band_description(c.id + 1, c.name)
                    dst.update_tags(c.id + 1, scale=f"{1 / PROBABILITY_SCALE!r}", meaning="class probability")
                    dst.set_band_unit(c.id + 1, "probability x 254")
                dst.scales = [1 / PROBABILITY_SCALE] * len(info.classes)
            else:
                dst.write_colormap(1, _colormap(info.classes))
                dst.update_tags(1, **{f"class_{c.id}": c.name for c in info.classes})
        rasterio.shutil.copy(
            staging, out, driver="COG", compress="deflate",
            resampling="average" if probability is not None else "mode",
            overview_resampling="average" if probability is not None else "mode",
        )  # fmt: skip
    return out


def _colormap(classes: list[ClassEntry]) -> dict[int, tuple[int, int, int, int]]:
    cmap = {c.id: (*rgb(c.color), 255) for c in classes}
    cmap[NODATA] = (0, 0, 0, 0)
    return cmap  # type: ignore[return-value]
