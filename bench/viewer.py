"""How fast `raymask serve` answers (issue 15): map tiles of a 16384² store and slices of the bundled
CT, under 32 concurrent requests, from a server running as its own process (`raymask serve`).

The store is an NDVI job over bench/scenes.py's 16384² 4-band mosaic (levels on, as by default);
the CT store is configs/ct-tissue.yaml's. Requests are drawn at random (fixed seed) over every tile
of every zoom, and over every slice of the three axes. Reported: latency percentiles per kind, the
target being the 95th percentile under 100 ms, and requests per second.

    .venv/bin/python bench/viewer.py [--size 16384] [--requests 800] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from peers import _memory_gb, _versions, write_section  # noqa: E402
from scenes import mosaic  # noqa: E402

RAYMASK = str(Path(sys.executable).with_name("raymask"))
CONCURRENCY = 32


def run_job(config: Path, *sets: str) -> None:
    argv = [RAYMASK, "run", str(config), "--overwrite", "--no-progress", *[a for s in sets for a in ("--set", s)]]
    subprocess.run(argv, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


def start_server(folder: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([RAYMASK, "serve", str(folder), "--port", "0"], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline() if proc.stdout else ""
    match = re.search(r"http://[0-9.]+:[0-9]+", line)
    if match is None:
        proc.kill()
        raise RuntimeError(f"raymask serve printed {line!r}")
    return proc, match.group(0)


def fetch(url: str) -> float:
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=120) as response:
        response.read()
        assert response.status == 200, url
    return time.perf_counter() - started


def drive(urls: list[str]) -> tuple[np.ndarray, float]:
    started = time.perf_counter()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        seconds = np.array(list(pool.map(fetch, urls)))
    return seconds, len(urls) / (time.perf_counter() - started)


def row(name: str, seconds: np.ndarray, rate: float) -> str:
    p50, p95, p99 = (np.percentile(seconds, q) * 1000 for q in (50, 95, 99))
    return (
        f"| {name} | {len(seconds)} | {p50:.0f} | {p95:.0f} | {p99:.0f} | {seconds.max() * 1000:.0f} | {rate:.0f} | "
        f"{'yes' if p95 < 100 else 'no'} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=16384)
    parser.add_argument("--requests", type=int, default=800)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="raymask-bench-viewer-"))
    served = work / "served"
    served.mkdir()
    scene = mosaic(work / f"scene-{args.size}.tif", args.size)
    job = work / "ndvi.yaml"
    job.write_text(
        f"source: {{path: '{scene}'}}\nmodel: {{kind: ndvi, red: 1, nir: 4}}\ntiling: {{chunk: 1024}}\n"
        f"output: {{path: '{served}/scene.zarr', preview: false}}\nregions: {{enabled: false}}\n"
    )
    clock = time.perf_counter()
    run_job(job)
    job_s = time.perf_counter() - clock
    run_job(ROOT / "configs" / "ct-tissue.yaml", f"output.path={served}/ct.zarr", "output.preview=false")
    server, base = start_server(served)
    rng = random.Random(0)
    rows = []
    try:
        scene_record = json.loads(urllib.request.urlopen(f"{base}/api/stores/scene.zarr").read())
        ct = json.loads(urllib.request.urlopen(f"{base}/api/stores/ct.zarr").read())
        tiles = scene_record["tiles"]
        every = [
            (z, x, y)
            for z in range(tiles["max_zoom"] + 1)
            for x in range(-(-tiles["cols"] // (256 * 2 ** (tiles["max_zoom"] - z))))
            for y in range(-(-tiles["rows"] // (256 * 2 ** (tiles["max_zoom"] - z))))
        ]
        for layer in ("mask", "image"):
            picks = [rng.choice(every) for _ in range(args.requests)]
            urls = [f"{base}/api/stores/scene.zarr/tiles/{layer}/{z}/{x}/{y}.png" for z, x, y in picks]
            drive(urls[:CONCURRENCY])  # warm: the image's stretch is computed once, on the first request
            rows.append(row(f"{args.size}² store, {layer} tiles (random zoom 0-{tiles['max_zoom']})", *drive(urls)))
            print(rows[-1], flush=True)
            deepest = [(z, x, y) for z, x, y in every if z == tiles["max_zoom"]]
            urls = [f"{base}/api/stores/scene.zarr/tiles/{layer}/{z}/{x}/{y}.png"
                    for z, x, y in (rng.choice(deepest) for _ in range(args.requests))]  # fmt: skip
            rows.append(row(f"{args.size}² store, {layer} tiles at full resolution", *drive(urls)))
            print(rows[-1], flush=True)
        counts = dict(zip(("axial", "coronal", "sagittal"), ct["shape"]))
        for labels in (False, True):
            picks = [(a := rng.choice(list(counts)), rng.randrange(counts[a])) for _ in range(args.requests)]
            kind = "labels/" if labels else ""
            urls = [f"{base}/api/stores/ct.zarr/slices/{kind}{a}/{i}.png?window=bone" for a, i in picks]
            name = f"CT {'x'.join(map(str, ct['shape']))}, {'label' if labels else 'HU image'} slices (3 axes)"
            rows.append(row(name, *drive(urls)))
            print(rows[-1], flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
    lines = [
        f"machine: {platform.machine()}, {os.cpu_count()} cores, {_memory_gb():.0f} GB; {_versions()}",
        "",
        f"`raymask serve` as its own process; {CONCURRENCY} concurrent clients (threads) on the same machine, "
        f"{args.requests} requests per row drawn at random (seed 0). The {args.size}² store is an NDVI job over "
        f"bench/scenes.py's 4-band mosaic ({job_s:.0f} s to write, 1024-px chunks, levels on); the source "
        "GeoTIFF has no overviews, so zoomed-out image tiles decimate a full-resolution read. Latencies in ms.",
        "",
        "| requests | n | p50 | p95 | p99 | max | per second | p95 < 100 ms |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    if not args.no_write:
        write_section("viewer", "The viewer under load (bench/viewer.py)", "`.venv/bin/python bench/viewer.py`", lines)
    print("\n".join(lines))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
