"""Blended stitching beside MONAI's sliding_window_inference, in one run: same model, scene, window, overlap.

    .venv/bin/python bench/blend.py                          # writes its section of bench/RESULTS.md
    .venv/bin/python bench/blend.py --sizes 4096 --models fast --no-write     # a quick look

For networks that are not translation-equivariant raymask runs ``tiling.stitch: blend``, whose output
equals MONAI's sliding-window inference over the whole image (tests/test_blend.py). This measures
what that costs against MONAI itself doing it:

- models: MONAI ``UNet`` with InstanceNorm (its default normalisation, and nnU-Net's): *slow*, channels
  16-32-64-128, three stride-2 levels, two residual units per level (the network of bench/peers.py
  with InstanceNorm); *fast*, channels 8-16, one stride-2 level, no residual units, so that the
  pipeline's own costs show. ``x / 255`` inside the module, 3 classes, TorchScript, fixed seed.
- scenes: N x N 4-band uint8 mosaics of bundled imagery (bench/scenes.py) at 4096, 8192, 16384 px.
- window 512 x 512, overlap 0.25, gaussian weights (sigma 0.125 of the window), for both.
- model alone: the forward pass plus ``max(1)`` on 512 px windows, the best of one process with 2
  threads (batch 4) and two 1-thread processes at once; no I/O.
- MONAI: rasterio reads the whole scene, ``sliding_window_inference`` (batch 4, 2 torch threads),
  argmax, zarr. The whole command.
- raymask: ``raymask run`` with ``tiling.stitch: blend`` and its default strips, the whole command:
  with the default ``runtime.engine: auto`` (these jobs have 2-4 units, so they run in the command's
  own process with 2 torch threads, no Ray), and on a local Ray (``engine: ray``, one 1-thread actor
  per CPU).

Each method is its own command; its wall time and the peak of its memory (PSS summed over its whole
process tree, Ray's processes included) are measured from outside (bench/peers.py ``measure``).
Throughput is in 512 x 512 output tiles per second. At the first size the labels of raymask and
MONAI are compared: pixels that differ must be near-ties of MONAI's logits (top two within 2e-4).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from peers import Measured, _memory_gb, _versions, measure, write_section  # noqa: E402

WINDOW, OVERLAP, CLASSES, THREADS, TILE = 512, 0.25, 3, 2, 512
MODELS = {
    "slow": {"channels": (16, 32, 64, 128), "strides": (2, 2, 2), "num_res_units": 2},
    "fast": {"channels": (8, 16), "strides": (2,), "num_res_units": 0},
}


def build_model(path: Path, name: str) -> None:
    import torch
    from monai.networks.nets import UNet

    class Scaled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = UNet(spatial_dims=2, in_channels=4, out_channels=CLASSES, **MODELS[name])  # InstanceNorm

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x / 255.0)

    torch.manual_seed(0)
    traced = torch.jit.trace(Scaled().eval(), torch.zeros(1, 4, WINDOW, WINDOW))
    torch.jit.save(traced, str(path))


# -- the methods, each its own process (--role) ------------------------------------------------------


def role_model_only(scene: Path, model: Path, threads: Path = Path(str(THREADS))) -> dict:
    import rasterio
    import torch

    torch.set_num_threads(int(str(threads)))
    module = torch.jit.load(str(model)).eval()
    with rasterio.open(scene) as src:
        windows = [src.read(window=((r, r + WINDOW), (c, c + WINDOW))) for r in (0, 1024) for c in (0, 1024)]
    batch = 4 if int(str(threads)) > 1 else 1
    xs = torch.from_numpy(np.stack([windows[j % len(windows)] for j in range(batch)])).float()
    with torch.inference_mode():
        module(xs).max(1)  # warm-up
        reps = max(2, 24 // batch)
        start = time.perf_counter()
        for _ in range(reps):
            module(xs).max(1).indices.to(torch.uint8)
    return {"windows_per_s": reps * batch / (time.perf_counter() - start)}


def role_model_only_pair(scene: Path, model: Path) -> dict:
    argv = [sys.executable, str(Path(__file__)), "--role", "model-only", str(scene), str(model), "1"]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    rates = [json.loads(proc.communicate()[0].strip().splitlines()[-1]) for proc in procs]
    return {"windows_per_s": sum(r["windows_per_s"] for r in rates)}


def role_monai(scene: Path, model: Path, out: Path, keep: Path = Path("-")) -> dict:
    import rasterio
    import torch
    import zarr
    from monai.inferers import sliding_window_inference

    torch.set_num_threads(THREADS)
    module = torch.jit.load(str(model)).eval()
    with rasterio.open(scene) as src:
        image = torch.from_numpy(src.read()[None]).float()
    with torch.inference_mode():
        logits = sliding_window_inference(
            image, roi_size=(WINDOW, WINDOW), sw_batch_size=4, predictor=module, overlap=OVERLAP, mode="gaussian"
        )[0]
        labels = logits.max(0).indices.to(torch.uint8).numpy()
        if str(keep) != "-":  # the reference for the label comparison: labels and the top-two gap
            top = logits.topk(2, dim=0).values
            np.savez(keep, labels=labels, gap=(top[0] - top[1]).numpy())
    del logits, image
    size = labels.shape[0]
    zarr.create_array(str(out), shape=(size, size), chunks=(TILE, TILE), dtype="uint8", fill_value=255)[:] = labels
    return {}


# -- the harness ---------------------------------------------------------------------------------------


def run_role(role: str, *args: Path) -> Measured:
    return measure([sys.executable, str(Path(__file__)), "--role", role, *map(str, args)])


def raymask(work: Path, scene: Path, model: Path, name: str, engine: str) -> Measured:
    config = work / f"{name}.yaml"
    config.write_text(
        f"source: {{path: '{scene}'}}\n"
        f"model: {{kind: torchscript, path: '{model}', classes: [a, b, c], stride: 8}}\n"
        f"tiling: {{chunk: {TILE}, stitch: blend, window: {WINDOW}, overlap: {OVERLAP}}}\n"
        f"output: {{path: '{work}/{name}.zarr', preview: false}}\n"
        "regions: {enabled: false}\n"
        f"runtime: {{engine: {engine}}}\n"
    )
    argv = [str(Path(sys.executable).with_name("raymask")), "run", str(config), "--json", "--overwrite"]
    return measure(argv)


def agreement(store: Path, reference: Path) -> str:
    import zarr

    mask = np.asarray(zarr.open_array(str(store / "mask"), mode="r")[:])
    ref = np.load(reference)
    differ = mask != ref["labels"]
    n = int(differ.sum())
    if n == 0:
        return "labels identical to MONAI's"
    if bool((ref["gap"][differ] <= 2e-4).all()):
        return f"{n} of {mask.size:,} labels differ from MONAI's, all near-ties (top-2 gap <= 2e-4)"
    return f"DIFFERENT: {n} labels differ, max top-2 gap {float(ref['gap'][differ].max()):.2e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--models", nargs="+", default=["fast", "slow"], choices=sorted(MODELS))
    parser.add_argument("--scenes", type=Path, default=Path(tempfile.gettempdir()) / "raymask-bench")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    parser.add_argument("--role", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        role, *paths = args.role
        print(json.dumps(globals()[f"role_{role.replace('-', '_')}"](*map(Path, paths))))
        return

    from scenes import mosaic

    args.scenes.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    say(f"machine: {platform.machine()}, {os.cpu_count()} cores, {_memory_gb():.0f} GB; {_versions()}")
    say(
        f"window {WINDOW} px, overlap {OVERLAP}, gaussian (sigma 0.125 x window); MONAI batch 4 with {THREADS} "
        "threads; raymask `tiling.stitch: blend`, default strips, engine auto (in process, 2 torch threads) "
        "and ray (one 1-thread actor per CPU)"
    )
    say()
    say("| model | size | method | tiles/s | vs MONAI | wall s | peak memory (PSS, all processes) | notes |")
    say("|---|---|---|---|---|---|---|---|")
    ratios: list[str] = []
    with tempfile.TemporaryDirectory(prefix="raymask-blend-") as tmp:
        work = Path(tmp)
        for name in args.models:
            model = work / f"{name}.pt"
            build_model(model, name)
            peaks: dict[str, list[float]] = {"monai": [], "raymask (engine auto)": [], "raymask (engine ray)": []}
            for size in args.sizes:
                scene = mosaic(args.scenes / f"scene-{size}.tif", size)
                tiles = (size / TILE) ** 2
                one = run_role("model-only", scene, model)
                pair = run_role("model-only-pair", scene, model)
                alone = max(one.output["windows_per_s"], pair.output["windows_per_s"])
                keep = work / "reference.npz" if size == args.sizes[0] else Path("-")
                monai = run_role("monai", scene, model, work / f"monai-{name}-{size}.zarr", keep)
                runs = {
                    engine: raymask(work, scene, model, f"{name}-{size}-{engine}", engine) for engine in ("auto", "ray")
                }
                note = agreement(work / f"{name}-{size}-auto.zarr", keep) if str(keep) != "-" else ""
                grid_windows = runs["auto"].output["windows"]["grid"]
                alone_gb = max(one.peak_mb, pair.peak_mb) / 1024
                say(
                    f"| {name} | {size}² | model alone ({alone:.2f} windows/s: {grid_windows} windows "
                    f"in {grid_windows / alone:.1f} s) | | | | {alone_gb:.2f} GB | no I/O |"
                )
                say(
                    f"| {name} | {size}² | MONAI sliding_window_inference | {tiles / monai.wall_s:.2f} | 1.00 "
                    f"| {monai.wall_s:.1f} | {monai.peak_mb / 1024:.2f} GB | |"
                )
                peaks["monai"].append(monai.peak_mb)
                for engine, ours in runs.items():
                    windows, t = ours.output["windows"], ours.output["timings"]
                    where = (
                        f"on Ray actors (Ray start {t['startup_s']:.1f} s)"
                        if ours.output["engine"] == "ray"
                        else "engine auto: in its own process"
                    )
                    say(
                        f"| {name} | {size}² | **raymask blend**, {where} | **{tiles / ours.wall_s:.2f}** "
                        f"| **{monai.wall_s / ours.wall_s:.2f}** | {ours.wall_s:.1f} "
                        f"| **{ours.peak_mb / 1024:.2f} GB** | {ours.output['units_total']} strips, "
                        f"windows computed +{100 * windows['extra']:.0f} % "
                        f"({windows['computed']} for {windows['grid']}); {note if engine == 'auto' else ''} |"
                    )
                    peaks[f"raymask (engine {engine})"].append(ours.peak_mb)
                    ratios.append(
                        f"{name} {size}², raymask engine {engine}: throughput / MONAI's "
                        f"{monai.wall_s / ours.wall_s:.2f}, memory {ours.peak_mb / 1024:.2f} vs "
                        f"{monai.peak_mb / 1024:.2f} GB"
                    )
            for method, values in peaks.items():
                if len(values) > 1:
                    ratios.append(
                        f"{name}: {method} peak memory {min(values) / 1024:.2f}-{max(values) / 1024:.2f} GB "
                        f"over {args.sizes[0]}²-{args.sizes[-1]}²"
                    )
    say()
    say("Ratios (target: raymask >= 1.5 x MONAI's throughput, memory flat while MONAI's grows):")
    for line in ratios:
        say(f"- {line}")
    if not args.no_write:
        write_section("blend", "Blended stitching beside MONAI's sliding window (bench/blend.py)",
                      "`.venv/bin/python bench/blend.py`", lines)  # fmt: skip


if __name__ == "__main__":
    main()
