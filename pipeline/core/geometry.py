"""Pure tiling geometry: chunk grids, work units, halos and stride alignment, in any dimension.

No I/O happens here (no rasterio, zarr, ray or torch), so every guarantee is property-tested.

The exactness argument, which the numbers below serve:

* The image of shape ``S`` is thought of as padded once, globally, at its high end, to
  ``P = ceil(S / stride) * stride`` (the *virtual image*). Whole-image inference runs on it.
* A work unit's core is a block of output chunks. Its read window is the core, rounded up to the
  stride at its high end, grown by the halo on each side and clipped to the virtual image, never
  beyond it. Chunks and halos are multiples of the stride, so every read window starts on a
  multiple of the stride and spans a multiple of it: a strided model sees the same phase as on
  the whole image, and at image borders it sees the same zero padding of its own convolutions.
* Inside the image a window edge is at least ``halo`` away from the core, so when
  ``halo >= receptive radius`` nothing beyond the window can influence a core pixel.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

Shape = tuple[int, ...]


def ceil_to(value: int, step: int) -> int:
    """The smallest multiple of ``step`` that is >= ``value`` (ceil, so no pixel is left out)."""
    return -(-value // step) * step


@dataclass(frozen=True)
class Box:
    """A half-open box ``[start, stop)`` of pixel indices; ``start <= stop`` on every axis."""

    start: Shape
    stop: Shape

    def __post_init__(self) -> None:
        if len(self.start) != len(self.stop) or any(a > b for a, b in zip(self.start, self.stop)):
            raise ValueError(f"invalid box {self.start}..{self.stop}")

    @property
    def shape(self) -> Shape:
        return tuple(b - a for a, b in zip(self.start, self.stop))

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def slices(self) -> tuple[slice, ...]:
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop))

    def within(self, outer: Box) -> tuple[slice, ...]:
        """Slices that cut this box out of an array covering ``outer`` (which must contain it)."""
        if not outer.contains(self):
            raise ValueError(f"{self} is not inside {outer}")
        return tuple(slice(a - o, b - o) for a, b, o in zip(self.start, self.stop, outer.start))

    def contains(self, other: Box) -> bool:
        return all(a <= c and d <= b for a, b, c, d in zip(self.start, self.stop, other.start, other.stop))

    def intersect(self, other: Box) -> Box:
        start = tuple(max(a, c) for a, c in zip(self.start, other.start))
        stop = tuple(max(s, min(b, d)) for s, b, d in zip(start, self.stop, other.stop))
        return Box(start, stop)


@dataclass(frozen=True)
class WorkUnit:
    """One task's worth of work: output chunks (``core``) and the window read to compute them.

    Guarantees: ``read`` contains ``core``; ``read`` lies within the virtual image; ``core`` lies
    within the image; ``chunks`` tile ``core`` exactly, each one an output chunk clipped to the image.
    """

    index: Shape
    core: Box
    read: Box
    chunks: tuple[Box, ...]


@dataclass(frozen=True)
class TileGrid:
    """The output chunk grid over an image and its work units.

    ``chunk`` must be a multiple of ``stride`` (checked); ``halo`` is rounded up to the stride,
    because a window that starts off the stride phase would see the model's downsampling
    differently from the whole image and break exactness.
    """

    shape: Shape
    chunk: Shape
    halo: Shape
    stride: Shape
    chunks_per_unit: Shape

    def __post_init__(self) -> None:
        dims = len(self.shape)
        for name in ("chunk", "halo", "stride", "chunks_per_unit"):
            if len(getattr(self, name)) != dims:
                raise ValueError(f"{name} has {len(getattr(self, name))} axes, the image has {dims}")
        if any(s <= 0 for s in self.shape):
            raise ValueError(f"image shape {self.shape} has an empty axis")
        if any(c <= 0 for c in self.chunk) or any(s <= 0 for s in self.stride):
            raise ValueError("chunk and stride must be positive")
        if any(h < 0 for h in self.halo) or any(u <= 0 for u in self.chunks_per_unit):
            raise ValueError("halo must be >= 0 and chunks_per_unit > 0")
        if any(c % s for c, s in zip(self.chunk, self.stride)):
            raise ValueError(f"chunk {self.chunk} is not a multiple of the model stride {self.stride}")

    @classmethod
    def create(cls, shape: Shape, *, chunk: Shape, halo: Shape, stride: Shape, chunks_per_unit: Shape) -> TileGrid:
        aligned = tuple(ceil_to(h, s) for h, s in zip(halo, stride))
        return cls(shape=shape, chunk=chunk, halo=aligned, stride=stride, chunks_per_unit=chunks_per_unit)

    @classmethod
    def chunked(cls, shape: Shape, chunk: Shape) -> TileGrid:
        """The grid of a stored array's chunks: one unit per chunk, no halo (labelling, queries, imports)."""
        ones = (1,) * len(shape)
        return cls.create(shape, chunk=chunk, halo=(0,) * len(shape), stride=ones, chunks_per_unit=ones)

    @property
    def virtual_shape(self) -> Shape:
        """The image padded at its high end to a multiple of the stride."""
        return tuple(ceil_to(s, st) for s, st in zip(self.shape, self.stride))

    @property
    def grid_shape(self) -> Shape:
        """Number of output chunks along each axis."""
        return tuple(-(-s // c) for s, c in zip(self.shape, self.chunk))

    @property
    def unit_grid_shape(self) -> Shape:
        return tuple(-(-g // u) for g, u in zip(self.grid_shape, self.chunks_per_unit))

    def chunk_box(self, index: Shape) -> Box:
        start = tuple(i * c for i, c in zip(index, self.chunk))
        stop = tuple(min(a + c, s) for a, c, s in zip(start, self.chunk, self.shape))
        return Box(start, stop)

    def unit(self, index: Shape) -> WorkUnit:
        first = tuple(i * u for i, u in zip(index, self.chunks_per_unit))
        last = tuple(min(f + u, g) for f, u, g in zip(first, self.chunks_per_unit, self.grid_shape))
        chunk_ids = itertools.product(*(range(f, lst) for f, lst in zip(first, last)))
        chunks = tuple(self.chunk_box(c) for c in chunk_ids)
        core = Box(chunks[0].start, chunks[-1].stop)
        read_start = tuple(max(a - h, 0) for a, h in zip(core.start, self.halo))
        read_stop = tuple(
            min(ceil_to(b, st) + h, v) for b, st, h, v in zip(core.stop, self.stride, self.halo, self.virtual_shape)
        )
        return WorkUnit(index=index, core=core, read=Box(read_start, read_stop), chunks=chunks)

    def units(self) -> Iterator[WorkUnit]:
        for index in itertools.product(*(range(n) for n in self.unit_grid_shape)):
            yield self.unit(index)

    @property
    def n_units(self) -> int:
        return math.prod(self.unit_grid_shape)


def pad_to_window(data: np.ndarray, window: Box, image_shape: Shape, *, edge: str) -> np.ndarray:
    """Pad ``data`` (the part of ``window`` inside the image; leading axes are channels) to ``window``.

    Only the high end can lie outside the image (windows are clipped to the virtual image,
    whose padding is at the high end). ``replicate`` repeats the last row/column, ``zero`` fills
    zeros; both depend only on pixels inside the window, so tiles pad exactly as the whole image does.
    """
    spatial = len(window.start)
    pad = [max(0, b - s) for b, s in zip(window.stop, image_shape)]
    if not any(pad):
        return data
    widths = [(0, 0)] * (data.ndim - spatial) + [(0, p) for p in pad]
    if edge == "replicate":
        return np.pad(data, widths, mode="edge")
    return np.pad(data, widths, mode="constant")


def inside_image(window: Box, image_shape: Shape) -> Box:
    """The part of ``window`` that lies inside the image."""
    return window.intersect(Box((0,) * len(image_shape), image_shape))
