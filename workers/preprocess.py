"""Per-band preprocessing before a learned model: scale, normalise, neutral fill of invalid pixels."""

from __future__ import annotations

import numpy as np

from pipeline.config import Normalize


def normalise(image: np.ndarray, valid: np.ndarray, *, scale: float, normalize: Normalize | None) -> np.ndarray:
    """``(image * scale - mean) / std`` per band, with invalid pixels set to 0.

    ``image`` is a batch ``(N, bands, *spatial)`` and ``valid`` its ``(N, *spatial)`` mask.

    Zero after normalisation is the band mean, the least surprising value for a model; the
    output at those pixels is nodata anyway, but their neighbours see them, so the whole-image
    reference and every tile must fill them the same way (they do: the fill is per pixel).
    """
    out = image.astype(np.float32, copy=True)
    if scale != 1.0:
        out *= np.float32(scale)
    if normalize is not None:
        bands = out.shape[1]
        if len(normalize.mean) != bands:
            raise ValueError(f"normalize has {len(normalize.mean)} values for {bands} bands")
        per_band = (1, bands) + (1,) * (out.ndim - 2)
        mean = np.asarray(normalize.mean, dtype=np.float32).reshape(per_band)
        std = np.asarray(normalize.std, dtype=np.float32).reshape(per_band)
        out = (out - mean) / std
    return np.where(np.expand_dims(valid, 1), out, np.float32(0.0))
