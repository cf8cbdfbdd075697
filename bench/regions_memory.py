"""Peak memory and time of labelling connected regions in a large mask store, at two sizes.

For each size a synthetic mask store is written chunk by chunk (never whole): 4 x 4 px blobs on a
16 px lattice (many small regions, a row of them cut by every chunk cut) and a network of lines
that spans the whole image, touches all four edges and crosses every chunk cut (one region).
Labelling then runs in a fresh process with the in-process executor (the same per-chunk steps a
Ray task runs), and that process's peak resident memory (ru_maxrss) is recorded. The region
count is checked against the known answer.

    python bench/regions_memory.py                    # 10000 and 20000 px, chunk 1024
    python bench/regions_memory.py --sizes 4000 8000  # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LATTICE, BLOB, LINE_EVERY, LINE_AT = 16, 4, 512, 8


def blob_axis(index: np.ndarray) -> np.ndarray:
    """Blob rows (or columns): 4 of every 16, straddling each multiple of 16, so every chunk cut
    (chunks are multiples of 16) cuts a row of blobs in two and the merge has work to do."""
    return ((index + BLOB // 2) % LATTICE) < BLOB


def fill(box) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Class 1 blobs, class 2 line network, class 0 elsewhere, for one chunk (global coordinates)."""
    rows = np.arange(box.start[0], box.stop[0])
    cols = np.arange(box.start[1], box.stop[1])
    out = np.where(blob_axis(rows)[:, None] & blob_axis(cols)[None, :], 1, 0).astype(np.uint8)
    out[rows % LINE_EVERY == LINE_AT, :] = 2  # lines across the whole image: they reach all four edges
    out[:, cols % LINE_EVERY == LINE_AT] = 2
    return out


def expected_blobs(size: int) -> int:
    """Runs of blob rows times runs of blob columns (lines sit between blobs, never beside them)."""
    on = blob_axis(np.arange(size))
    runs = int(on[0]) + int((on[1:] & ~on[:-1]).sum())
    return runs * runs


def build(path: Path, size: int, chunk: int) -> None:
    from pyproj import CRS

    from pipeline.core.georef import Georef
    from pipeline.store.blocks import store_from_blocks

    georef = Georef(CRS.from_epsg(32630).to_wkt(), (400000.0, 1.0, 0.0, 5800000.0, 0.0, -1.0))
    store_from_blocks(path, (size, size), (chunk, chunk), ["background", "blob", "network"], fill, georef=georef,
                      origin="bench/regions_memory.py")  # fmt: skip


def label(path: Path) -> dict[str, float]:
    from pipeline.config import RegionsConfig
    from pipeline.jobs.executors import SerialExecutor
    from pipeline.jobs.regions import label_store, resolve
    from pipeline.store import MaskStore

    store = MaskStore.open(path, mode="r+")
    spec = resolve(RegionsConfig(connectivity=4), 2, ["background", "blob", "network"])
    started = time.perf_counter()
    summary = label_store(store, spec, source=None, executor=SerialExecutor())
    seconds = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "peak_mb": peak_mb, "crossing": summary["crossing"], **summary["per_class"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10000, 20000])
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--workdir", default=None, help="where the stores go (default a temp folder)")
    parser.add_argument("--step", choices=["build", "label"], help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step == "build":
        build(Path(args.store), args.size, args.chunk)
        return
    if args.step == "label":
        print(json.dumps(label(Path(args.store))))
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="raymask-bench-"))
    rows = []
    for size in args.sizes:
        store = work / f"mask-{size}.zarr"
        shutil.rmtree(store, ignore_errors=True)
        t0 = time.perf_counter()
        me = [sys.executable, __file__, "--chunk", str(args.chunk), "--store", str(store), "--size", str(size)]
        subprocess.run([*me, "--step", "build"], check=True)
        built = time.perf_counter() - t0
        out = subprocess.run([*me, "--step", "label"], check=True, capture_output=True, text=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
        ok = result["blob"] == expected_blobs(size) and result["network"] == 1
        rows.append({"size": size, "chunk": args.chunk, "build_s": built, **result, "correct": ok})
        print(json.dumps(rows[-1]), flush=True)
        shutil.rmtree(store, ignore_errors=True)
        if not ok:
            raise SystemExit(
                f"wrong region count at {size}: {result} (expected {expected_blobs(size)} blobs, 1 network)"
            )
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    print(f"\nmachine: {machine}")
    print("| mask | chunk | regions | crossing chunk cuts | labelling time | peak memory (labelling process) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']:,} x {r['size']:,} | {r['chunk']} | {r['blob'] + r['network']:,} | {r['crossing']:,} "
              f"| {r['seconds']:.0f} s | {r['peak_mb']:.0f} MB |")  # fmt: skip


if __name__ == "__main__":
    main()
