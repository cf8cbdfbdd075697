"""raymask's TorchScript model path on a GPU: batching, pinned staging and mixed precision.

    python bench/gpu_model.py --out bench/gpu_model.json     # on a machine with a CUDA GPU

What runs is ``workers.models.network.NetworkModel``, the class every raymask actor uses:
uint8 windows stacked into page-locked memory, one non-blocking copy, scale / normalise / fill on
the device, the network under autocast, argmax; ``launch`` overlaps the next batch's staging with
the previous batch's kernels as the worker does (two batches in flight). Side by side, in the same
run: **the model alone** (the same TorchScript module on float32 windows already on the GPU, no
copy, no preparation): the ratio says what raymask's model path costs on top of the network.

Two networks, since a slow model hides overhead: a five-convolution CNN of the demo polyp
network's size (the fast one) and a MONAI ``UNet`` (channels 32-64-128-256-512, the slow one). Windows are
512 x 512 x 3 uint8. Reported per network, precision (float32, bfloat16, float16) and batch size:
windows/s and megapixels/s for both paths, the ratio, the fraction of labels equal to float32's
(mixed precision changes some argmax ties and near-ties), and peak GPU memory.

Ray, rasterio and zarr are not needed: this measures the model path alone. The whole-pipeline
benchmarks are bench/peers.py (CPU). Results go to bench/RESULTS.md with the machine they came from.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.config import TorchScriptModelConfig  # noqa: E402
from workers.models.network import NetworkModel  # noqa: E402

SIDE = 512


def monai_unet(path: Path) -> Path:
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    net = UNet(spatial_dims=2, in_channels=3, out_channels=2, channels=(32, 64, 128, 256, 512),
               strides=(2, 2, 2, 2), num_res_units=2, norm="batch").eval()  # fmt: skip
    torch.jit.save(torch.jit.script(net), str(path))
    return path


def small_cnn(path: Path) -> Path:
    """The fast network: five convolutions, stride 2, about the size of the demo polyp network
    (saved here rather than loaded: a TorchScript file saved by a newer torch may not load on the
    GPU machine's older one)."""
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Upsample(scale_factor=2.0, mode="nearest"),
        nn.Conv2d(32, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 2, 1),
    ).eval()  # fmt: skip
    torch.jit.save(torch.jit.script(net), str(path))
    return path


def windows(n: int, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    # smooth-ish content (not white noise): upsampled random fields, as images have structure
    small = rng.integers(0, 256, (n, 3, SIDE // 16, SIDE // 16), dtype=np.uint8)
    images = [np.ascontiguousarray(np.repeat(np.repeat(s, 16, axis=1), 16, axis=2)) for s in small]
    noise = [rng.integers(0, 24, (3, SIDE, SIDE), dtype=np.uint8) for _ in range(n)]
    images = [np.clip(a.astype(np.int16) + b, 0, 255).astype(np.uint8) for a, b in zip(images, noise)]
    return images, [np.ones((SIDE, SIDE), dtype=bool) for _ in range(n)]


def raymask_path(
    model: NetworkModel, images: list[np.ndarray], valid: list[np.ndarray], batch: int
) -> tuple[float, np.ndarray]:
    """Seconds for all windows through ``launch`` with two batches in flight; and the labels."""
    out = []
    torch.cuda.synchronize()
    start = time.perf_counter()
    pending = []
    for i in range(0, len(images), batch):
        pending.append(model.launch(images[i : i + batch], valid[i : i + batch]))
        if len(pending) > 1:
            out.append(pending.pop(0)())
    out.extend(p() for p in pending)
    torch.cuda.synchronize()
    return time.perf_counter() - start, np.concatenate(out)


def model_alone(module: torch.jit.ScriptModule, x: torch.Tensor, batch: int, precision: str) -> float:
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(precision)
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, x.shape[0], batch):
            if dtype is None:
                module(x[i : i + batch]).argmax(1)
            else:
                with torch.autocast("cuda", dtype=dtype):
                    module(x[i : i + batch]).argmax(1)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def compare_kinds(scratch: Path, images: list[np.ndarray], valid: list[np.ndarray], out: Path) -> None:
    """The same networks as torchscript, torch-export and onnx (onnxruntime's CUDA provider) on the GPU:
    labels against TorchScript's and windows/s at batch 8, float32."""
    import warnings

    from pipeline.config import OnnxModelConfig, TorchExportModelConfig

    rows = []
    for name, make in (("small CNN (fast)", small_cnn), ("MONAI UNet 32-512 (slow)", monai_unet)):
        scripted = make(scratch / "net.pt")
        module = torch.jit.load(str(scripted))
        eager = _eager(name)
        eager.load_state_dict(module.state_dict())
        example = torch.randn(2, 3, SIDE, SIDE)
        axes = ({0: torch.export.Dim.AUTO, 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO},)
        torch.export.save(torch.export.export(eager.eval(), (example,), dynamic_shapes=axes), str(scratch / "net.pt2"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(eager.eval(), (example,), str(scratch / "net.onnx"), dynamo=True, dynamic_shapes=axes)
        reference = None
        for kind, cls, path in (("torchscript", TorchScriptModelConfig, scripted),
                                ("torch-export", TorchExportModelConfig, scratch / "net.pt2"),
                                ("onnx", OnnxModelConfig, scratch / "net.onnx")):  # fmt: skip
            config = cls(kind=kind, path=str(path), classes=["a", "b"], stride=16, scale=1 / 255)  # type: ignore[arg-type]
            model = NetworkModel(config, device="cuda")
            raymask_path(model, images[:16], valid[:16], 8)
            seconds, labels = raymask_path(model, images, valid, 8)
            reference = labels if reference is None else reference
            providers = getattr(model.module, "providers", None)
            rows.append({"network": name, "kind": kind, "windows_per_s": len(images) / seconds,
                         "labels_equal_to_torchscript": float((labels == reference).mean()),
                         "onnx_providers": providers})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    out.write_text(
        json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, indent=1)
    )


def _eager(name: str) -> torch.nn.Module:
    """The eager architecture of the scripted network, to export (its weights are loaded from the script)."""
    from torch import nn

    if name.startswith("small"):
        return nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Upsample(scale_factor=2.0, mode="nearest"),
            nn.Conv2d(32, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 2, 1),
        )  # fmt: skip
    from monai.networks.nets import UNet

    return UNet(spatial_dims=2, in_channels=3, out_channels=2, channels=(32, 64, 128, 256, 512),
                strides=(2, 2, 2, 2), num_res_units=2, norm="batch")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "gpu_model.json")
    parser.add_argument("--windows", type=int, default=256)
    parser.add_argument("--kinds", type=Path, help="compare torchscript, torch-export and onnx instead; write here")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    scratch = Path("/tmp/raymask-gpu-bench")
    scratch.mkdir(exist_ok=True)
    if args.kinds:
        images, valid = windows(args.windows)
        compare_kinds(scratch, images, valid, args.kinds)
        return
    nets = {
        "small CNN (fast)": small_cnn(scratch / "cnn.pt"),
        "MONAI UNet 32-512 (slow)": monai_unet(scratch / "unet.pt"),
    }
    images, valid = windows(args.windows)
    on_gpu = torch.from_numpy(np.stack(images)).cuda().float() / 255.0
    rows = []
    for name, path in nets.items():
        reference = None
        for precision in ("float32", "bfloat16", "float16"):
            config = TorchScriptModelConfig(kind="torchscript", path=str(path), classes=["a", "b"], stride=16,
                                            scale=1 / 255, precision=precision)  # fmt: skip
            model = NetworkModel(config, device="cuda")
            for batch in (1, 8, 32):
                raymask_path(model, images[: 2 * batch], valid[: 2 * batch], batch)  # warm-up (cuDNN autotune)
                model_alone(model.module, on_gpu[: 2 * batch], batch, precision)
                torch.cuda.reset_peak_memory_stats()
                seconds, labels = raymask_path(model, images, valid, batch)
                peak = torch.cuda.max_memory_allocated() / 2**30
                alone = model_alone(model.module, on_gpu, batch, precision)
                if precision == "float32" and batch == 1:
                    reference = labels
                assert reference is not None
                rows.append({
                    "network": name, "precision": precision, "batch": batch,
                    "windows_per_s": args.windows / seconds, "mpx_per_s": args.windows * SIDE * SIDE / seconds / 1e6,
                    "alone_windows_per_s": args.windows / alone, "ratio_to_model_alone": alone / seconds,
                    "labels_equal_to_float32": float((labels == reference).mean()), "peak_gpu_gib": peak,
                })  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
    device = torch.cuda.get_device_name()
    result = {"device": device, "torch": torch.__version__, "window": [3, SIDE, SIDE], "windows": args.windows,
              "rows": rows}  # fmt: skip
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
