"""Lower-resolution levels of a store, for viewers (pure: no I/O).

Each level halves the last two axes (rows and columns; a volume keeps its slices, which are usually
thicker than its pixels) of the level above it, rounding up: an odd edge row or column becomes a level
pixel of its own. Labels take the **mode** of their (up to) four pixels, nodata only where all four are
nodata and ties going to the smaller class id, so a class never appears where it was not; images take
the **mean** of the finite values. Levels go on until one fits in a chunk.

Geometry: a level-k pixel covers 2**k x 2**k pixels of level 0, so its transform scales by 2**k and
keeps the top-left corner; in NGFF's centre-based terms its scale is 2**k x spacing and its
translation (2**k - 1) / 2 x spacing (no half-pixel shift).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def level_shapes(shape: Sequence[int], chunk: Sequence[int]) -> list[tuple[int, ...]]:
    """Shapes of levels 1.. of an array of ``shape`` chunked ``chunk``: halved (rounding up) in the
    last two axes until a level fits one chunk there; empty when level 0 already does."""
    shapes: list[tuple[int, ...]] = []
    current = tuple(int(s) for s in shape)
    while current[-2] > chunk[-2] or current[-1] > chunk[-1]:
        current = (*current[:-2], -(-current[-2] // 2), -(-current[-1] // 2))
        shapes.append(current)
    return shapes


def _blocks(a: np.ndarray, fill: float | int) -> np.ndarray:
    """``a`` padded with ``fill`` to even rows and columns, as (..., rows/2, cols/2, 4)."""
    rows, cols = a.shape[-2:]
    pad = [(0, 0)] * (a.ndim - 2) + [(0, rows % 2), (0, cols % 2)]
    if rows % 2 or cols % 2:
        a = np.pad(a, pad, constant_values=fill)
    r, c = a.shape[-2] // 2, a.shape[-1] // 2
    b = a.reshape(*a.shape[:-2], r, 2, c, 2)
    return np.moveaxis(b, -3, -2).reshape(*a.shape[:-2], r, c, 4)


def mode2x(labels: np.ndarray, nodata: int) -> np.ndarray:
    """The next level of an integer label array: the most frequent label other than ``nodata`` of each
    2 x 2 block (the smaller on a tie), ``nodata`` where the block has none."""
    quads = _blocks(labels, nodata)
    valid = quads != nodata
    counts = np.zeros(quads.shape, dtype=np.int8)
    for j in range(4):
        counts += (quads == quads[..., j : j + 1]) & valid[..., j : j + 1]
    best = counts.max(axis=-1, keepdims=True)
    top = np.iinfo(labels.dtype).max
    candidates = np.where(valid & (counts == best), quads, top)
    out = candidates.min(axis=-1)
    return np.where(best[..., 0] > 0, out, nodata).astype(labels.dtype)


def mean2x(image: np.ndarray) -> np.ndarray:
    """The next level of an image: the mean of the finite values of each 2 x 2 block (NaN where none)."""
    quads = _blocks(image.astype(np.float64), np.nan)
    finite = np.isfinite(quads)
    total = np.where(finite, quads, 0.0).sum(axis=-1)
    count = finite.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return out.astype(image.dtype if np.issubdtype(image.dtype, np.floating) else np.float32)


def level_transform(transform: Sequence[float], level: int) -> list[float]:
    """A GDAL geotransform (c, a, b, f, d, e) for level ``level``: pixel sizes times 2**level, the
    top-left corner unchanged."""
    c, a, b, f, d, e = (float(v) for v in transform)
    k = 2**level
    return [c, a * k, b * k, f, d * k, e * k]


def ngff_scale_translation(spacing: Sequence[float], level: int, axes_halved: int = 2) -> tuple[list, list]:
    """NGFF (centre-based) scale and translation of level ``level`` relative to level 0's pixel
    centres, for ``spacing`` per axis with the last ``axes_halved`` axes halved per level."""
    k = 2**level
    n = len(spacing)
    factor = [1] * (n - axes_halved) + [k] * axes_halved
    scale = [float(s) * f for s, f in zip(spacing, factor, strict=True)]
    translation = [float(s) * (f - 1) / 2 for s, f in zip(spacing, factor, strict=True)]
    return scale, translation
