"""Blended stitching, pure: the sliding-window grid of the whole image and the weighted sum of logits.

For networks that are not translation-equivariant (InstanceNorm, attention, global pooling) no
halo makes tiles equal one whole-image pass. What such a network is run with instead, by MONAI
and nnU-Net alike, is sliding-window inference: windows of a fixed size on one grid over the whole
image, their logits weighted (a gaussian centred on each window, or constant) and summed, then
divided by the summed weights. raymask computes exactly that, unit by unit:

* The window grid is MONAI's (``monai.inferers.sliding_window_inference``): along each axis,
  windows start every ``int(window * (1 - overlap))`` pixels and the last one is moved back to end
  at the image edge; an axis shorter than the window is padded with zeros, half before, half after.
  It depends only on the image, never on the work units.
* A work unit computes every window that overlaps its core (its neighbours compute the shared
  ones again) and sums them in the grid's window order, so each pixel's sum has the same terms in
  the same order as on the whole image, each output chunk is still written by exactly one unit,
  and a retried unit writes the same bytes.
* Units are strips that span the whole first axis (rows; z for volumes): the windows shared with a
  neighbour, computed twice, are then only those along the strip's sides. A unit walks its window
  rows in order (``blend_bands``) and finishes a band of rows (a row of chunks) as soon as no later
  window reaches it, so its memory is a few bands of the strip, whatever the image's height.

Nothing here imports torch: the accumulation works on numpy arrays and on torch tensors alike.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from pipeline.core.geometry import Box, Shape

MIN_WEIGHT = 1e-3  # MONAI clamps gaussian weights at the window's corners to at least this


def window_starts(size: int, window: int, overlap: float) -> tuple[int, ...]:
    """Where windows start along one axis of ``size`` pixels (``size >= window``), in order.

    The step is ``int(window * (1 - overlap))`` (at least 1), or the window itself when it spans the
    axis; the last window ends at the axis's end. Guarantees: the windows cover ``[0, size)``,
    start at 0, lie inside it, and their starts increase.
    """
    if size < window:
        raise ValueError(f"axis of {size} is shorter than the window {window}: pad it first")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap {overlap} is not in [0, 1)")
    step = window if window == size else max(1, int(window * (1 - overlap)))
    count = next((d for d in range(math.ceil(size / step)) if d * step + window >= size), 0) + 1
    return tuple(min(d * step, size - window) for d in range(count))


@dataclass(frozen=True)
class BlendGrid:
    """The window grid over an image of ``shape`` (one entry per axis of every array here)."""

    shape: Shape
    window: Shape
    overlap: tuple[float, ...]
    weights: str = "gaussian"  # or "constant"
    sigma: float = 0.125  # of the window, per axis

    def __post_init__(self) -> None:
        if not (len(self.shape) == len(self.window) == len(self.overlap)):
            raise ValueError("shape, window and overlap need one value per axis")
        if any(w <= 0 for w in self.window):
            raise ValueError(f"window {self.window} has an empty axis")

    @cached_property
    def weight_map(self) -> np.ndarray:
        """Each window pixel's weight (``importance``)."""
        return importance(self.window, self.weights, self.sigma)

    @property
    def pad_low(self) -> Shape:
        """Zeros added before each axis shorter than the window (MONAI: half of the shortfall, rounded down)."""
        return tuple(max(w - s, 0) // 2 for s, w in zip(self.shape, self.window))

    @property
    def padded_shape(self) -> Shape:
        return tuple(max(s, w) for s, w in zip(self.shape, self.window))

    @cached_property
    def starts(self) -> tuple[tuple[int, ...], ...]:
        return tuple(window_starts(s, w, o) for s, w, o in zip(self.padded_shape, self.window, self.overlap))

    @property
    def n_windows(self) -> int:
        return math.prod(len(s) for s in self.starts)

    def to_padded(self, box: Box) -> Box:
        """``box`` (image pixels) in the coordinates of the padded image the windows live in."""
        return Box(
            tuple(a + p for a, p in zip(box.start, self.pad_low)), tuple(b + p for b, p in zip(box.stop, self.pad_low))
        )

    def to_image(self, box: Box) -> Box:
        """``box`` (padded coordinates) in image pixels; it may reach outside the image."""
        return Box(
            tuple(a - p for a, p in zip(box.start, self.pad_low)), tuple(b - p for b, p in zip(box.stop, self.pad_low))
        )

    def windows(self, core: Box) -> list[Box]:
        """Every window that overlaps ``core`` (image pixels), in padded coordinates, in the grid's order
        (row-major over the starts: the order sliding_window_inference adds them in)."""
        target = self.to_padded(core)
        per_axis = [
            [s for s in starts if s < hi and s + w > lo]
            for starts, w, lo, hi in zip(self.starts, self.window, target.start, target.stop)
        ]
        boxes = []
        for first in itertools.product(*per_axis):
            boxes.append(Box(first, tuple(s + w for s, w in zip(first, self.window))))
        return boxes

    def window_rows(self, core: Box) -> list[tuple[Box, list[Box]]]:
        """The windows over ``core`` grouped by their start along the first axis, in order, each group
        with the box that holds it (padded coordinates): what a unit reads for one row of windows."""
        rows: list[tuple[Box, list[Box]]] = []
        for _, group in itertools.groupby(self.windows(core), key=lambda b: b.start[0]):
            wins = list(group)
            start = tuple(min(w.start[a] for w in wins) for a in range(len(self.shape)))
            stop = tuple(max(w.stop[a] for w in wins) for a in range(len(self.shape)))
            rows.append((Box(start, stop), wins))
        return rows

    def windows_computed(self, cores: list[Box]) -> int:
        """Windows computed by units with these cores, counting those shared by several each time."""
        total = 0
        for core in cores:
            target = self.to_padded(core)
            total += math.prod(
                sum(1 for s in starts if s < hi and s + w > lo)
                for starts, w, lo, hi in zip(self.starts, self.window, target.start, target.stop)
            )
        return total


def importance(window: Shape, mode: str = "gaussian", sigma: float = 0.125) -> np.ndarray:
    """Each window pixel's weight, float32: MONAI's ``compute_importance_map``.

    ``gaussian``: a separable gaussian centred on the window with sigma ``sigma * size`` per axis,
    clamped below at its smallest value or ``1e-3``, whichever is larger; ``constant``: ones.
    """
    if mode == "constant":
        return np.ones(window, dtype=np.float32)
    if mode != "gaussian":
        raise ValueError(f"weights {mode!r}: gaussian or constant")
    weights: np.ndarray | None = None
    for axis, size in enumerate(window):
        x = np.arange(-(size - 1) / 2.0, (size - 1) / 2.0 + 1, dtype=np.float32)
        g = np.exp(x**2 / np.float32(-2 * (size * sigma) ** 2)).astype(np.float32)
        weights = g if weights is None else weights[..., None] * g.reshape((1,) * axis + (size,))
    assert weights is not None
    floor = max(float(weights.min()), MIN_WEIGHT)
    return np.maximum(weights, np.float32(floor)).astype(np.float32)


def accumulate(total: Any, count: Any, logits: Any, window: Box, core: Box, weights: Any) -> None:
    """Add one window's weighted logits to the part of ``core`` it covers.

    ``total``: ``(classes, *core.shape)``; ``count``: ``core.shape``; ``logits``: ``(classes,
    *window.shape)``; ``weights``: ``window.shape``; numpy arrays or torch tensors (in place).
    ``window`` and ``core`` are in the same coordinates. ``total / count`` is then the blended
    logits, as sliding-window inference gives them.
    """
    part = window.intersect(core)
    if part.size == 0:
        return
    src, dst = part.within(window), part.within(core)
    w = weights[src]
    total[(slice(None), *dst)] += logits[(slice(None), *src)] * w
    count[dst] += w


Array = Any  # a numpy array or a torch tensor: what ``zeros`` makes and ``forward`` returns
Row = tuple[Box, list[Box], Any, Any]  # a row of windows: its box, its windows, the image and validity read for it


def blend_bands(
    rows: Iterable[Row],
    forward: Callable[[list[Any], list[Any]], Array],
    grid: BlendGrid,
    core: Box,
    band: int,
    *,
    zeros: Callable[[tuple[int, ...]], Array],
    weights: Array,
    n_classes: int,
    batch_size: int = 1,
) -> Iterator[tuple[Box, Array, np.ndarray]]:
    """The blended logits of ``core`` (image pixels), band by band along the first axis.

    ``rows``: ``grid.window_rows(core)`` in order, each with the image ``(bands, *box.shape)`` and
    validity read for its box. ``forward`` maps lists of windows (image, validity) to logits
    ``(n, classes, *window)``, ``batch_size`` windows at a time. Yields ``(box, logits, valid)`` for
    consecutive bands of ``band`` rows of the core (padded coordinates): ``logits`` is
    ``total / count`` of the band, ``valid`` its validity, each band yielded as soon as no later
    window reaches it. ``zeros(shape)`` makes the float32 accumulators (numpy or torch, on any device).
    """
    target = grid.to_padded(core)
    first, last = target.start[0], target.stop[0]
    bands = [Box((lo, *target.start[1:]), (min(lo + band, last), *target.stop[1:])) for lo in range(first, last, band)]
    open_bands: dict[int, tuple[Array, Array, np.ndarray]] = {}
    done = 0

    def flush(i: int) -> tuple[Box, Array, np.ndarray]:
        total, count, valid = open_bands.pop(i)
        return bands[i], total / count, valid

    for row, wins, image, valid in rows:
        while done < len(bands) and bands[done].stop[0] <= row.start[0]:  # no later window reaches it
            yield flush(done)
            done += 1
        touched = [
            i for i in range(done, len(bands)) if bands[i].start[0] < row.stop[0] and bands[i].stop[0] > row.start[0]
        ]
        for i in touched:
            if i not in open_bands:
                shape = bands[i].shape
                open_bands[i] = (zeros((n_classes, *shape)), zeros(shape), np.zeros(shape, dtype=bool))
            part = row.intersect(bands[i])
            open_bands[i][2][part.within(bands[i])] = valid[part.within(row)]
        for start in range(0, len(wins), batch_size):
            group = wins[start : start + batch_size]
            cuts = [w.within(row) for w in group]
            logits = forward([image[(slice(None), *c)] for c in cuts], [valid[c] for c in cuts])
            for w, out in zip(group, logits):
                for i in touched:
                    accumulate(open_bands[i][0], open_bands[i][1], out, w, bands[i], weights)
    while done < len(bands):
        yield flush(done)
        done += 1
