"""TorchScript model files: N x bands x (Z x) H x W in, N x classes x (Z x) H x W logits out."""

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
        """Raw logits as float32 ``(N, classes, *spatial)``; invalid pixels are filled before the model."""
        with torch.inference_mode():
            return self._forward(images, valid).float().cpu().numpy()

    def predict(self, images: np.ndarray, valid: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            # max(1).indices equals argmax and is several times faster on CPU torch.
            labels = self._forward(images, valid).max(dim=1).indices
        return labels.to(torch.uint8).cpu().numpy()

    def _forward(self, images: np.ndarray, valid: np.ndarray) -> torch.Tensor:
        """Run the network; a 2-D network on volumes ``(N, C, Z, Y, X)`` runs on every slice."""
        x = normalise(images, valid, scale=self.config.scale, normalize=self.config.normalize)
        slicewise = self.config.dims == 2 and x.ndim == 5
        if slicewise:
            n, c, z, h, w = x.shape
            x = x.transpose(0, 2, 1, 3, 4).reshape(n * z, c, h, w)
        out = self.module(torch.from_numpy(np.ascontiguousarray(x)).to(self.device, self.dtype))
        expected = (x.shape[0], len(self.config.classes), *x.shape[2:])
        if tuple(out.shape) != expected:
            raise ModelError(
                f"{self.config.path}: returned shape {tuple(out.shape)}, expected {expected} (N, classes, ...)"
            )
        if slicewise:
            out = out.reshape(n, z, -1, h, w).transpose(1, 2)
        return out
