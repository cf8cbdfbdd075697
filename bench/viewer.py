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
import http.client
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
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


def start_server(folder: Path, workers: int | None) -> tuple[subprocess.Popen, str]:
    more = ["--workers", str(workers)] if workers else []
    proc = subprocess.Popen([RAYMASK, "serve", str(folder), "--port", "0", *more], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline() if proc.stdout else ""
    match = re.search(r"http://[0-9.]+:[0-9]+", line)
    if match is None:
        proc.kill()
        raise RuntimeError(f"raymask serve printed {line!r}")
    return proc, match.group(0)


LOCAL = threading.local()


def fetch(url: str) -> float:
    """One request on this client thread's own kept-alive connection, as a browser reuses its few."""
    parts = urllib.parse.urlsplit(url)
    started = time.perf_counter()
    connection = getattr(LOCAL, "connection", None)
    if connection is None:
        connection = LOCAL.connection = http.client.HTTPConnection(parts.netloc, timeout=120)
    connection.request("GET", f"{parts.path}?{parts.query}" if parts.query else parts.path)
    response = connection.getresponse()
    response.read()
    assert response.status == 200, url
    return time.perf_counter() - started


def drive(urls: list[str]) -> tuple[np.ndarray, float]:
    started = time.perf_counter()
    with ThreadPoolExecutor(CONCURRENCY) as pool:  # each thread a client with its own connection
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
    parser.add_argument("--scenes", type=Path, default=Path(tempfile.gettempdir()) / "raymask-bench")
    parser.add_argument("--workers", type=int, default=None, help="raymask serve --workers (default: its own)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="raymask-bench-viewer-"))
    served = work / "served"
    served.mkdir()
    args.scenes.mkdir(parents=True, exist_ok=True)
    scene = mosaic(args.scenes / f"scene-{args.size}.tif", args.size)  # kept between runs, as bench/peers.py's
    job = work / "ndvi.yaml"
    job.write_text(
        f"source: {{path: '{scene}'}}\nmodel: {{kind: ndvi, red: 1, nir: 4}}\ntiling: {{chunk: 1024}}\n"
        f"output: {{path: '{served}/scene.zarr', preview: false}}\nregions: {{enabled: false}}\n"
    )
    clock = time.perf_counter()
    run_job(job)
    job_s = time.perf_counter() - clock
    run_job(ROOT / "configs" / "ct-tissue.yaml", f"output.path={served}/ct.zarr", "output.preview=false")
    server, base = start_server(served, args.workers)
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
        top = tiles["max_zoom"]
        wide, high = -(-tiles["cols"] // 256), -(-tiles["rows"] // 256)
        first = {}
        for layer in ("mask", "image"):
            tile_url = f"{base}/api/stores/scene.zarr/tiles/{layer}/{{}}/{{}}/{{}}.png"
            first[layer] = fetch(tile_url.format(0, 0, 0))  # the image's: builds its display pyramid
            picks = [rng.choice(every) for _ in range(args.requests)]
            urls = [tile_url.format(*p) for p in picks]
            drive(urls[:CONCURRENCY])  # warm
            rows.append(row(f"{args.size}² store, {layer} tiles (random zoom 0-{top})", *drive(urls)))
            print(rows[-1], flush=True)
            urls = []  # a browser's pattern: pan somewhere, ask for the 8 x 4 tiles of the view at once
            while len(urls) < args.requests:
                x0, y0 = rng.randrange(max(1, wide - 7)), rng.randrange(max(1, high - 3))
                urls += [tile_url.format(top, x, y) for y in range(y0, y0 + 4) for x in range(x0, x0 + 8)]
            rows.append(row(f"{args.size}² store, {layer} tiles at full resolution, 8x4 views", *drive(urls)))
            print(rows[-1], flush=True)
            urls = [tile_url.format(top, rng.randrange(wide), rng.randrange(high)) for _ in range(args.requests)]
            rows.append(row(f"{args.size}² store, {layer} tiles at full resolution, scattered", *drive(urls)))
            print(rows[-1], flush=True)
        counts = dict(zip(("axial", "coronal", "sagittal"), ct["shape"]))
        for labels in (False, True):
            picks = [(a := rng.choice(list(counts)), rng.randrange(counts[a])) for _ in range(args.requests)]
            kind = "labels/" if labels else ""
            urls = [f"{base}/api/stores/ct.zarr/slices/{kind}{a}/{i}.png?window=bone" for a, i in picks]
            drive(urls[:CONCURRENCY])  # warm
            name = f"CT {'x'.join(map(str, ct['shape']))}, {'label' if labels else 'HU image'} slices (3 axes)"
            rows.append(row(name, *drive(urls)))
            print(rows[-1], flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
    lines = [
        f"machine: {platform.machine()}, {os.cpu_count()} cores, {_memory_gb():.0f} GB; {_versions()}",
        "",
        f"`raymask serve` as its own process (its default worker processes); {CONCURRENCY} concurrent clients "
        f"(threads, each on one kept-alive connection, as a browser's) on the same 2 cores, {args.requests} requests "
        f"per row, drawn at random (seed 0) after {CONCURRENCY} warm-up requests. The {args.size}² store is an NDVI "
        f"job over bench/scenes.py's 4-band uint8 mosaic ({job_s:.0f} s to write, 1024-px chunks, levels on); the "
        "source GeoTIFF is deflate-compressed in 512² pixel-interleaved blocks with no overviews. Image tiles "
        "zoomed out come from the server's display pyramid of the source, built on the first one "
        f"({first['image']:.1f} s here; the first mask tile took {first['mask'] * 1000:.0f} ms); at full "
        "resolution each tile reads its source block (3 ms to decode one, each worker process its own). "
        "'8x4 views': the 32 tiles of a view requested together at a random place; 'scattered': each tile "
        "anywhere. Latencies in ms.",
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
