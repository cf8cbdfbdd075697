"""`make train-demo` (issue 16): the two demo models trained by their shipped configs, scored on the
file each holds out, and the same network trained by plain MONAI code on the same split beside them.

    .venv/bin/python bench/train_demo.py [--seeds 0,1,2] [--no-write]

For each of configs/train-buildings.yaml (SpaceNet 4 Atlanta, building footprints) and
configs/train-polyp.yaml (Kvasir-SEG frames): `raymask train CONFIG --json` writes the model folder
(models/buildings, models/polyp); `raymask evaluate` scores a `raymask run` of the held-out image with
that model against its labels (tiled inference, as a user would run it); bench/train_peer.py trains
the same UNet with MONAI's own data pipeline, loss and sliding-window inference. One held-out file and
one seed make a noisy score, so both are trained with several seeds (the config's seed makes the model
folder; the others train into a temporary folder) and compared by their mean. The figures go to
bench/RESULTS.md.
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

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from peers import _memory_gb, _versions, write_section  # noqa: E402
from train_peer import train_peer  # noqa: E402

RAYMASK = str(Path(sys.executable).with_name("raymask"))
DEMOS = [("configs/train-buildings.yaml", "building"), ("configs/train-polyp.yaml", "polyp")]


def raymask(*argv: str) -> dict:
    done = subprocess.run([RAYMASK, *argv, "--json", "--no-progress"], cwd=ROOT, check=True, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL)  # fmt: skip
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--seeds", default="0,1,2", help="seeds to train each config with (the first: the config's)")
    args = parser.parse_args()
    seeds = [int(v) for v in args.seeds.split(",")]
    rows, spread = [], []
    work = Path(tempfile.mkdtemp(prefix="raymask-train-demo-"))
    for config_path, foreground in DEMOS:
        config = yaml.safe_load((ROOT / config_path).read_text())
        out = ROOT / config["output"]
        for stale in ("checkpoints", "ray"):  # a fresh run, not a resume of an earlier one
            subprocess.run(["rm", "-rf", str(out / stale)], check=True)
        clock = time.monotonic()
        report = raymask("train", config_path)
        seconds = time.monotonic() - clock
        held = config["validation"]["files"][0]
        image = next(p for p in ROOT.glob(f"data/**/{held}"))
        labels = (next(p["labels"] for p in config["pairs"] if Path(p["image"]).name == held) if config.get("pairs")
                  else config["labels"].format(stem=Path(held).stem))  # fmt: skip
        radius = report["receptive_radius"]
        stride = report["stride"]
        job = work / f"{Path(config_path).stem}.yaml"
        job.write_text(yaml.safe_dump({
            "source": {"path": str(image)}, "model": {"card": str(out / "MODEL.yaml")},
            "tiling": {"chunk": 128, "halo": -(-radius // stride) * stride},
            "output": {"path": str(work / f"{Path(config_path).stem}.zarr"), "preview": False},
        }))  # fmt: skip
        run = raymask("run", str(job), "--overwrite")
        values = ",".join(str(v) for v in config["label_values"]) if config.get("label_values") else None
        scored = raymask("evaluate", run["store"], str(ROOT / labels), *(["--label-values", values] if values else []))
        peer = train_peer(ROOT / config_path, out / "MODEL.yaml", config.get("seed", 0))
        ours = report["classes"]["per_class"][foreground]
        rows.append(
            f"| {Path(config_path).name} | {held} | {report['best_epoch']} of {report['epochs']} | "
            f"{ours['dice']:.4f} | {ours['iou']:.4f} | {scored['per_class'][foreground]['dice']:.4f} | "
            f"{str(run['stitch']).split(':')[0]} | {peer['dice']:.4f} (epoch {peer['best_epoch']}) | "
            f"{'yes' if ours['dice'] >= peer['dice'] else 'no'} | {seconds:.0f} | {peer['seconds']:.0f} |"
        )
        print(rows[-1], flush=True)
        mine, theirs = [ours["dice"]], [peer["dice"]]
        for seed in seeds[1:]:
            other = raymask(
                "train",
                config_path,
                "--set",
                f"seed={seed}",
                "--set",
                f"output={work / f'{Path(config_path).stem}-seed{seed}'}",
            )
            mine.append(other["classes"]["per_class"][foreground]["dice"])
            theirs.append(train_peer(ROOT / config_path, out / "MODEL.yaml", seed)["dice"])
            print(f"  seed {seed}: raymask {mine[-1]:.4f}, MONAI {theirs[-1]:.4f}", flush=True)
        spread.append(
            f"| {Path(config_path).name} | {', '.join(f'{v:.4f}' for v in mine)} | **{sum(mine) / len(mine):.4f}** | "
            f"{', '.join(f'{v:.4f}' for v in theirs)} | **{sum(theirs) / len(theirs):.4f}** | "
            f"{'yes' if sum(mine) >= sum(theirs) else 'no'} |"
        )
        print(spread[-1], flush=True)
    lines = [
        f"machine: {platform.machine()}, {os.cpu_count()} cores, {_memory_gb():.0f} GB; {_versions()}",
        "",
        "Each config trained from scratch by `raymask train` (Ray Train, 2 CPU workers, 20 epochs of 25 steps, "
        "16 patches of 128² a step, balanced patches, cross-entropy + Dice, flips, quarter turns, intensity "
        "jitter); the epoch kept is the best on the held-out file, so the Dice below is on the file that also "
        "chose the epoch (the same for the peer). 'tiled run': `raymask run` of the held-out image with the "
        "trained card (128-px chunks, halo = the measured receptive radius) scored by `raymask evaluate`; "
        "'stitch' is what the run reported. The peer: bench/train_peer.py, the same UNet, split, normalisation, "
        "patches per step, steps, epochs and loss in plain MONAI (its data pipeline, DiceCELoss, "
        "sliding_window_inference, DiceMetric), one process.",
        "",
        "| config | held out | epoch kept | Dice | IoU | Dice, tiled run | stitch | MONAI peer Dice | "
        "raymask >= peer | raymask s | peer s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Every seed ({', '.join(map(str, seeds))}; the first made the model folder): Dice of the foreground class "
        "on the held-out file, the epoch kept by each run's own validation.",
        "",
        "| config | raymask Dice per seed | raymask mean | MONAI peer Dice per seed | peer mean | raymask >= peer |",
        "|---|---|---|---|---|---|",
        *spread,
    ]
    if not args.no_write:
        write_section("train", "Training the demo models (bench/train_demo.py, make train-demo)",
                      "`make train-demo`", lines)  # fmt: skip
    print("\n".join(lines))


if __name__ == "__main__":
    main()
