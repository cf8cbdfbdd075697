"""``raymask train CONFIG``: labelled pairs to a model folder that ``raymask run`` takes directly.

The driver reads and checks every pair through raymask's own readers (the same windows, nodata
masks and band selection inference uses; a DICOM series as ``raymask run`` reads it, with NIfTI or
DICOM SEG labels checked against its voxel grid), splits them by file, works out the normalisation,
and runs a Ray Train ``TorchTrainer`` (N data-parallel workers; a GPU each where asked). Each worker
reads the training files itself and draws patches on the stride grid (balanced toward rare classes
on request), augmented; rasters larger than ``in_memory_pixels`` are read window by window (each
patch, each validation tile), never whole. Rank 0 validates on the held-out files after every epoch
and writes the checkpoint (``checkpoints/last.pt``, atomically). A killed worker is restarted by Ray
Train from that checkpoint; a killed driver resumes from it on the next ``raymask train`` of the
same config.

The model kept is the epoch with the best validation score (mean Dice of the classes but the first),
as nnU-Net's and MONAI's recipes keep theirs. The model folder: the model (``model.pt`` TorchScript,
``model.pt2`` torch.export or ``model.onnx``; ``export`` in the config), ``MODEL.yaml`` (classes,
colours, bands, normalisation, stride, dims, the receptive radius ``raymask model check`` measured),
``train.yaml`` (the config), ``metrics.json`` (per epoch; per class IoU, Dice, precision, recall on
the validation files), ``loss.png``.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import ClassSpec, SourceConfig, TrainConfig
from pipeline.core.colors import rgb
from pipeline.core.geometry import Box
from pipeline.core.training import (
    IGNORE,
    augment,
    class_metrics,
    class_weights,
    confusion,
    label_classes,
    normalisation,
    patch_origins,
    split_by_file,
    unknown_ids,
)
from pipeline.errors import ConfigError, PermanentError, SourceError


class TrainingError(PermanentError):
    """Training cannot go on (a NaN loss, an empty split); the message names the epoch or the file."""


@dataclass
class Pair:
    image: str
    labels: str
    name: str


def resolve_pairs(config: TrainConfig) -> list[Pair]:
    pairs = [Pair(p.image, p.labels, Path(p.image).name) for p in config.pairs]
    if config.images and config.labels:
        found = sorted(glob.glob(config.images))
        if not found:
            raise SourceError(f"{config.images}: no image matches")
        for image in found:
            stem = Path(image).stem
            pairs.append(Pair(image, config.labels.format(stem=stem, name=Path(image).name), Path(image).name))
    for pair in pairs:
        if not Path(pair.image).exists():
            raise SourceError(f"{pair.image}: no such file or folder")
        if not Path(pair.labels).is_file():
            raise SourceError(f"{pair.labels}: no such file")
    return pairs


def is_series(path: str) -> bool:
    """A DICOM series: a folder, or a file with DICOM's preamble (PNG, JPEG, GeoTIFF are rasters)."""
    if Path(path).is_dir():
        return True
    with open(path, "rb") as handle:
        return handle.read(132)[128:132] == b"DICM"


def read_series(pair: Pair, config: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """A DICOM series as a (1, z, y, x) volume in HU (times ``scale``), slices ordered along the normal,
    and its labels (NIfTI or SEG) on the same voxels as class ids."""
    from pipeline.sources.dicom import decode_frames, discover
    from pipeline.sources.labels import open_volume_labels

    found, _ = discover([pair.image])
    if len(found) != 1:
        raise SourceError(f"{pair.image}: holds {len(found)} image series; give one series per pair")
    series = found[0]
    names = [c if isinstance(c, str) else c.name for c in config.classes]
    labels = open_volume_labels(pair.labels, series.geometry, names, series=pair.image)
    raw = labels.read((0, 0, 0), series.geometry.shape)
    ids = label_classes(raw, config.label_values, len(config.classes))
    refuse_unknown(ids, pair.labels, len(config.classes))
    volume = decode_frames(series.frames)[None] * np.float32(config.scale)
    return volume.astype(np.float32), ids


def refuse_unknown(ids: np.ndarray, path: str, classes: int) -> None:
    """One line naming the label file when it holds a value that is not a class id (nor IGNORE)."""
    unknown = unknown_ids(ids, classes)
    if unknown:
        shown = ", ".join(map(str, unknown[:5]))
        raise SourceError(
            f"{path}: label values {shown} are not class ids 0..{classes - 1} "
            "(declare the classes, or map values with label_values)"
        )


def as_samples(image: np.ndarray, ids: np.ndarray, dims: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """What the network trains and validates on: the image itself, or a volume's slices for a 2-D one
    (a 2-D image for a 3-D network is refused by the driver before anything is read)."""
    if ids.ndim == 3 and dims == 2:
        return [(image[:, k], ids[k]) for k in range(ids.shape[0])]
    return [(image, ids)]


class RasterPair:
    """An image raster and its label raster, opened through raymask's reader and checked to be on one
    grid; ``read(box)`` gives that window's values (times ``scale``, 0 where the image has no data) and
    class ids (IGNORE where the image has no data or the label says nothing), ids checked against the
    classes. Large files are trained on window by window through this, never read whole."""

    def __init__(self, pair: Pair, config: TrainConfig) -> None:
        from pipeline.sources.geotiff import open_source

        self.pair, self.config = pair, config
        self.source, info = open_source(SourceConfig(path=pair.image, bands=config.bands))
        self.labels, label_info = open_source(SourceConfig(path=pair.labels, bands=[1]))
        if label_info.shape != info.shape:
            raise SourceError(
                f"{pair.labels}: not on the grid of {pair.image} (shape {label_info.shape[0]} x "
                f"{label_info.shape[1]} vs {info.shape[0]} x {info.shape[1]})"
            )
        if label_info.georef.transform and info.georef.transform and label_info.georef != info.georef:
            raise SourceError(
                f"{pair.labels}: not on the grid of {pair.image} (transform {label_info.georef.transform} vs "
                f"{info.georef.transform}, same CRS: {label_info.georef.crs_wkt == info.georef.crs_wkt})"
            )
        self.shape: tuple[int, int] = (int(info.shape[0]), int(info.shape[1]))
        self.cache: dict[str, Any] = {}  # open datasets between reads (one thread reads a pair)

    def read(self, box: Box) -> tuple[np.ndarray, np.ndarray]:
        config = self.config
        import warnings

        from pipeline.sources.geotiff import WORKER_QUIET

        with warnings.catch_warnings():  # a cache's reads leave the filters to the caller (one thread here)
            for category in WORKER_QUIET:
                warnings.simplefilter("ignore", category)
            values, valid = self.source.read(box, cache=self.cache)
            raw_labels, labelled = self.labels.read(box, cache=self.cache)
        ids = label_classes(raw_labels[0], config.label_values, len(config.classes))
        refuse_unknown(ids[labelled], self.pair.labels, len(config.classes))
        ids[~(valid & labelled)] = IGNORE
        image = values.astype(np.float32) * np.float32(config.scale)
        image[:, ~valid] = 0
        return image, ids

    def blocks(self, side: int) -> list[Box]:
        rows, cols = self.shape
        return [Box((r, c), (min(r + side, rows), min(c + side, cols)))
                for r in range(0, rows, side) for c in range(0, cols, side)]  # fmt: skip


def read_pair(pair: Pair, config: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """(bands, h, w) float32 raw values (times ``scale``) and (h, w) class ids (``RasterPair``), the
    whole file; a DICOM series gives (1, z, y, x) and (z, y, x) (``read_series``)."""
    if is_series(pair.image):
        return read_series(pair, config)
    raster = RasterPair(pair, config)
    return raster.read(Box((0, 0), raster.shape))


def config_fingerprint(config: TrainConfig) -> str:
    """What a checkpoint must agree with to be resumed: everything but the run's length."""
    kept = config.model_dump(mode="json", exclude={"epochs", "time_budget_s", "workers", "gpu", "band_names", "name"})
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


def build_network(config: TrainConfig, bands: int) -> Any:
    """The network named in the config, 2-D or 3-D, ``bands`` in, one output per class."""
    from monai.networks import nets

    spec, classes, dims = config.network, len(config.classes), config.network.dims
    norm: Any = {"batch": "batch", "instance": "instance", "group": ("group", {"num_groups": 1})}[spec.norm]
    levels = len(spec.channels)
    if spec.name == "unet":
        return nets.UNet(dims, bands, classes, channels=tuple(spec.channels), strides=(2,) * (levels - 1),
                         num_res_units=1, norm=norm)  # fmt: skip
    if spec.name == "basicunet":
        if levels != 6:
            raise ConfigError("network.channels: BasicUNet takes 6 feature counts, e.g. [16, 16, 32, 64, 128, 16]")
        return nets.BasicUNet(dims, bands, classes, features=tuple(spec.channels), norm=norm)
    if spec.name == "segresnet":
        return nets.SegResNet(dims, init_filters=spec.channels[0], in_channels=bands, out_channels=classes,
                              blocks_down=(1,) * levels, blocks_up=(1,) * (levels - 1), norm=norm)  # fmt: skip
    if spec.name == "deeplabv3":
        from workers.models.deeplab import DeepLabV3

        return DeepLabV3(dims, bands, classes, channels=tuple(spec.channels), norm=spec.norm)
    kernels = [[3] * dims] * levels
    strides = [[1] * dims] + [[2] * dims] * (levels - 1)
    return nets.DynUNet(dims, bands, classes, kernel_size=kernels, strides=strides, upsample_kernel_size=strides[1:],
                        filters=list(spec.channels), norm_name=norm)  # fmt: skip


def predict(network: Any, image: np.ndarray, stride: int, device: Any = "cpu") -> tuple[np.ndarray, Any]:
    """Class ids (numpy) and logits (a tensor on ``device``) of a whole normalised (bands, h, w) image
    or (bands, d, h, w) volume, padded to the stride."""
    import torch

    spatial = image.shape[1:]
    padded = np.pad(image, [(0, 0)] + [(0, -n % stride) for n in spatial], mode="reflect")
    with torch.inference_mode():
        logits = network(torch.from_numpy(np.ascontiguousarray(padded[None])).to(device))[0]
        logits = logits[(slice(None), *(slice(0, n) for n in spatial))]
    return logits.argmax(0).cpu().numpy().astype(np.uint8), logits


# ---------------------------------------------------------------------------------------------------
# The loop each Ray Train worker runs


def _loop(settings: dict[str, Any]) -> None:
    import ray.train
    import torch

    config = TrainConfig.model_validate(settings["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    out = Path(settings["output"])
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    (out / "checkpoints" / f"worker-{rank}.pid").write_text(str(os.getpid()))
    torch.manual_seed(config.seed + rank)
    if not config.gpu:
        torch.set_num_threads(max(1, int(settings["threads"])))
    pairs = {name: Pair(image, labels, name) for name, (image, labels) in settings["pairs"].items()}
    data = _samples(pairs, settings["training"], config, settings)
    validation = _samples(pairs, settings["validation"], config, settings) if rank == 0 else []
    classes, stride, shape = len(config.classes), int(settings["stride"]), config.patch_shape
    device = ray.train.torch.get_device() if config.gpu else torch.device("cpu")
    network = build_network(config, len(settings["mean"])).to(device)
    optimiser = torch.optim.Adam(network.parameters(), lr=config.learning_rate)
    weights = (
        torch.tensor(settings["class_weights"], dtype=torch.float32, device=device)
        if settings["class_weights"]
        else None
    )

    def ce(logits: Any, target: Any) -> Any:
        return cross_entropy(logits, target, weights)

    history: list[dict[str, Any]] = []
    start = 0
    checkpoint = out / "checkpoints" / "last.pt"
    if checkpoint.is_file():  # a restarted worker group, or a new run of the same config
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        if state["fingerprint"] == settings["fingerprint"]:
            network.load_state_dict(state["network"])
            optimiser.load_state_dict(state["optimiser"])
            history, start = state["history"], state["epoch"]
    model = ray.train.torch.prepare_model(network) if world > 1 else network
    began = time.monotonic() - sum(h["seconds"] for h in history)
    for epoch in range(start, config.epochs):
        clock = time.monotonic()
        rng = np.random.default_rng([config.seed, rank, epoch])  # the same patches after a resume
        model.train()
        losses = []
        for _ in range(config.steps):
            xs, ys = [], []
            for _ in range(config.batch):
                sample = data[int(rng.integers(len(data)))]
                if isinstance(sample, WindowedSample):
                    x, y = sample.patch(shape, stride, rng, config.balance, classes)
                else:
                    image, ids = sample
                    balance = ids if config.balance else None
                    (corner,) = patch_origins(ids.shape, shape, stride, 1, rng, balance, classes)
                    window = tuple(slice(a, a + p) for a, p in zip(corner, shape, strict=True))
                    x, y = image[(slice(None), *window)], ids[window]
                x, y = augment(x, y, rng, flips=config.augment.flips, rot90=config.augment.rot90,
                               jitter=config.augment.intensity, per_band=config.augment.intensity_per_band)  # fmt: skip
                xs.append(x)
                ys.append(y)
            x_t = torch.from_numpy(np.stack(xs)).to(device)
            y_t = torch.from_numpy(np.stack(ys).astype(np.int64)).to(device)
            logits = model(x_t)
            loss = ce(logits, y_t)
            if config.loss.dice:
                loss = loss + _soft_dice(logits, y_t, classes)
            if _agree(not bool(torch.isfinite(loss)), world, device):  # every worker stops, or none
                (out / "checkpoints" / "failed.txt").write_text(
                    f"epoch {epoch + 1}: the loss is {loss.item()} (NaN or infinite): check the images for NaN or "
                    "huge values without nodata, or lower learning_rate"
                )
                return  # not an exception: Ray Train would retry what cannot go better
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(float(loss.item()))
        record: dict[str, Any] = {"epoch": epoch + 1, "loss": float(np.mean(losses))}
        if rank == 0:
            network.eval()
            matrix, val_loss = score(network, validation, stride, classes, device, ce)
            per_class = class_metrics(matrix)
            record["val_loss"] = val_loss
            record["val_dice"] = {c: m["dice"] for c, m in zip(settings["class_names"], per_class, strict=True)}
            record["val_iou"] = {c: m["iou"] for c, m in zip(settings["class_names"], per_class, strict=True)}
            record["score"] = validation_score(per_class)
        record["seconds"] = time.monotonic() - clock
        history.append(record)
        stop = config.time_budget_s is not None and time.monotonic() - began > config.time_budget_s
        owner = out / "checkpoints" / "owner"
        if owner.is_file() and owner.read_text() != settings["token"]:
            return  # a newer run of this config owns the folder: this is a leftover of a killed one
        if rank == 0:
            state = {"network": network.state_dict(), "optimiser": optimiser.state_dict(), "history": history,
                     "epoch": epoch + 1, "fingerprint": settings["fingerprint"], "stopped": stop}  # fmt: skip
            best = max((h["score"] for h in history[:-1] if h.get("score") is not None), default=None)
            if best is None or record["score"] > best:  # the model kept: the best epoch on the held-out files
                partial = checkpoint.with_name("best.partial")
                torch.save({"network": network.state_dict(), "epoch": epoch + 1, "confusion": matrix.tolist()}, partial)
                os.replace(partial, checkpoint.with_name("best.pt"))
            partial = checkpoint.with_suffix(".partial")
            torch.save(state, partial)
            os.replace(partial, checkpoint)  # last: a resume sees best.pt as of this epoch or later
        ray.train.report({k: v for k, v in record.items() if not isinstance(v, dict)})
        if _agree(stop, world, device):  # every worker stops together
            break


def _samples(pairs: dict[str, Pair], names: list[str], config: TrainConfig, settings: dict[str, Any]) -> list[Any]:
    """The named files read, normalised and cut into what the network takes (``as_samples``); files
    larger than ``in_memory_pixels`` as ``WindowedSample``, read window by window."""
    out: list[Any] = []
    for name in names:
        if name in settings.get("windowed", {}):
            out.append(WindowedSample(RasterPair(pairs[name], config), settings["windowed"][name], settings))
            continue
        image, ids = read_pair(pairs[name], config)
        out.extend(as_samples(normalised(image, settings), ids, config.network.dims))
    return out


def normalised(image: np.ndarray, settings: dict[str, Any]) -> np.ndarray:
    axes = (-1,) + (1,) * (image.ndim - 1)
    mean = np.asarray(settings["mean"], np.float32).reshape(axes)
    std = np.asarray(settings["std"], np.float32).reshape(axes)
    return (image - mean) / std


def validation_score(per_class: list[dict[str, Any]]) -> float:
    """What picks the model kept: the mean Dice of the classes after the first (the background), or of
    every class when there are two or fewer with a Dice; an undefined Dice counts 0."""
    dice = [float(m["dice"] or 0.0) for m in per_class]
    return float(np.mean(dice[1:] if len(dice) > 1 else dice))


def _agree(flag: bool, world: int, device: Any) -> bool:
    """True on every worker if it is true on any (data-parallel workers must leave a loop together)."""
    if world == 1:
        return flag
    import torch

    value = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


def cross_entropy(logits: Any, target: Any, weights: Any = None) -> Any:
    """Pixel-wise cross-entropy over the labelled pixels (IGNORE left out), weighted per class as
    torch's mean is; 0 (still part of the graph) for a batch without a labelled pixel, where torch's
    mean would be NaN (a patch wholly in a nodata collar) and stop the run."""
    import torch

    per_pixel = torch.nn.functional.cross_entropy(logits, target, weight=weights, ignore_index=IGNORE, reduction="none")
    valid = target != IGNORE
    if weights is None:
        total = valid.sum().to(per_pixel.dtype)
    else:
        total = (weights[target.clamp(max=len(weights) - 1)] * valid).sum()
    return per_pixel.sum() / total.clamp(min=1e-12)


def _soft_dice(logits: Any, target: Any, classes: int) -> Any:
    import torch

    probs = torch.softmax(logits, 1)
    valid = (target != IGNORE).unsqueeze(1)
    onehot = torch.nn.functional.one_hot(target.clamp(max=classes - 1), classes).permute(0, 3, 1, 2) * valid
    probs = probs * valid
    inter = (probs * onehot).sum((0, 2, 3))
    total = probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    return 1 - ((2 * inter + 1) / (total + 1)).mean()


# ---------------------------------------------------------------------------------------------------
# Files too large to hold: read window by window

BLOCK = 512  # the side of the blocks the driver scans and balanced sampling draws from
TILE = 1024  # the core of a validation tile on a windowed file
TILE_HALO = 64  # its context on each side (rounded up to the stride)


class Scan:
    """Running per-band sums over the valid pixels of the training files (for the normalisation) and
    class pixel counts, fed whole images or blocks."""

    def __init__(self, classes: int) -> None:
        self.n = classes
        self.sums: np.ndarray | None = None
        self.squares: np.ndarray | None = None
        self.counts = 0
        self.classes = np.zeros(classes, dtype=np.int64)

    def add(self, image: np.ndarray, ids: np.ndarray, *, training: bool) -> list[int]:
        valid = ids != IGNORE
        found = np.bincount(ids[valid].ravel(), minlength=self.n)[: self.n]
        if training:
            flat = image[:, valid].astype(np.float64)
            self.sums = flat.sum(1) + (0 if self.sums is None else self.sums)
            self.squares = (flat**2).sum(1) + (0 if self.squares is None else self.squares)
            self.counts += int(valid.sum())
            self.classes += found
        return [int(v) for v in found]


class WindowedSample:
    """A raster larger than ``in_memory_pixels``: each patch is one window read (the corner drawn as
    for a whole image, so the same seed gives the same patches either way); balanced patches draw a
    class, then a block in proportion to its pixels of the class (``draw_block``), then a pixel of it."""

    def __init__(self, raster: RasterPair, counts: list[list[int]], settings: dict[str, Any]) -> None:
        self.raster, self.settings = raster, settings
        self.counts = np.asarray(counts, dtype=np.int64)
        self.boxes = raster.blocks(BLOCK)

    @property
    def shape(self) -> tuple[int, int]:
        return self.raster.shape

    def read(self, box: Box) -> tuple[np.ndarray, np.ndarray]:
        image, ids = self.raster.read(box)
        return normalised(image, self.settings), ids

    def patch(
        self, sizes: tuple[int, ...], stride: int, rng: np.random.Generator, balance: bool, classes: int
    ) -> tuple[np.ndarray, np.ndarray]:
        from pipeline.core.training import corner_around, draw_block

        drawn = draw_block(self.counts, rng) if balance else None
        if drawn is None:
            (corner,) = patch_origins(self.shape, sizes, stride, 1, rng)
        else:
            k, index = drawn
            box = self.boxes[index]
            _, ids = self.raster.read(box)
            where = np.flatnonzero(ids == k)
            row, col = np.unravel_index(int(where[int(rng.integers(len(where)))]), ids.shape)
            pixel = (int(row) + box.start[0], int(col) + box.start[1])
            corner = corner_around(pixel, self.shape, sizes, stride, rng)
        return self.read(Box(corner, tuple(a + p for a, p in zip(corner, sizes, strict=True))))

    def tiles(self, stride: int) -> list[tuple[Box, Box]]:
        """(read box, core box) of each validation tile: cores on the stride grid, context clipped to the image."""
        halo = -(-TILE_HALO // stride) * stride
        rows, cols = self.shape
        out = []
        for core in self.raster.blocks(TILE):
            start = tuple(max(0, a - halo) for a in core.start)
            stop = (min(rows, core.stop[0] + halo), min(cols, core.stop[1] + halo))
            out.append((Box(start, stop), core))
        return out


def score(
    network: Any, samples: list[Any], stride: int, classes: int, device: Any = "cpu", loss: Any = None
) -> tuple[np.ndarray, float | None]:
    """The confusion matrix of ``network`` on validation samples (whole images, volumes, or windowed
    rasters tile by tile, each tile's context cut off) and the mean of ``loss`` over them."""
    import torch

    matrix = np.zeros((classes, classes), dtype=np.int64)
    losses: list[float] = []
    weights: list[int] = []

    def add(predicted: np.ndarray, logits: Any, ids: np.ndarray) -> None:
        nonlocal matrix
        matrix += confusion(predicted, ids, classes)
        labelled = int((ids != IGNORE).sum())
        if loss is not None and labelled:
            truth = torch.from_numpy(ids[None].astype(np.int64)).to(device)
            with torch.inference_mode():
                losses.append(float(loss(logits[None], truth)))
            weights.append(labelled)

    for sample in samples:
        if isinstance(sample, WindowedSample):
            for read, core in sample.tiles(stride):
                image, ids = sample.read(read)
                predicted, logits = predict(network, image, stride, device)
                inside = tuple(
                    slice(c0 - r0, c1 - r0) for c0, c1, r0 in zip(core.start, core.stop, read.start, strict=True)
                )
                add(predicted[inside], logits[(slice(None), *inside)], ids[inside])
        else:
            image, ids = sample
            predicted, logits = predict(network, image, stride, device)
            add(predicted, logits, ids)
    mean = float(np.average(losses, weights=weights)) if losses else None
    return matrix, mean


# ---------------------------------------------------------------------------------------------------
# The driver


def run_training(config: TrainConfig, *, address: str | None = None, progress: bool = True) -> dict[str, Any]:
    pairs = [Pair(str(Path(p.image).absolute()), str(Path(p.labels).absolute()), p.name) for p in resolve_pairs(config)]
    names = [p.name for p in pairs]
    if len(set(names)) != len(names):
        raise ConfigError("two images share a file name; give them distinct names")
    unknown = [f for f in config.validation.files if f not in names]
    if unknown:
        raise ConfigError(f"validation.files: {unknown[0]} is not among the images")
    training, validation = split_by_file(names, config.validation.fraction, config.seed, config.validation.files)
    if not training or not validation:
        side = "training" if not training else "validation"
        raise TrainingError(
            f"the {side} split is empty ({len(names)} labelled image{'s' if len(names) != 1 else ''}): "
            "training and validation need at least one file each"
        )
    classes = len(config.classes)
    stride = config.network.stride
    by_name = {p.name: p for p in pairs}
    scan = Scan(classes)
    windowed: dict[str, list[list[int]]] = {}
    for name in [*training, *validation]:  # every file checked before any training
        pair = by_name[name]
        raster = None if is_series(pair.image) else RasterPair(pair, config)
        if raster is not None and config.network.dims == 3:
            raise ConfigError(f"{pair.image}: a 2-D image; network.dims 3 trains on volumes (DICOM series)")
        if raster is not None and raster.shape[0] * raster.shape[1] > config.in_memory_pixels:
            shape: tuple[int, ...] = raster.shape
            block_counts = []
            for box in raster.blocks(BLOCK):  # one block in memory at a time
                image, ids = raster.read(box)
                block_counts.append(scan.add(image, ids, training=name in training))
            windowed[name] = block_counts
        else:
            image, ids = read_pair(pair, config)
            samples = as_samples(image, ids, config.network.dims)
            shape = samples[0][1].shape
            scan.add(image, ids, training=name in training)
        if name in training and any(n < p for n, p in zip(shape, config.patch_shape, strict=True)):
            raise SourceError(
                f"{pair.image}: {' x '.join(map(str, shape))} is smaller than patch "
                f"{' x '.join(map(str, config.patch_shape))}"
            )
    sums, squares, counts, pixel_counts = scan.sums, scan.squares, scan.counts, scan.classes
    if config.normalize is not None:
        mean, std = list(config.normalize.mean), list(config.normalize.std)
    else:
        mean, std = normalisation(sums, squares, np.full(len(sums), counts))  # type: ignore[arg-type]
    if isinstance(config.loss.class_weights, list):
        weights: list[float] | None = list(config.loss.class_weights)
    elif config.loss.class_weights == "balanced":
        weights = [float(w) for w in class_weights(pixel_counts)]
    else:
        weights = None
    out = Path(config.output).absolute()
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = config_fingerprint(config)
    resumed = _resume_point(out, fingerprint)
    class_names = [c if isinstance(c, str) else c.name for c in config.classes]
    settings = {
        "config": config.model_dump(mode="json"), "output": str(out), "training": training, "validation": validation,
        "mean": mean, "std": std, "stride": stride, "class_weights": weights, "fingerprint": fingerprint,
        "class_names": class_names, "threads": max(1, (os.cpu_count() or 1) // config.workers),
        "pairs": {p.name: (p.image, p.labels) for p in pairs},  # absolute: workers start elsewhere
        "windowed": windowed,  # files read window by window: their class pixels per block
        "token": os.urandom(8).hex(),
    }  # fmt: skip
    from pipeline.jobs.cluster import connect

    # Ray Train's controller looks at its workers every 2 s by default: seconds lost at the start and the end
    # of every run. A Ray this command starts (not a cluster's) inherits the shorter interval.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    connect(address, progress=progress)
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    (out / "checkpoints").mkdir(exist_ok=True)
    (out / "checkpoints" / "failed.txt").unlink(missing_ok=True)
    (out / "checkpoints" / "owner").write_text(str(settings["token"]))  # workers of a killed run stop writing
    trainer = TorchTrainer(
        _loop,
        train_loop_config=settings,
        scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=config.gpu, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(
            name=f"raymask-train-{fingerprint}",
            storage_path=str(out / "ray"),
            failure_config=FailureConfig(max_failures=3),
        ),
    )
    monitor = _Progress(out, config.epochs, resumed, enabled=progress)
    monitor.start()
    try:
        trainer.fit()
    except Exception as exc:
        failed = out / "checkpoints" / "failed.txt"
        if failed.is_file():
            raise TrainingError(failed.read_text().strip()) from None
        raise TrainingError(f"training failed: {_worker_error(exc)}") from exc
    finally:
        monitor.stop()
    failed = out / "checkpoints" / "failed.txt"
    if failed.is_file():
        raise TrainingError(failed.read_text().strip())
    return finish(config, out, settings, resumed)


def _worker_error(exc: BaseException) -> str:
    """The worker's own one-line error out of Ray Train's report (its last ``Error: message`` line)."""
    import re

    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in reversed(lines):
        found = re.match(r"^(?:[\w.]+\.)?(\w*(?:Error|Exception)): (.+)$", line)
        if found:
            return found.group(2)
    return lines[0] if lines else type(exc).__name__


def _resume_point(out: Path, fingerprint: str) -> int:
    import torch

    checkpoint = out / "checkpoints" / "last.pt"
    if not checkpoint.is_file():
        return 0
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    if state.get("fingerprint") != fingerprint:
        raise ConfigError(
            f"{out}: holds the checkpoint of a training run with another config; give another output, "
            "or delete its checkpoints/ to start over"
        )
    return int(state["epoch"])


class _Progress:
    """A bar over epochs, with the loss and validation Dice, read from the checkpoint rank 0 writes."""

    def __init__(self, out: Path, epochs: int, done: int, *, enabled: bool) -> None:
        import threading

        self.out, self.epochs, self.done, self.enabled = out, epochs, done, enabled
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        if self.enabled:
            self.thread.start()

    def stop(self) -> None:
        self.stopped.set()
        if self.thread.is_alive():
            self.thread.join(timeout=5)

    def _run(self) -> None:
        import sys

        from tqdm import tqdm

        bar = tqdm(total=self.epochs, initial=self.done, desc="train", unit="epoch", file=sys.stderr)
        path, seen = self.out / "checkpoints" / "last.pt", None
        while not self.stopped.wait(1.0):
            try:
                stamp = path.stat().st_mtime_ns
            except OSError:
                continue
            if stamp == seen:
                continue
            seen = stamp
            try:
                import torch

                state = torch.load(path, map_location="cpu", weights_only=False)
            except Exception:  # being replaced
                continue
            last = state["history"][-1]
            dice = last.get("val_dice") or {}
            shown = " ".join(f"{k} {v:.3f}" for k, v in dice.items() if v is not None)
            bar.set_postfix_str(f"loss {last['loss']:.3f}" + (f" val Dice {shown}" if shown else ""))
            bar.update(state["epoch"] - bar.n)
        bar.close()


def finish(config: TrainConfig, out: Path, settings: dict[str, Any], resumed: int) -> dict[str, Any]:
    """From the best checkpoint: the model file (``save_model``), its card (with the measured radius), the
    validation metrics per class of the kept epoch (as rank 0 scored it), the loss curve, the config."""
    import torch
    import yaml

    from pipeline.card import CARD_NAME
    from pipeline.jobs.model_check import run_check

    state = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    best = torch.load(out / "checkpoints" / "best.pt", map_location="cpu", weights_only=False)
    network = build_network(config, len(settings["mean"]))
    network.load_state_dict(best["network"])
    network.eval()
    weights = save_model(network, config.export, out, len(settings["mean"]), config.patch_shape)
    classes = []
    palette = ["#303030", "#ff3b30", "#34c759", "#007aff", "#ffcc00", "#af52de", "#5ac8fa", "#ff9500"]
    for i, c in enumerate(config.classes):
        spec = c if isinstance(c, ClassSpec) else ClassSpec(name=c)
        colour = spec.color or palette[i % len(palette)]
        rgb(colour)  # a colour raymask reads
        classes.append({"name": spec.name, "color": colour})
    stride = int(settings["stride"])
    volumes = any(is_series(image) for image, _ in settings["pairs"].values())
    default = ["HU"] if volumes else [f"band {b}" for b in (config.bands or range(1, len(settings["mean"]) + 1))]
    bands = config.band_names or default
    card = {
        "name": config.name,
        "description": f"trained by raymask train ({config.network.name}, epoch {best['epoch']} of {state['epoch']}, "
        "the best on the validation files)",
        "kind": config.export, "weights": weights.name, "classes": classes, "bands": bands,
        "scale": config.scale, "normalize": {"mean": settings["mean"], "std": settings["std"]},
        "stride": stride, "dims": config.network.dims, "stitch": "exact" if config.network.exact else "blend",
    }  # fmt: skip
    (out / CARD_NAME).write_text(yaml.safe_dump(card, sort_keys=False))
    run_check(str(out / CARD_NAME), write=True)
    written = yaml.safe_load((out / CARD_NAME).read_text())
    written["receptive_radius"] = (written.get("measured") or {}).get("receptive_radius")
    (out / CARD_NAME).write_text(yaml.safe_dump(written, sort_keys=False))
    (out / "train.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    matrix = np.asarray(best["confusion"], dtype=np.int64)  # the kept epoch's validation, as rank 0 scored it
    metrics = {
        "per_class": dict(zip(settings["class_names"], class_metrics(matrix), strict=True)),
        "confusion": matrix.tolist(),
    }
    report = {
        "model": str(weights), "card": str(out / CARD_NAME), "epochs": state["epoch"], "resumed_from": resumed,
        "best_epoch": best["epoch"],
        "training": settings["training"], "validation": settings["validation"], "normalize": card["normalize"],
        "receptive_radius": written["receptive_radius"], "stride": stride, "history": state["history"],
        "classes": metrics,
    }  # fmt: skip
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    loss_curve(state["history"], out / "loss.png", dice=config.loss.dice)
    return report


MODEL_FILES = {"torchscript": "model.pt", "torch-export": "model.pt2", "onnx": "model.onnx"}


def save_model(network: Any, kind: str, out: Path, bands: int, patch: tuple[int, ...]) -> Path:
    """The network as the file ``raymask run`` loads (TorchScript, torch.export or ONNX), batch and
    spatial sizes left free, written beside its card atomically; files of the other kinds removed."""
    import warnings

    import torch

    path = out / MODEL_FILES[kind]
    partial = path.with_name(f"{path.stem}.partial{path.suffix}")  # the exporters look at the suffix
    network = network.eval()
    example = torch.zeros((2, bands, *patch))
    axes = dict.fromkeys(range(example.ndim), torch.export.Dim.AUTO)
    axes.pop(1)  # the bands are fixed
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The TorchScript type system")  # DynUNet's annotations: harmless
        if kind == "torchscript":
            torch.jit.save(torch.jit.script(network), str(partial))
        elif kind == "torch-export":
            torch.export.save(torch.export.export(network, (example,), dynamic_shapes=(axes,)), str(partial))
        else:
            try:
                import onnxscript  # noqa: F401  (the exporter needs it)
            except ImportError as exc:
                raise ConfigError("export: onnx needs the onnx extra (pip install 'raymask[onnx]')") from exc
            warnings.simplefilter("ignore")  # the exporter's progress and deprecation notes
            import logging

            logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" notes
            torch.onnx.export(network, (example,), str(partial), dynamo=True, input_names=["x"],
                              dynamic_shapes=(axes,), verbose=False, external_data=False)  # fmt: skip
    os.replace(partial, path)
    for other in MODEL_FILES.values():
        if other != path.name:
            (out / other).unlink(missing_ok=True)
    return path


def loss_curve(
    history: list[dict[str, Any]], path: Path, size: tuple[int, int] = (640, 360), *, dice: bool = False
) -> None:
    """Training and validation loss per epoch as a PNG (drawn with Pillow; no plotting library)."""
    from PIL import Image, ImageDraw

    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 60, width - 20, 30, height - 40
    trained = "training loss (cross-entropy + Dice)" if dice else "training loss (cross-entropy)"
    series = {trained: [h["loss"] for h in history], "validation cross-entropy": [h.get("val_loss") for h in history]}
    values = [v for s in series.values() for v in s if v is not None and np.isfinite(v)]
    high = max(values) if values else 1.0
    draw.rectangle([left, top, right, bottom], outline="black")
    for i in range(5):
        y = bottom - (bottom - top) * i / 4
        draw.text((5, y - 6), f"{high * i / 4:.3f}", fill="black")
    n = max(1, len(history) - 1)
    colours = dict(zip(series, [(0, 90, 200), (220, 60, 40)], strict=True))
    for k, (label, points) in enumerate(series.items()):
        xy = [(left + (right - left) * i / n, bottom - (bottom - top) * v / max(high, 1e-12))
              for i, v in enumerate(points) if v is not None]  # fmt: skip
        if len(xy) > 1:
            draw.line(xy, fill=colours[label], width=2)
        for x, y in xy:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colours[label])
        draw.text((left + 10 + 260 * k, 8), label, fill=colours[label])
    draw.text((left, bottom + 10), f"epochs 1..{len(history)}", fill="black")
    image.save(path)
