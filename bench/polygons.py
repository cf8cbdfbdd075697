"""Region polygons out of a large store: `raymask export STORE OUT.parquet` beside a whole-array
`rasterio.features.shapes` in one process (what geoai, samgeo and Raster Vision do), in one run.

    .venv/bin/python bench/polygons.py                    # 10000 and 20000 px; writes bench/RESULTS.md
    .venv/bin/python bench/polygons.py --sizes 4000 --no-write

The masks are bench/regions_memory.py's: 4 x 4 px blobs on a 16 px lattice (1.5 M regions at
20,000², a row of them cut by every chunk cut) and one line network spanning the whole image, 1024 px
chunks, regions labelled 4-connected. Each method is its own command; wall time and the peak of its
memory (PSS summed over its process tree, Ray's processes included) are measured from outside
(bench/peers.py ``measure``). Both write GeoParquet; their feature counts and total area must agree.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from peers import _memory_gb, _versions, measure, write_section  # noqa: E402


def role_whole(store: Path, out: Path) -> dict:
    """The peers' way: the whole region array in memory, one shapes() pass, one GeoDataFrame."""
    import geopandas as gpd
    import rasterio.features
    import shapely
    import zarr
    from affine import Affine

    meta = json.loads((store / "zarr.json").read_text())["attributes"]["raymask"]
    ids = np.asarray(zarr.open_array(str(store / "regions"), mode="r")[:]).astype(np.int32)
    transform = Affine.from_gdal(*meta["transform"])
    values, geometries = [], []
    for geometry, value in rasterio.features.shapes(ids, mask=ids > 0, connectivity=4, transform=transform):
        values.append(int(value))
        geometries.append(shapely.geometry.shape(geometry))
    frame = gpd.GeoDataFrame({"id": values}, geometry=geometries, crs=meta["crs"])
    frame = frame.dissolve("id").reset_index()  # one feature per region, as the export writes
    frame.to_parquet(out)
    return {"features": len(frame), "area": float(frame.geometry.area.sum())}


def check(out: Path) -> dict:
    import pyarrow.parquet as pq
    import shapely

    table = pq.read_table(out, columns=["geometry"])
    areas = shapely.area(shapely.from_wkb(table["geometry"].to_numpy(zero_copy_only=False)))
    return {"features": table.num_rows, "area": float(areas.sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10000, 20000])
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    parser.add_argument("--role", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        print(json.dumps(role_whole(*map(Path, args.role[1:]))))
        return
    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    say(f"machine: {platform.machine()}, {os.cpu_count()} cores, {_memory_gb():.0f} GB; {_versions()}")
    say()
    say("| mask | regions | method | wall s | peak memory (PSS, all processes) | features | notes |")
    say("|---|---|---|---|---|---|---|")
    regions_bench = HERE / "regions_memory.py"
    raymask = str(Path(sys.executable).with_name("raymask"))
    with tempfile.TemporaryDirectory(prefix="raymask-polygons-") as tmp:
        work = Path(tmp)
        for size in args.sizes:
            store = work / f"mask-{size}.zarr"
            me = [sys.executable, str(regions_bench), "--chunk", str(args.chunk), "--store", str(store)]
            subprocess.run([*me, "--size", str(size), "--step", "build"], check=True)
            labelled = json.loads(
                subprocess.run([*me, "--step", "label"], check=True, capture_output=True, text=True).stdout.strip()
            )
            n = int(labelled["blob"] + labelled["network"])
            ours = measure(
                [raymask, "export", str(store), str(work / f"ours-{size}.parquet"), "--json", "--no-progress"]
            )
            theirs = measure(
                [sys.executable, __file__, "--role", "whole", str(store), str(work / f"whole-{size}.parquet")]
            )
            got, want = check(work / f"ours-{size}.parquet"), theirs.output
            agree = got["features"] == want["features"] == n and abs(got["area"] - want["area"]) < 1e-6 * want["area"]
            note = "same features and total area" if agree else f"DIFFERENT: {got} vs {want}"
            say(
                f"| {size:,}² | {n:,} ({labelled['crossing']:,} cross chunk cuts) | **raymask export** (Ray tasks, "
                f"{args.chunk} px chunks) | **{ours.wall_s:.1f}** | **{ours.peak_mb / 1024:.2f} GB** "
                f"| {got['features']:,} | {note} |"
            )
            say(
                f"| {size:,}² | {n:,} | whole-array rasterio.features.shapes + dissolve, one process "
                f"| {theirs.wall_s:.1f} | {theirs.peak_mb / 1024:.2f} GB | {want['features']:,} | |"
            )
            shutil.rmtree(store, ignore_errors=True)
            if not agree:
                raise SystemExit(note)
    if not args.no_write:
        write_section("polygons", "Region polygons beside a whole-array trace (bench/polygons.py)",
                      "`.venv/bin/python bench/polygons.py`", lines)  # fmt: skip


if __name__ == "__main__":
    main()
