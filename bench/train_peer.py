"""The same network trained by plain MONAI code on the same split: the peer `make train-demo` compares
`raymask train` with (issue 16).

What is the same: the files on each side of the split, the network (MONAI UNet with the config's
channels, strides 2, one residual unit, batch norm), the normalisation (the trained model card's), the
patch size, the patches per optimiser step (the config's batch times its workers), the steps, the
epochs, Adam at the config's learning rate, cross-entropy plus Dice when the config asks, and the
epoch kept (the best mean foreground Dice on the validation files). What is MONAI's own: the data
pipeline (``RandCropByPosNegLabeld`` for balanced patches, ``RandFlipd``, ``RandRotate90d``,
``RandScaleIntensityd``/``RandShiftIntensityd``), ``DiceCELoss``, ``sliding_window_inference`` and
``DiceMetric``. One process, as a MONAI tutorial runs.

    .venv/bin/python bench/train_peer.py configs/train-buildings.yaml --card models/buildings/MODEL.yaml
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent


def load(path: str, bands: list[int] | None) -> np.ndarray:
    import warnings

    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)  # a JPEG frame
        with rasterio.open(path) as src:
            return src.read(bands).astype(np.float32) if bands else src.read().astype(np.float32)


def labels_of(path: str, values: list[float] | None) -> np.ndarray:
    raw = load(path, [1])[0]
    if values is None:
        return raw.astype(np.int64)
    return np.abs(raw[..., None] - np.asarray(values, np.float32)).argmin(-1).astype(np.int64)


def train_peer(config_path: Path, card_path: Path, seed: int | None = None) -> dict:
    import glob

    from monai.data import DataLoader, Dataset
    from monai.inferers import sliding_window_inference
    from monai.losses import DiceCELoss
    from monai.metrics import DiceMetric
    from monai.networks.nets import UNet
    from monai.transforms import (
        Compose,
        RandCropByPosNegLabeld,
        RandFlipd,
        RandRotate90d,
        RandScaleIntensityd,
        RandShiftIntensityd,
    )

    config = yaml.safe_load(config_path.read_text())
    card = yaml.safe_load(card_path.read_text())
    seed = config.get("seed", 0) if seed is None else seed
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.set_num_threads(2)
    if config.get("pairs"):
        pairs = [(ROOT / p["image"], ROOT / p["labels"]) for p in config["pairs"]]
    else:
        pairs = [
            (Path(i), ROOT / config["labels"].format(stem=Path(i).stem))
            for i in sorted(glob.glob(str(ROOT / config["images"])))
        ]
    held = set(config["validation"]["files"])
    mean = np.asarray(card["normalize"]["mean"], np.float32)[:, None, None]
    std = np.asarray(card["normalize"]["std"], np.float32)[:, None, None]

    def item(image: Path, labels: Path) -> dict:
        return {"image": (load(str(image), config.get("bands")) * card.get("scale", 1.0) - mean) / std,
                "label": labels_of(str(labels), config.get("label_values"))[None]}  # fmt: skip

    training = [item(i, lab) for i, lab in pairs if i.name not in held]
    validation = [item(i, lab) for i, lab in pairs if i.name in held]
    patch, classes = config["patch"], len(config["classes"])
    per_step = config.get("batch", 8) * config.get("workers", 1)
    jitter = config.get("augment", {}).get("intensity", 0.1)
    transforms: Compose = Compose([
        RandCropByPosNegLabeld(["image", "label"], "label", (patch, patch), pos=1, neg=1, num_samples=per_step),
        RandFlipd(["image", "label"], prob=0.5, spatial_axis=0),
        RandFlipd(["image", "label"], prob=0.5, spatial_axis=1),
        RandRotate90d(["image", "label"], prob=0.75),
        RandScaleIntensityd("image", factors=jitter, prob=1.0),
        RandShiftIntensityd("image", offsets=jitter, prob=1.0),
    ])  # fmt: skip
    transforms.set_random_state(seed)
    loader = DataLoader(Dataset(training, transforms), batch_size=1, shuffle=True, num_workers=0)
    channels = tuple(config.get("network", {}).get("channels", [16, 32, 64]))
    network = UNet(2, len(card["normalize"]["mean"]), classes, channels=channels, strides=(2,) * (len(channels) - 1),
                   num_res_units=1, norm="batch")  # fmt: skip
    optimiser = torch.optim.Adam(network.parameters(), lr=config.get("learning_rate", 3e-3))
    dice_too = config.get("loss", {}).get("dice", False)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=1.0 if dice_too else 0.0)
    metric = DiceMetric(include_background=False, reduction="mean")
    best, best_epoch, started = -1.0, 0, time.monotonic()
    steps = config.get("steps", 50)
    for epoch in range(config.get("epochs", 10)):
        network.train()
        done = 0
        while done < steps:
            for batch in loader:  # one image's num_samples patches = one step's patches
                x, y = batch["image"], batch["label"]
                optimiser.zero_grad()
                loss = loss_fn(network(x), y)
                loss.backward()
                optimiser.step()
                done += 1
                if done == steps:
                    break
        network.eval()
        metric.reset()
        with torch.inference_mode():
            for v in validation:
                x = torch.from_numpy(v["image"][None])
                logits = sliding_window_inference(x, (patch, patch), 4, network, overlap=0.25)
                predicted = torch.nn.functional.one_hot(logits.argmax(1), classes).permute(0, 3, 1, 2)
                truth = torch.nn.functional.one_hot(torch.from_numpy(v["label"]), classes).permute(0, 3, 1, 2)
                metric(predicted, truth)
        score = float(metric.aggregate().item())
        if score > best:
            best, best_epoch = score, epoch + 1
    return {"dice": best, "best_epoch": best_epoch, "seconds": time.monotonic() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path)
    parser.add_argument("--card", type=Path, required=True, help="the raymask-trained card: its normalisation")
    parser.add_argument("--seed", type=int, default=None, help="instead of the config's seed")
    args = parser.parse_args()
    print(json.dumps(train_peer(args.config, args.card, args.seed)))


if __name__ == "__main__":
    main()
