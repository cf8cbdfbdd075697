"""Throughput: end-to-end tiles/s through Ray versus model-only tiles/s, same CNN and tile size.

    .venv/bin/python bench/throughput.py [--size 3072] [--chunk 512] [--halo 32] [--threads 1 2]

A scripted U-Net (channels 16-32-64, stride 8, BatchNorm in eval mode, random weights) runs on
a synthetic 3-band float32 GeoTIFF. Model-only: the forward pass alone on read-window-sized
inputs (chunk + 2 halo) with the same number of torch threads an actor gets. End-to-end:
``run_job`` on an already started local Ray (read, predict, write, statistics, finalize).
Prints a Markdown table to add to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
import torch
from affine import Affine
from torch import nn


def block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    def __init__(self, bands: int = 3, classes: int = 4) -> None:
        super().__init__()
        self.e1, self.e2, self.e3, self.mid = block(bands, 16), block(16, 32), block(32, 64), block(64, 64)
        self.pool = nn.MaxPool2d(2)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.d3, self.d2, self.d1 = block(128, 32), block(64, 16), block(32, 16)
        self.head = nn.Conv2d(16, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.e1(x)
        e2 = self.e2(self.pool(e1))
        e3 = self.e3(self.pool(e2))
        m = self.mid(self.pool(e3))
        d3 = self.d3(torch.cat([self.up(m), e3], 1))
        d2 = self.d2(torch.cat([self.up(d3), e2], 1))
        return self.head(self.d1(torch.cat([self.up(d2), e1], 1)))


def make_inputs(work: Path, size: int) -> tuple[Path, Path]:
    torch.manual_seed(0)
    model_path = work / "unet.pt"
    torch.jit.save(torch.jit.script(UNet().eval()), str(model_path))
    rng = np.random.default_rng(0)
    image = work / "scene.tif"
    profile = dict(
        driver="GTiff",
        height=size,
        width=size,
        count=3,
        dtype="float32",
        crs="EPSG:32631",
        transform=Affine(1.0, 0, 500000, 0, -1.0, 5700000),
        tiled=True,
        blockxsize=256,
        blockysize=256,
    )
    with rasterio.open(image, "w", **profile) as dst:
        for row in range(0, size, 512):
            rows = min(512, size - row)
            dst.write(rng.normal(size=(3, rows, size)).astype(np.float32), window=((row, row + rows), (0, size)))
    return image, model_path


def model_only(model_path: Path, *, chunk: int, halo: int, threads: int, tiles: int) -> float:
    torch.set_num_threads(threads)
    module = torch.jit.load(str(model_path)).eval()
    x = torch.randn(1, 3, chunk + 2 * halo, chunk + 2 * halo)
    with torch.inference_mode():
        module(x).max(1)  # warm-up
        start = time.perf_counter()
        for _ in range(tiles):
            module(x).max(1).indices.to(torch.uint8)
    return tiles / (time.perf_counter() - start)


def end_to_end(image: Path, model_path: Path, work: Path, *, chunk: int, halo: int, threads: int) -> tuple[float, int]:
    from pipeline.config import config_from_dict
    from pipeline.execute import run_job

    config = config_from_dict(
        {
            "source": {"path": str(image)},
            "model": {
                "kind": "torchscript",
                "path": str(model_path),
                "classes": ["a", "b", "c", "d"],
                "stride": 8,
                "receptive_radius": 60,
            },
            "tiling": {"chunk": chunk, "halo": halo},
            "output": {"path": str(work / f"out-{threads}.zarr"), "preview": False},
            "regions": {"enabled": False},  # tiles/s of prediction; bench/regions_memory.py times labelling
            "runtime": {"actor_cpus": 1.0, "threads": threads, "batch_size": 1},
        }
    )
    summary = run_job(config, overwrite=True, progress=False)
    return summary.units_per_s, summary.units_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=3072)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--halo", type=int, default=32)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        image, model_path = make_inputs(work, args.size)
        tiles = (-(-args.size // args.chunk)) ** 2
        print(
            f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
        )
        print(f"image {args.size}x{args.size}x3 float32, chunk {args.chunk}, halo {args.halo}, {tiles} tiles")
        print("model: U-Net 16-32-64, stride 8, TorchScript, batch 1\n")
        print("| torch threads per actor | model-only tiles/s | end-to-end tiles/s | end-to-end / model-only |")
        print("|---|---|---|---|")
        for threads in args.threads:
            alone = model_only(model_path, chunk=args.chunk, halo=args.halo, threads=threads, tiles=min(tiles, 12))
            e2e, _ = end_to_end(image, model_path, work, chunk=args.chunk, halo=args.halo, threads=threads)
            print(f"| {threads} | {alone:.2f} | {e2e:.2f} | {e2e / alone:.0%} |")
    ray.shutdown()


if __name__ == "__main__":
    main()
