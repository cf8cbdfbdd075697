"""TorchScript model files: N x bands x H x W in, N x classes x H x W logits out."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.config import TorchScriptModelConfig
from pipeline.errors import ModelError
from workers.preprocess import normalise


class TorchScriptModel:
    def __init__(self, config: TorchScriptModelConfig, *, device: str = "cpu") -> None:
        self.config = config
        self.device = torch.device(device)
        try:
            module = torch.jit.load(config.path, map_location=self.device)
        except (RuntimeError, ValueError, OSError) as exc:
            raise ModelError(
                f"{config.path}: not a TorchScript file torch.jit.load can read ({exc.__class__.__name__})"
            ) from exc
        self.module = module.eval()
        self.dtype = next((p.dtype for p in self.module.parameters()), torch.float32)

    def logits(self, images: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """Raw logits as float32 ``(N, classes, H, W)``; invalid pixels are filled before the model."""
        x = normalise(images, valid, scale=self.config.scale, normalize=self.config.normalize)
        with torch.inference_mode():
            out = self.module(torch.from_numpy(x).to(self.device, self.dtype))
        self._check(out, images)
        return out.float().cpu().numpy()

    def predict(self, images: np.ndarray, valid: np.ndarray) -> np.ndarray:
        x = normalise(images, valid, scale=self.config.scale, normalize=self.config.normalize)
        with torch.inference_mode():
            out = self.module(torch.from_numpy(x).to(self.device, self.dtype))
            self._check(out, images)
            # max(1).indices equals argmax and is several times faster on CPU torch.
            labels = out.max(dim=1).indices
        return labels.to(torch.uint8).cpu().numpy()

    def _check(self, out: torch.Tensor, images: np.ndarray) -> None:
        n, _, h, w = images.shape
        expected = (n, len(self.config.classes), h, w)
        if tuple(out.shape) != expected:
            raise ModelError(
                f"{self.config.path}: returned shape {tuple(out.shape)}, expected {expected} (N, classes, H, W)"
            )
