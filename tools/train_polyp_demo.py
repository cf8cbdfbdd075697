"""Train the small demo polyp segmenter shipped as models/polyp-demo.pt (TorchScript).

    .venv/bin/python tools/train_polyp_demo.py [--steps 400] [--out models/polyp-demo.pt]

A demonstration model, not a clinical one: a 2-level U-Net (stride 4, BatchNorm, ~40k weights)
trained for 1500 steps on random crops of three bundled Kvasir-SEG frames, with the fourth
bundled frame held out. It exists so that `configs/polyp-frames.yaml` runs a learned model end to
end on real endoscopy frames. For real work, export your own network with torch.jit.save.
Deterministic for a given torch build (seeded, one thread).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
FRAMES = ROOT / "data" / "polyp"
TRAIN = ["cju0qkwl35piu0993l0dewei2", "cju0roawvklrq0799vmjorwfv", "cju0rx1idathl0835detmsp84"]
HOLDOUT = "cju0qoxqj9q6s0835b43399p4"
MEAN, STD = [140.0, 85.0, 65.0], [60.0, 45.0, 40.0]
RECEPTIVE_RADIUS = 30  # 3x3 convs at 1/1 (x2), 1/2 (x2) and 1/4 (x2) plus pooling: 1+1+2+2+4+4+... < 30


def block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
        nn.Conv2d(cout, cout, 3, padding=1),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    )


class PolypNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.e1, self.e2, self.mid = block(3, 8), block(8, 16), block(16, 24)
        self.pool = nn.MaxPool2d(2)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.d2, self.d1 = block(40, 16), block(24, 8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.e1(x)
        e2 = self.e2(self.pool(e1))
        m = self.mid(self.pool(e2))
        d2 = self.d2(torch.cat([self.up(m), e2], 1))
        return self.head(self.d1(torch.cat([self.up(d2), e1], 1)))


def load(frame_id: str) -> tuple[np.ndarray, np.ndarray]:
    image = np.asarray(Image.open(FRAMES / "images" / f"{frame_id}.jpg").convert("RGB"), dtype=np.float32)
    mask = np.asarray(Image.open(FRAMES / "masks" / f"{frame_id}.jpg").convert("L")) > 127  # JPEG noise
    normalised = (image - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
    return normalised.transpose(2, 0, 1), mask


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    return float(2 * (pred & truth).sum() / max(pred.sum() + truth.sum(), 1))


def predict(net: nn.Module, image: np.ndarray) -> np.ndarray:
    h, w = image.shape[1:]
    padded = np.pad(image, ((0, 0), (0, -h % 4), (0, -w % 4)), mode="edge")
    with torch.inference_mode():
        return net(torch.from_numpy(padded[None]))[0].max(0).indices.numpy()[:h, :w] == 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--out", type=Path, default=ROOT / "models" / "polyp-demo.pt")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    data = [load(f) for f in TRAIN]
    net = PolypNet()
    optimiser = torch.optim.Adam(net.parameters(), lr=3e-3)
    loss_fn = nn.CrossEntropyLoss()
    crop = 128
    for step in range(args.steps):
        xs, ys = [], []
        for _ in range(8):
            image, mask = data[rng.integers(len(data))]
            r, c = rng.integers(0, image.shape[1] - crop), rng.integers(0, image.shape[2] - crop)
            x, y = image[:, r : r + crop, c : c + crop], mask[r : r + crop, c : c + crop]
            if rng.random() < 0.5:
                x, y = x[:, :, ::-1], y[:, ::-1]
            xs.append(np.ascontiguousarray(x))
            ys.append(np.ascontiguousarray(y))
        logits = net(torch.from_numpy(np.stack(xs)))
        loss = loss_fn(logits, torch.from_numpy(np.stack(ys)).long())
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step % 100 == 0:
            print(f"step {step:4d}  loss {loss.item():.3f}")
    net.eval()
    for frame in [*TRAIN, HOLDOUT]:
        image, mask = load(frame)
        print(f"{'holdout' if frame == HOLDOUT else 'train  '} {frame}  Dice {dice(predict(net, image), mask):.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(net), str(args.out))
    print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
