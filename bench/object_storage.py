"""A job writing its store to an S3-compatible server beside the same job writing to a local folder,
in one run: wall time, the ratio, and the requests per chunk the store cost (issue 14).

    .venv/bin/python bench/object_storage.py                 # 2048² scene; writes bench/RESULTS.md
    .venv/bin/python bench/object_storage.py --size 1024 --no-write

The server is moto's standalone S3 server on 127.0.0.1 (started and stopped here); its request log
gives the request counts. The input is bench/scenes.py's 4-band mosaic, read from local disk in both
runs so only the store's path differs. Two models: NDVI (fast: the store's I/O dominates) and a
MONAI U-Net as TorchScript (slow: the model dominates). Regions and levels are on, as by default.
Each run is its own `raymask run` process (bench/peers.py ``measure``: wall time, PSS of its tree).
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from blend import build_model  # noqa: E402
from peers import _memory_gb, _versions, measure, write_section  # noqa: E402
from scenes import mosaic  # noqa: E402

CHUNK = 512
REQUEST = re.compile(r'"(GET|PUT|POST|HEAD|DELETE) /([^ ?]*)[^"]*" (\d{3})')


def start_server(log: Path) -> tuple[subprocess.Popen, dict[str, str]]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = log.open("w")
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    for _ in range(150):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    env = {
        "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1",
        "AWS_S3_ENDPOINT": f"127.0.0.1:{port}", "AWS_HTTPS": "NO", "AWS_VIRTUAL_HOSTING": "FALSE",
    }  # fmt: skip
    import boto3

    boto3.client(
        "s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
        aws_access_key_id="bench", aws_secret_access_key="bench",
    ).create_bucket(Bucket="bench")  # fmt: skip
    return proc, env


def requests(log: Path, since: int) -> tuple[collections.Counter, int]:
    """Requests to the bucket in the log after byte ``since``, by method; and the log's length."""
    text = log.read_text(errors="replace")
    counts: collections.Counter = collections.Counter()
    for method, path, _ in REQUEST.findall(text[since:]):
        if path.startswith("bench"):
            counts[method] += 1
    return counts, len(text)


def same_mask(local: Path, url: str, env: dict[str, str]) -> str:
    """Whether every mask chunk object equals the local store's file of the same name."""
    import hashlib

    os.environ.update(env)
    from pipeline.store.location import ObjectPath, get_object, list_keys

    keys = [k for k in list_keys(ObjectPath(url)) if k.startswith("mask/c/")]
    files = sorted(str(p.relative_to(local)) for p in (local / "mask" / "c").rglob("*") if p.is_file())
    if sorted(keys) != files:
        return "chunk sets differ"
    for key in keys:
        remote = get_object(ObjectPath(url) / key) or b""
        if hashlib.sha256(remote).digest() != hashlib.sha256((local / key).read_bytes()).digest():
            return f"{key} differs"
    return f"identical ({len(keys)} chunks)"


def run(work: Path, scene: Path, model: str, out: str, env: dict[str, str] | None, *, tasks: bool = False) -> dict:
    """``tasks``: region labelling as Ray tasks (``small_job_units: 0``), its scratch then in the bucket
    as on several nodes; otherwise this store's 16 chunks are labelled in the driver's process."""
    config = work / "job.yaml"
    config.write_text(
        f"source: {{path: '{scene}'}}\n"
        f"model: {model}\n"
        f"tiling: {{chunk: {CHUNK}}}\n"
        f"output: {{path: '{out}', preview: false}}\n"
        f"runtime: {{engine: ray{', small_job_units: 0' if tasks else ''}}}\n"
    )
    argv = [str(Path(sys.executable).with_name("raymask")), "run", str(config), "--json", "--overwrite"]
    measured = measure(argv, env=env)
    return {"wall_s": measured.wall_s, "peak_mb": measured.peak_mb, "summary": measured.output}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="raymask-bench-s3-"))
    scene = mosaic(work / f"scene-{args.size}.tif", args.size)
    unet = work / "unet.pt"
    build_model(unet, "slow")
    models = {
        "NDVI (fast)": "{kind: ndvi, red: 1, nir: 4}",
        "U-Net, TorchScript (slow)": f"{{kind: torchscript, path: '{unet}', classes: [a, b, c], stride: 8, "
        "receptive_radius: 40}",
    }
    log = work / "moto.log"
    server, env = start_server(log)
    chunks = (-(-args.size // CHUNK)) ** 2
    rows = []
    try:
        for name, model in models.items():
            local = run(work, scene, model, str(work / "local.zarr"), None)
            for how, tasks in (
                ("labelled in the driver", False),
                ("labelled by Ray tasks, scratch in the bucket", True),
            ):
                _, mark = requests(log, 0)
                remote = run(work, scene, model, "s3://bench/runs/scene.zarr", env, tasks=tasks)
                counts, _ = requests(log, mark)
                same = same_mask(work / "local.zarr", "s3://bench/runs/scene.zarr", env)
                total = sum(counts.values())
                shown = ", ".join(f"{m} {n}" for m, n in sorted(counts.items()))
                rows.append(
                    f"| {name} | {how} | {local['wall_s']:.1f} | {remote['wall_s']:.1f} | "
                    f"{remote['wall_s'] / local['wall_s']:.2f} | {total / chunks:.1f} ({shown}) | "
                    f"{local['peak_mb'] / 1024:.2f} / {remote['peak_mb'] / 1024:.2f} GB | {same} |"
                )
                print(rows[-1], flush=True)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=10)
    lines = [
        f"machine: {platform.machine()}, {os.cpu_count()} cores, {_memory_gb():.0f} GB; {_versions()}",
        "",
        f"{args.size}² 4-band scene (local GeoTIFF), {CHUNK} px chunks ({chunks} mask chunks), regions and levels "
        "on, engine ray; the S3 store on moto's server on 127.0.0.1 (no network latency: the ratio is the "
        "object store's per-request cost, a floor for a real bucket).",
        "",
        "| model | regions on S3 | local folder s | S3 (moto) s | S3 / local | requests per mask chunk (whole job) "
        "| peak memory local / S3 | mask |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Requests: one PUT per chunk of mask data; the rest are the per-unit statistics arrays, levels, the "
        "region table's column chunks and `zarr.json` rewrites (each consolidation of the metadata after an "
        "update rewrites the root). Labelling by Ray tasks (the path a job takes on several nodes, where no "
        "node's disk is shared) keeps its scratch arrays and per-chunk files in the bucket and copies the "
        "result in server-side: that is the extra cost in the second row of each model.",
    ]
    if not args.no_write:
        write_section(
            "object-storage", "A store on S3 beside a local store (bench/object_storage.py)",
            "`.venv/bin/python bench/object_storage.py`", lines,
        )  # fmt: skip
    print("\n".join(lines))


if __name__ == "__main__":
    main()
