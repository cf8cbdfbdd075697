"""Classical vegetation models that need no weights: NDVI thresholds and RGB indices.

They are per-pixel (stride 1, receptive radius 0), so any tiling is exact and no halo is read.
"""

from __future__ import annotations

import numpy as np

from pipeline.config import HuTissueModelConfig, NdviModelConfig, RgbVegetationModelConfig

NDVI_CLASSES = (("other", "#bdb58f"), ("vegetation", "#2e9d3a"), ("water", "#2c6fbb"))
RGB_CLASSES = (("other", "#bdb58f"), ("vegetation", "#2e9d3a"))


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.zeros_like(num)
    np.divide(num, den, out=out, where=den != 0)
    return out


class NdviModel:
    """other / vegetation / water from NDVI = (NIR - red) / (NIR + red)."""

    def __init__(self, config: NdviModelConfig) -> None:
        self.config = config

    def predict(self, images: np.ndarray, valid: np.ndarray) -> np.ndarray:
        red = images[:, self.config.red - 1].astype(np.float64)
        nir = images[:, self.config.nir - 1].astype(np.float64)
        ndvi = _ratio(nir - red, nir + red)
        labels = np.zeros(ndvi.shape, dtype=np.uint8)
        labels[ndvi >= self.config.vegetation_above] = 1
        labels[ndvi < self.config.water_below] = 2
        return labels


class RgbVegetationModel:
    """other / vegetation from an RGB index.

    ``exg``: excess green on chromatic coordinates, 2g - r - b with r = R/(R+G+B) etc.
    (Woebbecke et al. 1995); ``vari``: (G - R) / (G + R - B) (Gitelson et al. 2002).
    """

    def __init__(self, config: RgbVegetationModelConfig) -> None:
        self.config = config

    def predict(self, images: np.ndarray, valid: np.ndarray) -> np.ndarray:
        c = self.config
        r, g, b = (images[:, i - 1].astype(np.float64) for i in (c.red, c.green, c.blue))
        if c.index == "exg":
            total = r + g + b
            index = _ratio(2 * g - r - b, total)
        else:
            index = _ratio(g - r, g + r - b)
        return (index > c.threshold).astype(np.uint8)


HU_COLORS = ("#000000", "#6fa8dc", "#f6d55c", "#e06666", "#f3f3f3", "#8e7cc3", "#76a5af", "#c27ba0")


class HuTissueModel:
    """Tissue classes from HU windows; class i takes ``upper[i-1] <= HU < upper[i]``."""

    def __init__(self, config: HuTissueModelConfig) -> None:
        self.upper = np.asarray(config.upper, dtype=np.float64)

    def predict(self, images: np.ndarray, valid: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.upper, images[:, 0], side="right").astype(np.uint8)
