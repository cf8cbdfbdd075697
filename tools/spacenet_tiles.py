"""Cut the bundled SpaceNet 4 Atlanta tile into four quadrant files with their building labels.

    .venv/bin/python tools/spacenet_tiles.py

`raymask train` splits training and validation by file, never by patch of one image; the bundle has one
900 x 900 WorldView-2 tile, so it is cut into four 450 x 450 GeoTIFFs (spatially disjoint, each with its
exact georeference), and the 43 building footprints of `geotiff_labels.geojson` are burnt into a
label GeoTIFF on each quadrant's grid (rasterio.features.rasterize: 1 = building, 0 = ground; a pixel
is a building when its centre is inside a footprint). Writes data/spacenet/atlanta-{nw,ne,sw,se}.tif
and ...-buildings.tif. Deterministic.
"""

from __future__ import annotations

import json
from pathlib import Path

import rasterio
from rasterio.features import rasterize
from rasterio.windows import Window, transform

HERE = Path(__file__).resolve().parent.parent / "data" / "spacenet"


def main() -> None:
    shapes = [f["geometry"] for f in json.loads((HERE / "geotiff_labels.geojson").read_text())["features"]]
    with rasterio.open(HERE / "sample_geotiff.tif") as src:
        half_r, half_c = src.height // 2, src.width // 2
        for name, (r, c) in {"nw": (0, 0), "ne": (0, half_c), "sw": (half_r, 0), "se": (half_r, half_c)}.items():
            window = Window(c, r, half_c, half_r)  # type: ignore[call-arg]
            data = src.read(window=window)
            where = transform(window, src.transform)
            profile = {**src.profile, "height": half_r, "width": half_c, "transform": where, "tiled": False,
                       "compress": "deflate"}  # fmt: skip
            profile.pop("blockxsize", None), profile.pop("blockysize", None)
            with rasterio.open(HERE / f"atlanta-{name}.tif", "w", **profile) as dst:
                dst.write(data)
            burnt = rasterize(
                shapes, out_shape=(half_r, half_c), transform=where, fill=0, default_value=1, dtype="uint8"
            )
            labels = {**profile, "count": 1, "dtype": "uint8", "nodata": None}
            with rasterio.open(HERE / f"atlanta-{name}-buildings.tif", "w", **labels) as dst:
                dst.write(burnt[None])
            print(f"atlanta-{name}: buildings {burnt.mean():.3f} of the pixels")


if __name__ == "__main__":
    main()
