"""`raymask train` and `raymask evaluate` (issue 16): a tiny network trained through the CLI on Ray
Train from the bundled polyp frames, run by `raymask run` from its model folder with exact tiling;
resume after the driver or a worker is killed; one-line errors for bad training inputs; evaluation
of a store against labels equal to a direct computation."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml

from pipeline.cli import main
from pipeline.store import MaskStore

ROOT = Path(__file__).resolve().parent.parent
POLYP = ROOT / "data" / "polyp"
HELD_OUT = "cju0qoxqj9q6s0835b43399p4.jpg"


def polyp_config(tmp_path: Path, **changes: object) -> Path:
    raw: dict[str, object] = {
        "name": "polyp-tiny",
        "images": str(POLYP / "images" / "*.jpg"),
        "labels": str(POLYP / "masks" / "{stem}.jpg"),
        "label_values": [0, 255],
        "classes": [{"name": "background", "color": "#303030"}, {"name": "polyp", "color": "#ff3b30"}],
        "network": {"name": "unet", "channels": [8, 16, 32]},
        "patch": 64,
        "batch": 4,
        "epochs": 2,
        "steps": 3,
        "validation": {"files": [HELD_OUT]},
        "workers": 2,
        "output": str(tmp_path / "model"),
    }
    raw.update(changes)
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with redirect_stdout(out):
        code = main(list(argv))
    return code, out.getvalue()


def test_a_model_trained_through_the_cli_runs_exactly_from_its_folder(ray_session, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    config = polyp_config(tmp_path)
    code, out = cli("train", str(config), "--json", "--no-progress")
    assert code == 0, out
    report = json.loads(out)
    folder = tmp_path / "model"
    for name in ("model.pt", "MODEL.yaml", "metrics.json", "loss.png", "train.yaml", "checkpoints/last.pt"):
        assert (folder / name).is_file(), name
    assert report["validation"] == [HELD_OUT] and HELD_OUT not in report["training"]
    assert [h["epoch"] for h in report["history"]] == [1, 2]
    card = yaml.safe_load((folder / "MODEL.yaml").read_text())
    assert card["stride"] == 4 and card["measured"]["equivariant"] is True
    assert card["receptive_radius"] == card["measured"]["receptive_radius"] > 0
    assert [c["name"] for c in card["classes"]] == ["background", "polyp"]
    assert len(card["normalize"]["mean"]) == 3 and card["bands"] == ["band 1", "band 2", "band 3"]
    per_class = report["classes"]["per_class"]
    matrix = np.array(report["classes"]["confusion"])
    assert per_class["polyp"]["pixels"] == matrix[1].sum() > 0  # every labelled pixel of the held-out frame
    from PIL import Image

    width, height = Image.open(POLYP / "images" / HELD_OUT).size
    assert matrix.sum() == width * height
    assert Image.open(folder / "loss.png").size == (640, 360)
    job = tmp_path / "job.yaml"
    radius = card["receptive_radius"]
    job.write_text(yaml.safe_dump({
        "source": {"path": str(POLYP / "images" / HELD_OUT)},
        "model": {"card": str(folder / "MODEL.yaml")},
        "tiling": {"chunk": 128, "halo": -(-radius // 4) * 4},
        "output": {"path": str(tmp_path / "polyp.zarr")},
    }))  # fmt: skip
    code, out = cli("run", str(job), "--json", "--no-progress")
    assert code == 0, out
    summary = json.loads(out)
    assert str(summary["stitch"]).startswith("exact"), summary["stitch"]
    code, out = cli("evaluate", str(tmp_path / "polyp.zarr"), str(POLYP / "masks" / HELD_OUT),
                    "--label-values", "0,255", "--json", "--no-progress")  # fmt: skip
    assert code == 0, out
    scored = json.loads(out)
    assert scored["pixels"] == matrix.sum()
    assert np.isclose(scored["per_class"]["polyp"]["dice"], per_class["polyp"]["dice"], atol=0.02)  # tiled = whole


def write_pair(tmp_path: Path, name: str, image: np.ndarray, labels: np.ndarray, **label_profile: object) -> dict:
    transform = rasterio.Affine(1.0, 0, 500000, 0, -1.0, 5700000)
    base = {"driver": "GTiff", "crs": "EPSG:32631", "transform": transform}
    with rasterio.open(tmp_path / f"{name}.tif", "w", height=image.shape[1], width=image.shape[2], count=image.shape[0],
                       dtype=image.dtype.name, **base) as dst:  # fmt: skip
        dst.write(image)
    profile = {**base, **label_profile}
    with rasterio.open(tmp_path / f"{name}-labels.tif", "w", height=labels.shape[0], width=labels.shape[1], count=1,
                       dtype=labels.dtype.name, **profile) as dst:  # fmt: skip
        dst.write(labels[None])
    return {"image": str(tmp_path / f"{name}.tif"), "labels": str(tmp_path / f"{name}-labels.tif")}


def bad_config(tmp_path: Path, pairs: list[dict], **changes: object) -> Path:
    raw: dict[str, object] = {
        "pairs": pairs, "classes": ["ground", "building"], "patch": 32, "epochs": 1, "steps": 1,
        "network": {"channels": [4, 8]}, "workers": 1, "output": str(tmp_path / "out"),
    }  # fmt: skip
    raw.update(changes)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def run_cli(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "train", str(config), "--no-progress"],
                          capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)  # fmt: skip


def one_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and lines, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return lines[-1]


def test_bad_training_inputs_get_one_line_naming_the_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (3, 64, 64)).astype(np.uint8)
    labels = (rng.random((64, 64)) > 0.7).astype(np.uint8)
    good = write_pair(tmp_path, "a", image, labels)
    other = write_pair(tmp_path, "b", image, labels[:48])  # another grid
    line = one_line(run_cli(bad_config(tmp_path, [good, other])))
    assert "b-labels.tif" in line and "not on the grid" in line
    shifted = write_pair(tmp_path, "c", image, labels, transform=rasterio.Affine(1.0, 0, 500010, 0, -1.0, 5700000))
    line = one_line(run_cli(bad_config(tmp_path, [good, shifted])))
    assert "c-labels.tif" in line and "not on the grid" in line
    wrong = write_pair(tmp_path, "d", image, labels * 3)  # ids 0 and 3 for two classes
    line = one_line(run_cli(bad_config(tmp_path, [good, wrong])))
    assert "d-labels.tif" in line and "3" in line and "class ids 0..1" in line
    line = one_line(run_cli(bad_config(tmp_path, [good])))
    assert "validation split is empty" in line
    second = write_pair(tmp_path, "e", image, labels)
    line = one_line(run_cli(bad_config(tmp_path, [good, second], network={"channels": [4, 8], "dims": 3})))
    assert ("a.tif:" in line or "e.tif:" in line) and "network.dims 3 trains on volumes" in line


def test_a_nan_loss_stops_training_with_the_epoch(ray_session, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    image = rng.random((2, 64, 64)).astype(np.float32)
    image[:, 10:50, 10:50] = np.nan  # NaN pixels, and no nodata to say so
    labels = (rng.random((64, 64)) > 0.5).astype(np.uint8)
    pairs = [write_pair(tmp_path, n, image, labels) for n in ("a", "b")]
    config = bad_config(tmp_path, pairs, normalize={"mean": [0.5, 0.5], "std": [0.3, 0.3]})
    started = time.monotonic()
    code, _ = cli("train", str(config), "--no-progress")
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1 and line.startswith("raymask: error: epoch 1: the loss is nan"), line
    assert time.monotonic() - started < 60  # not retried: it cannot go better
    assert not (tmp_path / "out" / "model.pt").exists()


def test_evaluate_equals_a_direct_count(shipped_store, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store_path, _ = shipped_store("rgb-vegetation.yaml")  # a nodata collar: pixels the store does not predict
    store = MaskStore.open(store_path)
    mask = np.asarray(store.mask[:])
    classes = len(store.info.classes)
    rng = np.random.default_rng(1)
    truth = mask.copy()
    flip = rng.random(truth.shape) < 0.1
    truth[flip] = rng.integers(0, classes, flip.sum())
    with rasterio.open(store.info.source.paths[0]) as src:  # type: ignore[union-attr]
        profile = {"crs": src.crs, "transform": src.transform}
    labels = tmp_path / "truth.tif"
    with rasterio.open(labels, "w", driver="GTiff", height=truth.shape[0], width=truth.shape[1], count=1,
                       dtype="uint8", **profile) as dst:  # fmt: skip
        dst.write(truth[None])
    code, out = cli("evaluate", str(store_path), str(labels), "--json", "--no-progress")
    assert code == 0, out
    scored = json.loads(out)
    for k, name in enumerate(c.name for c in store.info.classes):
        tp = int(((truth == k) & (mask == k)).sum())
        fp = int(((truth != k) & (mask == k)).sum())
        fn = int(((truth == k) & (mask != k)).sum())
        row = scored["per_class"][name]
        assert row["pixels"] == tp + fn
        if tp + fp + fn:
            assert np.isclose(row["iou"], tp / (tp + fp + fn)) and np.isclose(row["precision"], tp / max(tp + fp, 1))
    labelled = truth < classes  # the collar's unflipped pixels stay 255 in the truth: ignored
    assert scored["pixels"] == int(labelled.sum())
    assert np.isclose(scored["accuracy"], float(((truth == mask) & labelled).sum() / labelled.sum()))
    unpredicted = labelled & (mask == 255)
    assert scored["unpredicted"] == int(unpredicted.sum()) > 0  # misses of their labelled class, in no column
    for k, name in enumerate(c.name for c in store.info.classes):
        assert scored["per_class"][name]["unpredicted"] == int((unpredicted & (truth == k)).sum())
    assert np.array(scored["confusion"]).sum() == int((labelled & (mask != 255)).sum())
    small = tmp_path / "small.tif"
    with rasterio.open(small, "w", driver="GTiff", height=10, width=10, count=1, dtype="uint8", **profile) as dst:
        dst.write(np.zeros((1, 10, 10), np.uint8))
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "evaluate", str(store_path), str(small)],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode != 0 and "small.tif" in result.stderr and "not on the store's grid" in result.stderr


def _train_process(config: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "train", str(config), "--json", "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            stdin=subprocess.DEVNULL)  # fmt: skip


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _epochs_done(folder: Path) -> int:
    import torch

    try:
        return int(torch.load(folder / "checkpoints" / "last.pt", weights_only=False)["epoch"])
    except Exception:
        return 0


@pytest.mark.slow  # two training runs, each in a Ray of its own
def test_training_survives_a_killed_worker_and_resumes_after_a_killed_driver(tmp_path: Path) -> None:
    """One run: after epoch 1 a Ray Train worker process is SIGKILLed (Ray Train restarts the workers from
    the checkpoint and the run goes on); an epoch later the driver and its Ray are. The same command again
    resumes from the checkpoint and ends with every epoch in the history."""
    config = polyp_config(tmp_path, epochs=6, steps=12)
    folder = tmp_path / "model"
    first = _train_process(config)
    try:
        _wait_for_epoch(folder, 1, first)
        victim = int((folder / "checkpoints" / "worker-1.pid").read_text())
        os.kill(victim, signal.SIGKILL)  # a Ray Train worker process, mid-epoch
        killed_at = _epochs_done(folder)
        deadline = time.monotonic() + 300
        while int((folder / "checkpoints" / "worker-1.pid").read_text()) == victim:  # a new worker takes over
            assert first.poll() is None, first.stderr.read() if first.stderr else ""
            assert time.monotonic() < deadline, "no worker replaced the killed one"
            time.sleep(0.2)
        _wait_for_epoch(folder, killed_at + 1, first)  # and the run goes on
        workers = [int(p.read_text()) for p in (folder / "checkpoints").glob("worker-*.pid")]
        os.killpg(first.pid, signal.SIGKILL)  # the driver and the Ray it started
        first.wait()
        deadline = time.monotonic() + 60
        while any(_alive(w) for w in workers):  # Ray's worker processes end once they find their raylet gone
            assert time.monotonic() < deadline, "training workers outlived their driver by a minute"
            time.sleep(0.1)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    done = _epochs_done(folder)
    assert killed_at < done < 6, (killed_at, done)
    second = _train_process(config)
    out, err = second.communicate(timeout=600)
    assert second.returncode == 0, err
    report = json.loads(out)
    assert report["resumed_from"] == done and report["epochs"] == 6
    assert [h["epoch"] for h in report["history"]] == [1, 2, 3, 4, 5, 6]


def _wait_for_epoch(folder: Path, epoch: int, run: subprocess.Popen) -> None:
    deadline = time.monotonic() + 400
    while _epochs_done(folder) < epoch:
        assert run.poll() is None, run.stderr.read() if run.stderr else ""
        assert time.monotonic() < deadline, f"epoch {epoch} never ended"
        time.sleep(0.2)


@pytest.mark.filterwarnings("ignore:The TorchScript type system")  # DynUNet's, harmless
@pytest.mark.parametrize(
    ("name", "channels"),
    [
        ("unet", [8, 16, 32]),
        ("basicunet", [8, 8, 16, 32, 64, 8]),
        ("segresnet", [8, 16, 32]),
        ("dynunet", [8, 16, 32]),
        ("deeplabv3", [8, 16, 32]),
    ],
)
@pytest.mark.parametrize("dims", [2, 3])
def test_every_network_builds_scripts_and_keeps_the_image_size(name: str, channels: list[int], dims: int) -> None:
    import torch

    from pipeline.config import TrainConfig
    from pipeline.jobs.train import build_network

    config = TrainConfig.model_validate({
        "pairs": [{"image": "a.tif", "labels": "b.tif"}], "classes": ["a", "b", "c"],
        "network": {"name": name, "channels": channels, "dims": dims}, "patch": 64 if dims == 2 else 16,
        "output": "x",
    })  # fmt: skip
    network = torch.jit.script(build_network(config, 2).eval())  # what the model folder holds
    stride = config.network.stride
    size = (2 * stride, 3 * stride) if dims == 2 else (stride, 2 * stride, stride)
    with torch.inference_mode():
        out = network(torch.zeros(1, 2, *size))
    assert tuple(out.shape) == (1, 3, *size)
    assert config.network.exact is (name != "deeplabv3")


@pytest.mark.parametrize("kind", ["torchscript", "torch-export", "onnx"])
def test_the_trained_network_is_saved_as_each_kind_and_loads_as_a_job_loads_it(kind: str, tmp_path: Path) -> None:
    import torch

    from pipeline.config import TrainConfig
    from pipeline.jobs.model_check import CONFIGS
    from pipeline.jobs.train import build_network, save_model
    from workers.models.network import _load

    config = TrainConfig.model_validate({
        "pairs": [{"image": "a.tif", "labels": "b.tif"}], "classes": ["a", "b", "c"],
        "network": {"channels": [4, 8, 16]}, "patch": 32, "export": kind, "output": "x",
    })  # fmt: skip
    torch.manual_seed(0)
    network = build_network(config, 2).eval()
    (tmp_path / "model.pt").write_bytes(b"stale")  # a file of another kind from an earlier run goes
    path = save_model(network, kind, tmp_path, 2, config.patch_shape)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    loaded, _, _ = _load(CONFIGS[kind](kind=kind, path=str(path), classes=["a", "b", "c"], dims=2, stride=4),
                             torch.device("cpu"))  # fmt: skip
    x = torch.randn(3, 2, 48, 80)  # another batch and size than the export's example
    with torch.inference_mode():
        assert torch.allclose(loaded(x), network(x), atol=1e-4)


def test_deeplab_with_a_time_budget_exports_and_runs_blended(ray_session, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """DeepLabV3+ (image pooling: global context) trained with balanced class weights and Dice, stopped by
    its time budget after the first epoch, exported with torch.export; the card and the run say blend."""
    config = polyp_config(
        tmp_path, network={"name": "deeplabv3", "channels": [8, 16, 32]}, epochs=5, steps=1, time_budget_s=0.001,
        loss={"dice": True, "class_weights": "balanced"}, export="torch-export", workers=1,
    )  # fmt: skip
    code, out = cli("train", str(config), "--json", "--no-progress")
    assert code == 0, out
    report = json.loads(out)
    assert [h["epoch"] for h in report["history"]] == [1]  # the budget ran out in epoch 1
    card = yaml.safe_load((tmp_path / "model" / "MODEL.yaml").read_text())
    assert card["kind"] == "torch-export" and card["weights"] == "model.pt2" and card["stitch"] == "blend"
    assert card["measured"]["receptive_radius"] is None  # one pixel changes every output: global
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({
        "source": {"path": str(POLYP / "images" / HELD_OUT)}, "model": {"card": str(tmp_path / "model" / "MODEL.yaml")},
        "tiling": {"chunk": 128, "halo": 32}, "output": {"path": str(tmp_path / "polyp.zarr")},
    }))  # fmt: skip
    code, out = cli("run", str(job), "--json", "--no-progress")
    assert code == 0, out
    assert str(json.loads(out)["stitch"]).startswith("blend")
