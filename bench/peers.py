"""raymask beside its alternatives, in one run: the model alone, a plain loop, MONAI, raymask.

    .venv/bin/python bench/peers.py                  # what `make bench` runs; writes bench/RESULTS.md
    .venv/bin/python bench/peers.py --sizes 4096 --no-huge --no-write   # a quick look

Inputs: N x N scenes mosaicked from bundled real imagery (bench/scenes.py: a 4-band uint8 R, G, B,
NIR tile, mirrored; DEFLATE, 512 px internal tiles), at 4096, 8192 and 16384 px.

The model (the one issue #9 measured): MONAI's 2-D ``UNet``, channels 16-32-64-128, three stride-2
levels, two residual units per level, BatchNorm (eval), fixed seed, ``x / 255`` inside the module,
3 classes, TorchScript. Its
receptive radius is measured here from gradients, and the jobs use 512 px chunks with a 64 px halo.

Every method runs as its own command, and its wall time and the peak of its memory (PSS summed
over its whole process tree: driver, Ray's raylet and GCS, workers; sampled from /proc every
0.5 s) are measured from outside. Throughput is always 512 x 512 output tiles per second, so the
rows compare directly:

- model alone: the TorchScript forward pass plus ``max(1).indices`` on 640 x 640 windows (a chunk
  plus its halo) read from the scene; the best of one process with 2 threads (batch 4 or batch 1)
  and two 1-thread processes at once (their rates summed); no I/O in the timing.
- plain loop: one process, rasterio window read -> model -> labels -> zarr chunk, one window at a time.
- MONAI: rasterio reads the whole scene, ``sliding_window_inference`` (640 px windows, overlap 0.25,
  gaussian, batch 4), argmax, zarr. The whole command.
- raymask: ``raymask run`` on a local Ray, the whole command; the summary's own timings split out
  Ray's start-up and the steady rate.

Pipeline ceiling (P0): the same with a model that costs nothing (``ndvi``, 512 px chunks, no halo)
against a single-process rasterio -> numpy -> zarr loop, on 2 cores and on 1 (``taskset``).
Exactness: at 4096 px raymask's labels are compared with one whole-image pass of the model; pixels
that differ must be float near-ties (the two best logits within 1e-4 of each other).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

CHUNK, HALO, CLASSES = 512, 64, 3
WINDOW = CHUNK + 2 * HALO
THREADS = 2


# -- measuring a command from outside -----------------------------------------------------------


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
                tree.setdefault(int(fields[1]), []).append(int(proc.name))
            except (OSError, IndexError, ValueError):
                continue
    return tree


def _pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def tree_pss_mb(root: int) -> float:
    """PSS of ``root`` and all its descendants, summed (shared pages counted once, split fairly)."""
    tree, todo, total = _children(), [root], 0
    seen: set[int] = set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += _pss_kb(pid)
        todo.extend(tree.get(pid, []))
    return total / 1024


@dataclass
class Measured:
    wall_s: float
    peak_mb: float
    output: dict


def measure(argv: list[str], *, env: dict[str, str] | None = None) -> Measured:
    """Run ``argv``; its wall time, peak summed PSS of its process tree, and the JSON it prints last."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}, cwd=ROOT
    )
    peak = 0.0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_pss_mb(proc.pid))
            done.wait(0.5)  # reading smaps costs CPU: sample no more often than the peak needs

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}):\n{err[-3000:]}")
    text = out.strip()
    return Measured(wall, peak, json.loads(text[text.index("{") :]) if "{" in text else {})


# -- the model ------------------------------------------------------------------------------------


def build_model(path: Path) -> int:
    """Save the benchmark U-Net as TorchScript at ``path``; returns its measured receptive radius."""
    import torch
    from monai.networks.nets import UNet

    class Scaled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = UNet(
                spatial_dims=2,
                in_channels=4,
                out_channels=CLASSES,
                channels=(16, 32, 64, 128),
                strides=(2, 2, 2),
                num_res_units=2,  # MONAI's tutorials' setting: two residual units per level
                norm="batch",
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x / 255.0)

    torch.manual_seed(0)
    model = Scaled().eval()
    with torch.no_grad():  # running statistics that are not the identity, as a trained network's
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    traced = torch.jit.trace(model, torch.zeros(1, 4, WINDOW, WINDOW))
    torch.jit.save(traced, str(path))
    return receptive_radius(model)


def receptive_radius(model) -> int:  # type: ignore[no-untyped-def]
    """The farthest input pixel that moves an output pixel, over all 8 stride phases (from gradients)."""
    import torch

    size, radius = 256, 0
    for phase in range(8):
        x = torch.rand(1, 4, size, size, requires_grad=True)
        centre = size // 2 + phase
        model(x * 255.0)[0, :, centre, centre].sum().backward()
        assert x.grad is not None
        rows, cols = np.nonzero(x.grad[0].abs().sum(0).numpy())
        radius = max(radius, int(np.abs(rows - centre).max()), int(np.abs(cols - centre).max()))
    return radius


# -- the methods, each run as its own process (--role) ------------------------------------------


def role_model_only(scene: Path, model: Path, threads: Path = Path(str(THREADS))) -> dict:
    import rasterio
    import torch

    torch.set_num_threads(int(str(threads)))
    module = torch.jit.load(str(model)).eval()
    with rasterio.open(scene) as src:
        corners = [(r, c) for r in (0, 1024, 2048) for c in (512, 1536)]
        windows = [src.read(window=((r, r + WINDOW), (c, c + WINDOW))) for r, c in corners]
    rates = {}
    with torch.inference_mode():
        for batch in (4, 1):
            xs = [
                torch.from_numpy(np.stack([windows[(i + j) % len(windows)] for j in range(batch)])).float()
                for i in range(len(windows))
            ]
            module(xs[0]).max(1).indices.to(torch.uint8)  # warm-up
            reps = 48 // batch
            start = time.perf_counter()
            for i in range(reps):
                module(xs[i % len(xs)]).max(1).indices.to(torch.uint8)
            rates[batch] = reps * batch / (time.perf_counter() - start)
    return {"tiles_per_s": max(rates.values()), "batch4": rates[4], "batch1": rates[1]}


def role_model_only_pair(scene: Path, model: Path) -> dict:
    """The model alone as two single-threaded processes at once (how raymask runs it on 2 CPUs)."""
    argv = [sys.executable, str(Path(__file__)), "--role", "model-only", str(scene), str(model), "1"]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    rates = [json.loads(proc.communicate()[0].strip().splitlines()[-1]) for proc in procs]
    return {"tiles_per_s": sum(r["batch1"] for r in rates)}


def _zarr_mask(path: Path, size: int):  # type: ignore[no-untyped-def]
    import zarr

    return zarr.create_array(
        str(path), shape=(size, size), chunks=(CHUNK, CHUNK), dtype="uint8", fill_value=255, overwrite=True
    )


def role_plain(scene: Path, model: Path, out: Path) -> dict:
    import rasterio
    import torch

    torch.set_num_threads(THREADS)
    module = torch.jit.load(str(model)).eval()
    with rasterio.open(scene) as src, torch.inference_mode():  # GDAL's defaults, as a user's loop has them
        size = src.height
        mask = _zarr_mask(out, size)
        for r in range(0, size, CHUNK):
            for c in range(0, size, CHUNK):
                r0, c0 = max(r - HALO, 0), max(c - HALO, 0)
                r1, c1 = min(r + CHUNK + HALO, size), min(c + CHUNK + HALO, size)
                x = torch.from_numpy(src.read(window=((r0, r1), (c0, c1)))[None]).float()
                labels = module(x).max(1).indices.to(torch.uint8).numpy()[0]
                mask[r : r + CHUNK, c : c + CHUNK] = labels[r - r0 : r - r0 + CHUNK, c - c0 : c - c0 + CHUNK]
    return {}


def _whole_scene(scene: Path, model: Path):  # type: ignore[no-untyped-def]
    """The model (THREADS torch threads) and the whole scene as one float tensor, as the peers take it."""
    import rasterio
    import torch

    torch.set_num_threads(THREADS)
    module = torch.jit.load(str(model)).eval()
    with rasterio.open(scene) as src:
        return module, torch.from_numpy(src.read()[None]).float()


def role_monai(scene: Path, model: Path, out: Path) -> dict:
    import torch
    from monai.inferers import sliding_window_inference

    module, image = _whole_scene(scene, model)
    with torch.inference_mode():
        logits = sliding_window_inference(
            image, roi_size=(WINDOW, WINDOW), sw_batch_size=4, predictor=module, overlap=0.25, mode="gaussian"
        )
        labels = logits.max(1).indices.to(torch.uint8).numpy()[0]
    del logits
    _zarr_mask(out, labels.shape[0])[:] = labels
    return {}


def role_whole(scene: Path, model: Path, out: Path) -> dict:
    """One whole-image pass; saves labels and the gap between the two best logits (for near-ties)."""
    import torch

    module, image = _whole_scene(scene, model)
    with torch.inference_mode():
        logits = module(image)[0]
    top = logits.topk(2, dim=0)
    np.savez(out, labels=top.indices[0].to(torch.uint8).numpy(), gap=(top.values[0] - top.values[1]).numpy())
    return {}


def role_ndvi_plain(scene: Path, out: Path) -> dict:
    """The pipeline ceiling's reference: rasterio -> numpy NDVI classes -> zarr, one process."""
    import rasterio

    with rasterio.open(scene) as src:
        size = src.height
        mask = _zarr_mask(out, size)
        for r in range(0, size, CHUNK):
            for c in range(0, size, CHUNK):
                red, nir = src.read([1, 4], window=((r, r + CHUNK), (c, c + CHUNK))).astype(np.float64)
                total = nir + red
                ndvi = np.divide(nir - red, total, out=np.zeros_like(total), where=total != 0)
                labels = np.zeros(ndvi.shape, dtype=np.uint8)
                labels[ndvi >= 0.3] = 1
                labels[ndvi < 0.0] = 2
                mask[r : r + CHUNK, c : c + CHUNK] = labels
    return {}


# -- the harness ----------------------------------------------------------------------------------


def run_role(role: str, *args: Path, taskset: str | None = None) -> Measured:
    argv = [sys.executable, str(Path(__file__)), "--role", role, *map(str, args)]
    return measure(["taskset", "-c", taskset, *argv] if taskset else argv)


def raymask(config: Path, *sets: str, taskset: str | None = None) -> Measured:
    argv = [str(Path(sys.executable).with_name("raymask")), "run", str(config), "--json", "--overwrite", *sets]
    return measure(["taskset", "-c", taskset, *argv] if taskset else argv)


def job(work: Path, scene: Path, name: str, model_yaml: str, *, chunk: int = CHUNK, halo: int = HALO) -> Path:
    config = work / f"{name}.yaml"
    config.write_text(
        f"source: {{path: '{scene}'}}\n"
        f"model: {model_yaml}\n"
        f"tiling: {{chunk: {chunk}, halo: {halo}}}\n"
        f"output: {{path: '{work}/{name}.zarr', preview: false}}\n"
        "regions: {enabled: false}\n"
        "runtime: {engine: ray}\n"
    )
    return config


def tiles(size: int) -> float:
    return (size / CHUNK) ** 2


def exactness(store: Path, reference: Path) -> str:
    import zarr

    mask = np.asarray(zarr.open_array(str(store / "mask"), mode="r")[:])
    ref = np.load(reference)
    differ = mask != ref["labels"]
    n = int(differ.sum())
    if n == 0:
        return "identical labels (whole-image pass)"
    ties = bool((ref["gap"][differ] < 1e-4).all())
    return (
        f"{n} of {mask.size:,} pixels differ, all float near-ties (top-2 logit gap < 1e-4)"
        if ties
        else f"NOT EXACT: {n} pixels differ, max top-2 gap {float(ref['gap'][differ].max()):.2e}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--huge", type=int, default=32768, help="raymask alone at this size, for memory (0: skip)")
    parser.add_argument("--no-huge", action="store_const", const=0, dest="huge")
    parser.add_argument("--no-monai-above", type=int, default=16384, help="skip MONAI above this size")
    parser.add_argument("--scenes", type=Path, default=Path(tempfile.gettempdir()) / "raymask-bench")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    parser.add_argument("--role", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        role, *paths = args.role
        fn = globals()[f"role_{role.replace('-', '_')}"]
        print(json.dumps(fn(*map(Path, paths))))
        return

    from scenes import mosaic

    args.scenes.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    with tempfile.TemporaryDirectory(prefix="raymask-peers-") as tmp:
        work = Path(tmp)
        model = work / "unet.pt"
        radius = build_model(model)
        if radius > HALO:
            raise SystemExit(f"the benchmark U-Net's receptive radius {radius} exceeds the halo {HALO}")
        unet = f"{{kind: torchscript, path: '{model}', classes: [a, b, c], stride: 8, receptive_radius: {radius}}}"
        ndvi = "{kind: ndvi, red: 1, nir: 4}"
        say(f"machine: {platform.machine()}, {os.cpu_count()} cores, {_memory_gb():.0f} GB; {_versions()}")
        say(
            f"model: MONAI UNet 16-32-64-128, 3 stride-2 levels, 2 residual units, BatchNorm, TorchScript; "
            f"receptive radius {radius} px"
        )
        say(
            f"jobs: {CHUNK} px chunks + {HALO} px halo ({WINDOW} px windows), regions off; plain loop and MONAI with "
            f"{THREADS} torch threads, raymask with its defaults (one 1-thread actor per CPU)"
        )
        say()
        say("| size | method | tiles/s | vs model alone | wall s | peak memory (PSS, all processes) | notes |")
        say("|---|---|---|---|---|---|---|")
        rows: dict[int, dict[str, Measured]] = {}
        for size in args.sizes:
            scene = mosaic(args.scenes / f"scene-{size}.tif", size)
            got = rows[size] = {}
            got["model"] = run_role("model-only", scene, model)
            got["pair"] = run_role("model-only-pair", scene, model)
            alone = max(got["model"].output["tiles_per_s"], got["pair"].output["tiles_per_s"])
            got["plain"] = run_role("plain", scene, model, work / f"plain-{size}.zarr")
            if size <= args.no_monai_above:
                got["monai"] = run_role("monai", scene, model, work / f"monai-{size}.zarr")
            got["raymask"] = raymask(job(work, scene, f"unet-{size}", unet))
            note = ""
            if size == args.sizes[0]:
                run_role("whole", scene, model, work / "whole.npz")
                note = exactness(work / f"unet-{size}.zarr", work / "whole.npz")
            n = tiles(size)
            m, pair = got["model"], got["pair"]
            say(
                f"| {size}² | model alone: best of 1 process x {THREADS} threads (batch 4 {m.output['batch4']:.1f}, "
                f"batch 1 {m.output['batch1']:.1f}) and 2 processes x 1 thread ({pair.output['tiles_per_s']:.1f}) "
                f"| {alone:.2f} | 1.00 | | {max(m.peak_mb, pair.peak_mb) / 1024:.2f} GB | no I/O |"
            )
            for key, label in (("plain", "plain loop"), ("monai", "MONAI sliding window")):
                if key in got:
                    r = got[key]
                    say(
                        f"| {size}² | {label} | {n / r.wall_s:.2f} | {n / r.wall_s / alone:.2f} | {r.wall_s:.1f} "
                        f"| {r.peak_mb / 1024:.2f} GB | |"
                    )
            r = got["raymask"]
            t = r.output["timings"]
            whole = n / r.wall_s
            say(
                f"| {size}² | **raymask run** | **{whole:.2f}** (steady {r.output['units_per_s']:.2f}) "
                f"| **{whole / alone:.2f}** (steady {r.output['units_per_s'] / alone:.2f}) | {r.wall_s:.1f} "
                f"| **{r.peak_mb / 1024:.2f} GB** | Ray start {t['startup_s']:.1f} s, workers {t['workers_s']:.1f} s; "
                f"{note} |"
            )
        if args.huge:
            scene = mosaic(args.scenes / f"scene-{args.huge}.tif", args.huge)
            r = raymask(job(work, scene, f"unet-{args.huge}", unet))
            n = tiles(args.huge)
            say(
                f"| {args.huge}² | **raymask run** | **{n / r.wall_s:.2f}** (steady {r.output['units_per_s']:.2f}) | "
                f"| {r.wall_s:.1f} | **{r.peak_mb / 1024:.2f} GB** | |"
            )
        say()
        say("Ratios (targets: P1 raymask >= 0.9 x the model alone; P2 >= 1.5 x MONAI; P3 <= 2 GB, flat +-10 %):")
        peaks = []
        for size, got in rows.items():
            alone = max(got["model"].output["tiles_per_s"], got["pair"].output["tiles_per_s"])
            r = got["raymask"]
            parts = [f"{size}²: raymask / model alone {tiles(size) / r.wall_s / alone:.2f} (whole command)"]
            parts.append(f"{r.output['units_per_s'] / alone:.2f} (steady)")
            parts.append(f"raymask / plain loop {got['plain'].wall_s / r.wall_s:.2f}")
            if "monai" in got:
                parts.append(f"raymask / MONAI {got['monai'].wall_s / r.wall_s:.2f}")
            peaks.append(r.peak_mb)
            say("- " + ", ".join(parts))
        if len(peaks) > 1:
            mid = (max(peaks) + min(peaks)) / 2
            say(
                f"- raymask peak memory {min(peaks) / 1024:.2f}-{max(peaks) / 1024:.2f} GB: "
                f"+-{(max(peaks) - mid) / mid:.0%}"
            )
        say()
        say("Pipeline ceiling (P0): `ndvi` (near-free), 512 px chunks, no halo; steady = Ray start-up excluded")
        say()
        say(
            "| size | cores | plain loop tiles/s | raymask steady tiles/s | ratio | raymask whole command | Ray start |"
        )
        say("|---|---|---|---|---|---|---|")
        for size in [s for s in args.sizes if s >= 8192] or args.sizes[-1:]:
            scene = mosaic(args.scenes / f"scene-{size}.tif", size)
            for cores, mask in (("2", None), ("1", "0")):
                plain = run_role("ndvi-plain", scene, work / f"ndvi-plain-{size}.zarr", taskset=mask)
                r = raymask(job(work, scene, f"ndvi-{size}", ndvi, halo=0), taskset=mask)
                base = tiles(size) / plain.wall_s
                steady = r.output["units_per_s"]
                say(
                    f"| {size}² | {cores} | {base:.1f} | {steady:.1f} | {steady / base:.2f} | "
                    f"{tiles(size) / r.wall_s:.1f} tiles/s, {r.wall_s:.1f} s | "
                    f"{r.output['timings']['startup_s']:.1f} s |"
                )
        say()
        say("Small job: the demo scene (configs/aerial-vegetation.yaml, 9 chunks, regions and preview on)")
        say()
        for engine in ("ray", "process"):
            r = raymask(ROOT / "configs" / "aerial-vegetation.yaml", "--set", f"runtime.engine={engine}",
                        "--set", f"output.path={work}/demo-{engine}.zarr")  # fmt: skip
            t = r.output["timings"]
            say(
                f"- engine {engine}: whole command {r.wall_s:.1f} s (Ray start {t['startup_s']:.1f} s; after it: "
                f"{t['total_s'] - t['startup_s']:.1f} s = workers {t['workers_s']:.1f} s "
                f"+ tiles {t['compute_s']:.1f} s "
                f"+ regions {t['regions_s']:.1f} s + the rest); peak {r.peak_mb / 1024:.2f} GB"
            )
    if not args.no_write:
        write_results(lines)


def write_results(lines: list[str]) -> None:
    write_section("peers", "raymask beside its peers (bench/peers.py)",
                  "`make bench` (`.venv/bin/python bench/peers.py`)", lines, first=True)  # fmt: skip


def write_section(key: str, title: str, how: str, lines: list[str], *, first: bool = False) -> None:
    """Replace (or add: first in the file, or last) the ``<!-- KEY:start -->`` section of bench/RESULTS.md."""
    path = HERE / "RESULTS.md"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    block = f"{start}\n## {title}\n\nRun {time.strftime('%Y-%m-%d')}: {how}.\n\n" + "\n".join(lines) + f"\n{end}"
    if start in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    elif first:
        head, _, rest = text.partition("\n")
        text = f"{head}\n\n{block}\n{rest}"
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def _memory_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 1024**2
    return 0.0


def _versions() -> str:
    import ray
    import torch
    import zarr

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    versions = f"torch {torch.__version__}, Ray {ray.__version__}, zarr {zarr.__version__}"
    return f"{cpu}; Python {platform.python_version()}, {versions}"


if __name__ == "__main__":
    main()
