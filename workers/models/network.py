"""Network models (torchscript, torch-export, onnx): N x bands x (Z x) H x W in, N x classes x (Z x) H x W logits out.

The three kinds differ only in how the file is loaded and called (``_load``); the rest is one path.
A batch goes to the device in one copy, in the source's own dtype (a uint8 image moves a quarter
of the bytes of its float32 form): on a GPU it is stacked straight into page-locked memory and
copied with ``non_blocking``, so the copy and the next batch's stacking overlap the previous
batch's kernels. Scaling, normalisation and the neutral fill of invalid pixels then run on the
device, in float32, in the same order as before the network existed: scale, normalise, fill.
The logits are checked (shape, class count, finite) before the argmax. ``launch`` returns before
the labels are back, so a worker keeps two batches in flight.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import MonaiBundleModelConfig, NetworkModelConfig, OnnxModelConfig, TorchExportModelConfig
from pipeline.errors import ModelError, one_line
from workers.models.prediction import Prediction, finish

AUTOCAST = {"bfloat16": torch.bfloat16, "float16": torch.float16}


class NetworkModel:
    def __init__(self, config: NetworkModelConfig, *, device: str = "cpu", in_flight: int = 2) -> None:
        self.config = config
        self.device = torch.device(device)
        self.module, self.dtype, self.in_channels = _load(config, self.device)
        self.staging = PinnedStaging(slots=in_flight + 1) if self.device.type == "cuda" else None

    # -- the worker's interface ---------------------------------------------------------------

    def launch(
        self, images: Sequence[np.ndarray], valid: Sequence[np.ndarray], *, probabilities: bool = False
    ) -> Callable[[], Prediction]:
        """Start labelling a batch of equal-shape windows; call the result to get its ``Prediction``."""
        with torch.inference_mode():
            return finish(self._forward(images, valid), probabilities=probabilities)

    def predict(self, images: np.ndarray, valid: np.ndarray) -> np.ndarray:
        return self.launch(list(images), list(valid))().labels

    def forward(self, images: Sequence[np.ndarray], valid: Sequence[np.ndarray]) -> torch.Tensor:
        """Logits ``(N, classes, *spatial)`` on the model's device (blending sums them there)."""
        with torch.inference_mode():
            return self._forward(images, valid)

    def logits(self, images: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """Raw logits as float32 ``(N, classes, *spatial)``; invalid pixels are filled before the model."""
        return self.forward(list(images), list(valid)).float().cpu().numpy()

    # -- inside ----------------------------------------------------------------------------------

    def _to_device(self, arrays: Sequence[np.ndarray]) -> torch.Tensor:
        """Stack ``arrays`` into one tensor on the device: one host copy, one transfer."""
        if self.staging is None:
            return torch.from_numpy(np.stack(arrays))
        host = self.staging.take((len(arrays), *arrays[0].shape), arrays[0].dtype)
        np.stack(arrays, out=host.numpy())
        return host.to(self.device, non_blocking=True)

    def _forward(self, images: Sequence[np.ndarray], valid: Sequence[np.ndarray]) -> torch.Tensor:
        """Run the network; a 2-D network on volumes ``(N, C, Z, Y, X)`` runs on every slice."""
        x = self._prepare(self._to_device(images), valid)
        slicewise = self.config.dims == 2 and x.ndim == 5
        if slicewise:
            n, c, z, h, w = x.shape
            x = x.transpose(1, 2).reshape(n * z, c, h, w)
        autocast = AUTOCAST.get(self.config.precision)
        context = torch.autocast(self.device.type, dtype=autocast) if autocast else contextlib.nullcontext()
        try:
            with context:
                out = self._call(x if self.dtype == torch.float32 else x.to(self.dtype))
        except Exception as exc:  # RuntimeError, torch.jit.Error (a scripted `raise`), anything a model raises
            if self.in_channels is not None and self.in_channels != x.shape[1]:
                raise ModelError(
                    f"{self.config.path}: the model takes {self.in_channels} input bands (its first layer), "
                    f"the job gives it {x.shape[1]} (source.bands)"
                ) from exc
            raise ModelError(
                f"{self.config.path}: the model failed on a {tuple(x.shape)} input: {_model_message(exc)}"
            ) from exc
        self._check_output(out, x)
        if slicewise:
            out = out.reshape(n, z, -1, h, w).transpose(1, 2)
        return out

    def _call(self, x: torch.Tensor) -> Any:
        """The network on ``x``; with ``tta: flips``, the mean of its logits over every mirroring
        of the spatial axes (each pass flipped back), summed in a fixed order."""
        if self.config.tta == "none":
            return self.module(x)
        spatial = list(range(2, x.ndim))
        total: torch.Tensor | None = None
        passes = 0
        for n in range(len(spatial) + 1):
            for axes in itertools.combinations(spatial, n):
                out = self.module(x.flip(axes) if axes else x)
                self._check_output(out, x)
                out = out.flip(axes) if axes else out
                total = out.float() if total is None else total + out.float()
                passes += 1
        assert total is not None
        return total / passes

    def _check_output(self, out: object, x: torch.Tensor) -> None:
        """The contract (N x classes x spatial logits, finite), each breach said in the user's terms."""
        path, classes = self.config.path, len(self.config.classes)
        if not isinstance(out, torch.Tensor):
            kind = type(out).__name__
            raise ModelError(f"{path}: returned a {kind}, expected one tensor of logits (N, classes, ...)")
        if out.ndim != x.ndim or out.shape[0] != x.shape[0]:
            raise ModelError(
                f"{path}: returned shape {tuple(out.shape)} for an input of {tuple(x.shape)} (N, classes, ...)"
            )
        if out.shape[1] != classes:
            raise ModelError(
                f"{path}: returns {out.shape[1]} classes, but model.classes names {classes}; "
                "list one name per output channel"
            )
        if tuple(out.shape[2:]) != tuple(x.shape[2:]):
            got, given = " × ".join(map(str, out.shape[2:])), " × ".join(map(str, x.shape[2:]))
            raise ModelError(
                f"{path}: returns {got} for a {given} window; logits must match the input size "
                "(upsample in the network; model.stride only says which sizes it accepts)"
            )
        if out.is_floating_point() and not bool(torch.isfinite(out).all()):
            bad = int((~torch.isfinite(out)).sum())
            raise ModelError(
                f"{path}: returned NaN or infinite logits ({bad} values in a {tuple(out.shape)} output); "
                "check model.scale and model.normalize against what the network was trained on"
            )

    def _prepare(self, raw: torch.Tensor, valid: Sequence[np.ndarray]) -> torch.Tensor:
        """``(x * scale - mean) / std`` per band in float32, then 0 at invalid pixels."""
        x = raw.to(torch.float32)
        if self.config.scale != 1.0:
            x = x * self.config.scale
        norm = self.config.normalize
        if norm is not None:
            bands = x.shape[1]
            if len(norm.mean) != bands:
                raise ModelError(f"model.normalize has {len(norm.mean)} values for {bands} bands")
            per_band = (1, bands) + (1,) * (x.ndim - 2)
            mean = torch.tensor(norm.mean, dtype=torch.float32, device=x.device).reshape(per_band)
            std = torch.tensor(norm.std, dtype=torch.float32, device=x.device).reshape(per_band)
            x = (x - mean) / std
        if all(v.all() for v in valid):
            return x
        mask = self._to_device(valid).unsqueeze(1)
        return torch.where(mask, x, torch.zeros((), dtype=torch.float32, device=x.device))


def _load(
    config: NetworkModelConfig, device: torch.device
) -> tuple[Callable[[torch.Tensor], Any], torch.dtype, int | None]:
    """(the network as a callable on tensors, the dtype it takes, its input bands where known).

    The bands are only used to explain a failed call, never to refuse one (a grouped or depthwise
    first layer has fewer per weight)."""
    if isinstance(config, OnnxModelConfig):
        from workers.models.onnx import OnnxNetwork

        network = OnnxNetwork(config.path, device=str(device))
        return network, torch.float32, network.in_channels
    module: torch.nn.Module
    try:
        if isinstance(config, TorchExportModelConfig):
            module = torch.export.load(config.path).module().to(device)
        elif isinstance(config, MonaiBundleModelConfig):
            module = _bundle_network(Path(config.path), device)
        else:
            module = torch.jit.load(config.path, map_location=device).eval()
    except Exception as exc:  # RuntimeError, ValueError, OSError, zipfile's and pickle's errors
        raise ModelError(_load_failure(config, exc)) from exc
    parameters = list(module.parameters())
    dtype = parameters[0].dtype if parameters else torch.float32
    first = next((p for p in parameters if p.ndim in (4, 5)), None)  # the first convolution-shaped weight
    return module, dtype, int(first.shape[1]) if first is not None else None


def _bundle_network(folder: Path, device: torch.device) -> torch.nn.Module:
    """A MONAI bundle's network: models/model.ts as TorchScript, else ``network_def`` from its
    inference config (monai.bundle.ConfigParser) with the weights of models/model.pt, read with
    ``torch.load(weights_only=True)`` (tensors only: no pickled code runs)."""
    scripted = folder / "models" / "model.ts"
    if scripted.is_file():
        return torch.jit.load(str(scripted), map_location=device).eval()
    from monai.bundle import ConfigParser

    from pipeline.card import bundle_config

    parser = ConfigParser()
    parser.read_config(str(bundle_config(folder)))
    network = parser.get_parsed_content("network_def")
    state = torch.load(folder / "models" / "model.pt", map_location=device, weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # bundles saved by MONAI's CheckpointSaver nest it
    network.load_state_dict(state)
    return network.to(device).eval()


def _load_failure(config: NetworkModelConfig, exc: BaseException) -> str:
    """Why torch.jit.load refused ``path``, in one line: its first line of explanation, and the
    likely cause when the file uses operators this PyTorch does not have (saved by a newer one)."""
    path = config.path
    what = (
        "an exported program torch.export.load"
        if config.kind == "torch-export"
        else "a TorchScript file torch.jit.load"
    )
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), exc.__class__.__name__)
    text = f"{path}: not {what} (PyTorch {torch.__version__}) can read ({first[:160]})"
    if "similar ops" in str(exc) or "Unknown builtin op" in str(exc):
        text += "; it uses an operator this PyTorch lacks: it was probably saved by a newer PyTorch"
    return text


def _model_message(exc: BaseException) -> str:
    """What the model said: TorchScript wraps it in its own traceback, whose last line is the
    original ``Type: message``."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if "TorchScript interpreter" in str(exc) and lines:
        return " ".join(lines[-1].split())[:300]
    return one_line(exc, 300)


class PinnedStaging:
    """Page-locked host buffers, reused in turn: ``slots`` must exceed the batches in flight, so a
    buffer is never refilled while its copy to the device may still be running."""

    def __init__(self, slots: int, *, pin: bool = True) -> None:
        self.slots = slots
        self.pin = pin  # False only where there is no accelerator to pin for (tests of the rotation)
        self.buffers: dict[tuple[tuple[int, ...], str], list[torch.Tensor]] = {}
        self.turn: dict[tuple[tuple[int, ...], str], int] = {}

    def take(self, shape: tuple[int, ...], dtype: np.dtype) -> torch.Tensor:
        key = (shape, np.dtype(dtype).str)
        ring = self.buffers.setdefault(key, [])
        turn = self.turn.get(key, 0)
        self.turn[key] = (turn + 1) % self.slots
        if len(ring) <= turn:
            buffer = torch.from_numpy(np.empty(shape, dtype=dtype))
            ring.append(buffer.pin_memory() if self.pin else buffer)
        return ring[turn]
