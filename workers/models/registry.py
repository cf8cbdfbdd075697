"""The model registry: what each ``model.kind`` is, checked on the driver, built in the actors.

``describe`` runs on the driver and loads no weights: it checks band positions and files and
hashes the model's identity. ``build`` runs once per actor.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pipeline.config import (
    HuTissueModelConfig,
    ModelConfig,
    NdviModelConfig,
    NetworkModelConfig,
    OnnxModelConfig,
    RgbVegetationModelConfig,
)
from pipeline.core.colors import default_color
from pipeline.errors import ConfigError, ModelError


class Segmenter(Protocol):
    def predict(self, images: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """``(N, bands, H, W)`` values (any dtype) and ``(N, H, W)`` validity -> ``(N, H, W)`` uint8 class ids.

        Models that can overlap batches (on a GPU) also offer ``launch(images, valid)``, which takes
        lists of windows and returns a callable that waits for the labels.
        """
        ...


@dataclass(frozen=True)
class ModelSpec:
    """What the driver needs to know about a model without loading it."""

    kind: str
    classes: tuple[tuple[str, str], ...]  # (name, #rrggbb)
    stride: int
    receptive_radius: int | None  # None: unknown, so no tiling can be promised exact
    identity: str
    dims: int | None = None  # spatial dimensions the network takes; None: per pixel, any
    mixed_precision: bool = False  # autocast: tiles and whole image may round differently
    fixed_window: tuple[int, ...] | None = None  # an ONNX graph exported with a fixed spatial input size
    codes: tuple[tuple[str, dict[str, Any]], ...] = ()  # (class name, {category, type}) the config codes

    @property
    def pixelwise(self) -> bool:
        return self.receptive_radius == 0

    def exact_with(self, halo: int) -> bool:
        return self.receptive_radius is not None and halo >= self.receptive_radius and not self.mixed_precision


def describe(config: ModelConfig, n_bands: int) -> ModelSpec:
    from workers.models.indices import HU_COLORS, NDVI_CLASSES, RGB_CLASSES

    if isinstance(config, HuTissueModelConfig):
        if n_bands != 1:
            raise ConfigError(f"model.kind hu-tissue takes one band of HU values; the source has {n_bands}")
        classes = tuple((name, HU_COLORS[i % len(HU_COLORS)]) for i, name in enumerate(config.classes))
        return ModelSpec("hu-tissue", classes, 1, 0, _config_hash(config))
    if isinstance(config, NdviModelConfig):
        _check_positions(config, n_bands, red=config.red, nir=config.nir)
        return ModelSpec("ndvi", NDVI_CLASSES, 1, 0, _config_hash(config))
    if isinstance(config, RgbVegetationModelConfig):
        _check_positions(config, n_bands, red=config.red, green=config.green, blue=config.blue)
        return ModelSpec("rgb-vegetation", RGB_CLASSES, 1, 0, _config_hash(config))
    return _describe_network(config, n_bands)


def build(config: ModelConfig, *, device: str = "cpu", in_flight: int = 2) -> Segmenter:
    if isinstance(config, NdviModelConfig):
        from workers.models.indices import NdviModel

        return NdviModel(config)
    if isinstance(config, RgbVegetationModelConfig):
        from workers.models.indices import RgbVegetationModel

        return RgbVegetationModel(config)
    if isinstance(config, HuTissueModelConfig):
        from workers.models.indices import HuTissueModel

        return HuTissueModel(config)
    from workers.models.network import NetworkModel

    return NetworkModel(config, device=device, in_flight=in_flight)


def _describe_network(config: NetworkModelConfig, n_bands: int) -> ModelSpec:
    path = Path(config.path)
    if config.kind == "monai-bundle":
        path = _bundle_weights(config, n_bands)
    elif not path.is_file():
        raise ModelError(f"{config.path}: model file not found")
    if config.normalize is not None and len(config.normalize.mean) != n_bands:
        raise ConfigError(
            f"model.normalize: {len(config.normalize.mean)} values given but the source has {n_bands} selected bands"
        )
    _check_archive(config)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    classes = tuple(
        (c, default_color(i)) if isinstance(c, str) else (c.name, c.color or default_color(i))
        for i, c in enumerate(config.classes)
    )
    if len(classes) > 255:
        raise ConfigError(f"model.classes: {len(classes)} classes, at most 255 fit a uint8 mask with 255 as nodata")
    settings = _config_hash(config.model_copy(update={"path": ""}))
    identity = f"{digest[:16]}-{settings}"
    fixed = None
    if isinstance(config, OnnxModelConfig):
        from workers.models.onnx import input_shape

        fixed = _check_onnx_input(config, input_shape(config.path), n_bands)
    return ModelSpec(
        config.kind,
        classes,
        config.stride,
        config.receptive_radius,
        identity,
        dims=config.dims,
        mixed_precision=config.precision != "float32",
        fixed_window=fixed,
        codes=tuple(
            (c.name, c.code.model_dump()) for c in config.classes if not isinstance(c, str) and c.code is not None
        ),
    )


def _bundle_weights(config: NetworkModelConfig, n_bands: int) -> Path:
    """The bundle's weights file (models/model.ts, else models/model.pt), its network config and its
    input channels checked on the driver; returns the weights (hashed into the model's identity)."""
    from pipeline.card import bundle_config, bundle_in_channels

    folder = Path(config.path)
    if not folder.is_dir():
        raise ModelError(f"{config.path}: not a MONAI bundle folder")
    weights = next((folder / "models" / n for n in ("model.ts", "model.pt") if (folder / "models" / n).is_file()), None)
    if weights is None:
        raise ModelError(
            f"{config.path}: the bundle has no weights (models/model.ts or models/model.pt); nothing is downloaded"
        )
    if weights.suffix == ".pt" and not bundle_config(folder):
        raise ModelError(
            f"{config.path}: the bundle has weights but no configs/inference.json or .yaml to build its network"
        )
    channels = bundle_in_channels(folder)
    if channels is not None and channels != n_bands:
        raise ModelError(
            f"{config.path}: the bundle's network takes {channels} input channels, the job gives it {n_bands}"
        )
    return weights


def _check_archive(config: NetworkModelConfig) -> None:
    """On the driver, before any store: is the file the kind of archive its kind says? (TorchScript
    and torch.export files are zip archives with a known layout; the workers load them.) ONNX
    graphs are opened by onnxruntime here instead (_check_onnx_input)."""
    if config.kind in ("onnx", "monai-bundle"):
        return
    try:
        with zipfile.ZipFile(config.path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        names = []
    if config.kind == "torchscript" and not any("/code/" in n for n in names):
        saved_weights = any(n.endswith("/data.pkl") for n in names)
        hint = "; it holds pickled weights (torch.save): script or export the network first" if saved_weights else ""
        raise ModelError(f"{config.path}: not a TorchScript file (torch.jit.save){hint}")
    if config.kind == "torch-export" and not any(n.endswith("/archive_format") for n in names):
        raise ModelError(f"{config.path}: not an exported program (torch.export.save, a .pt2 file)")


def _check_onnx_input(config: OnnxModelConfig, shape: list[int | str | None], n_bands: int) -> tuple[int, ...] | None:
    """The graph's declared input against the job, on the driver: its rank, its band count, and
    the fixed spatial size it may have (checked against the windows once the grid is known)."""
    rank = config.dims + 2
    if len(shape) != rank:
        raise ModelError(
            f"{config.path}: the graph's input has {len(shape)} axes; model.dims {config.dims} needs {rank} "
            f"(N, bands, {'D, ' if config.dims == 3 else ''}H, W)"
        )
    bands = shape[1]
    if isinstance(bands, int) and bands != n_bands:
        raise ModelError(
            f"{config.path}: the graph takes {bands} input bands, the job gives it {n_bands} (source.bands)"
        )
    spatial = shape[2:]
    if all(isinstance(n, int) for n in spatial):
        return tuple(int(n) for n in spatial)  # type: ignore[arg-type]
    return None


def _check_positions(config: ModelConfig, n_bands: int, **positions: int) -> None:
    for name, pos in positions.items():
        if pos > n_bands:
            raise ConfigError(
                f"model.{name}: band position {pos}, but only {n_bands} bands are selected from the source"
            )


def _config_hash(config: ModelConfig | NetworkModelConfig) -> str:
    """The model settings' identity. A class's ``code`` names it for exports and never changes what
    the model computes, so it stays out (stores made before codes existed keep their identity)."""
    data = config.model_dump(mode="json")
    for entry in data.get("classes") or []:
        if isinstance(entry, dict):
            entry.pop("code", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
