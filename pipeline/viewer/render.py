"""What the viewer draws, as PNG bytes: map tiles of the mask and of the source image, slices of a
volume's HU image and labels, thumbnails. Read straight from the store and its source file; what a
server process keeps between requests is bounded and never outlives what it was read from:

- ``BLOCKS``: decoded chunks of *complete* stores' arrays (mask, levels, a volume's HU image) and
  stretched blocks of source images, the least recently used dropped past 256 MiB. A store being
  written is read afresh on every request, and a store replaced by a new version is a new store object
  (the server reopens it), so its chunks are never confused with the old ones'; a source file's blocks
  are keyed by its modification time, size and inode.
- ``SOURCES``: open source rasters, one per concurrent reader, so GDAL keeps their decoded blocks.
- ``DISPLAYS``: per source image and band choice, the stretch (2nd-98th percentile per band) and, for
  a source without overviews of its own, a display pyramid: the stretched image every 2nd (or 4th..)
  pixel, then halved down to one tile, as RGBA ``.npy`` files in the server's cache folder, memory-
  mapped by every worker process, built once by whichever process needs it first. Zoomed-out image
  tiles are then slices of it rather than reads of the whole source.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import itertools
import json
import os
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline.core.colors import rgb
from pipeline.core.png import encode
from pipeline.core.stats import NODATA
from pipeline.core.webtiles import TILE, TileWindow, level_for
from pipeline.errors import QueryError
from pipeline.store import MaskStore

WINDOWS = {  # CT window presets: (centre, width) in HU
    "soft-tissue": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
}
AXES = {"axial": 0, "coronal": 1, "sagittal": 2}


def png(pixels: np.ndarray) -> bytes:
    """``pixels`` (rows, cols) grey or (rows, cols, 3|4) as PNG."""
    return encode(pixels)


def palette_png(labels: np.ndarray, lut: np.ndarray) -> bytes:
    """Class ids as a palette PNG (one byte a pixel: far smaller and faster to encode than RGBA), the
    palette and its transparency from ``lut`` (256 RGBA entries)."""
    return encode(labels.astype(np.uint8, copy=False), lut)


def class_lut(store: MaskStore, hidden: set[int] = frozenset()) -> np.ndarray:  # type: ignore[assignment]
    """(256, 4) RGBA per class id: the class colour, opaque; nodata and hidden classes transparent."""
    lut = np.zeros((256, 4), dtype=np.uint8)
    for c in store.info.classes:
        if c.id not in hidden:
            lut[c.id, :3] = rgb(c.color)
            lut[c.id, 3] = 255
    lut[NODATA] = 0
    return lut


_ARRAYS: weakref.WeakKeyDictionary[MaskStore, dict[str, zarr.Array]] = weakref.WeakKeyDictionary()
_ARRAYS_LOCK = threading.Lock()


def store_array(store: MaskStore, name: str) -> zarr.Array:
    """The store's array at ``name`` (its mask, its image, a level's mask in a nested group), opened
    once per opened store: opening parses its metadata, and every tile reads one."""
    from pipeline.store.location import open_array

    with _ARRAYS_LOCK:
        opened = _ARRAYS.setdefault(store, {})
        array = opened.get(name)
    if array is None:
        array = open_array(store.path / name)
        with _ARRAYS_LOCK:
            opened[name] = array
    return array


def level_array(store: MaskStore, record: dict[str, Any]) -> zarr.Array:
    """A level's mask array (map levels and a volume's label levels live in nested groups)."""
    return store_array(store, record["mask"])


def assemble(
    bounds: list[tuple[int, int]], chunks: tuple[int, ...], block: Any, dtype: Any, trailing: tuple[int, ...] = ()
) -> np.ndarray:
    """The box ``bounds`` ([start, stop) per axis) of an array stored in ``chunks``, put together from
    ``block(index)`` (the chunk at that grid index, cut short at the array's edge, with ``trailing``
    axes of its own such as colour channels)."""
    out = np.empty([b - a for a, b in bounds] + list(trailing), dtype=dtype)
    spans = [range(a // c, -(-b // c)) for (a, b), c in zip(bounds, chunks, strict=True)]
    for index in itertools.product(*spans):
        data = block(index)
        source, target = [], []
        for (a, b), c, i in zip(bounds, chunks, index, strict=True):
            low, high = max(a, i * c), min(b, (i + 1) * c)
            source.append(slice(low - i * c, high - i * c))
            target.append(slice(low - a, high - a))
        out[tuple(target)] = data[tuple(source)]
    return out


class Blocks:
    """Decoded blocks shared by one process's requests — chunks of complete stores' arrays, stretched
    blocks of source images — the least recently used dropped once they hold more than ``budget``
    bytes; a block that one request is decoding is waited for by the others, not decoded twice."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.lock = threading.Lock()
        self.held: collections.OrderedDict[tuple[Any, ...], np.ndarray] = collections.OrderedDict()
        self.size = 0
        self.owners: set[int] = set()
        self.loading: dict[tuple[Any, ...], threading.Event] = {}

    def read(self, store: MaskStore, name: str, selection: tuple[int | slice, ...]) -> np.ndarray:
        """``store_array(store, name)[selection]`` (integers and step-less slices), from cached chunks
        when the store is complete."""
        array = store_array(store, name)
        if not store.info.complete:
            return np.asarray(array[selection])
        bounds, dropped = [], []
        for axis, (part, length) in enumerate(zip(selection, array.shape, strict=True)):
            if isinstance(part, slice):
                start, stop, _ = part.indices(length)
            else:
                start, stop = int(part), int(part) + 1
                dropped.append(axis)
            bounds.append((start, max(start, stop)))
        self._owned(store)

        def chunk(index: tuple[int, ...]) -> np.ndarray:
            return self.get((id(store), name, index), lambda: self._decode(array, index))

        out = assemble(bounds, array.chunks, chunk, array.dtype)
        return out.squeeze(axis=tuple(dropped)) if dropped else out

    def get(self, key: tuple[Any, ...], load: Any) -> np.ndarray:
        """The block under ``key``, from ``load()`` the first time (and after it was dropped)."""
        with self.lock:
            block = self.held.get(key)
            if block is not None:
                self.held.move_to_end(key)
                return block
            other = self.loading.get(key)
            if other is None:
                loading = self.loading[key] = threading.Event()
        if other is not None:  # another request is decoding this block: wait for it
            other.wait()
            with self.lock:
                block = self.held.get(key)
            return block if block is not None else np.asarray(load())  # it failed, or was dropped already
        try:
            block = np.asarray(load())
            block.setflags(write=False)
            with self.lock:
                self.held[key] = block
                self.size += block.nbytes
                while self.size > self.budget and len(self.held) > 1:
                    _, dropped = self.held.popitem(last=False)
                    self.size -= dropped.nbytes
        finally:
            with self.lock:
                self.loading.pop(key, None)
            loading.set()
        return block

    def _owned(self, store: MaskStore) -> None:
        with self.lock:
            if id(store) not in self.owners:  # its chunks go when the store object does (ids are reused)
                self.owners.add(id(store))
                weakref.finalize(store, self._forget, id(store))

    @staticmethod
    def _decode(array: zarr.Array, index: tuple[int, ...]) -> np.ndarray:
        chunk = tuple(
            slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(index, array.chunks, array.shape, strict=True)
        )
        return np.asarray(array[chunk])

    def _forget(self, owner: int) -> None:
        with self.lock:
            self.owners.discard(owner)
            for key in [k for k in self.held if k[0] == owner]:
                self.size -= self.held.pop(key).nbytes


BLOCKS = Blocks(256 << 20)


def mask_tile(store: MaskStore, window: TileWindow, hidden: set[int] = frozenset()) -> bytes:  # type: ignore[assignment]
    """The mask under ``window`` in the class colours (every ``step``-th pixel of the coarsest level
    that has enough of them, so a level pixel is the mode of the pixels it stands for)."""
    levels = list(store.info.levels or [])
    level = level_for(window.step, len(levels))
    name = store.info.arrays.mask if level == 0 else levels[level - 1]["mask"]
    f, k = 2**level, window.step // 2**level
    rows = slice(window.row0 // f, -(-window.row1 // f))
    cols = slice(window.col0 // f, -(-window.col1 // f))
    data = BLOCKS.read(store, name, (rows, cols))[::k, ::k]
    tile = np.full((TILE, TILE), NODATA, dtype=np.uint8)  # past the image's edge: nodata, transparent
    tile[: data.shape[0], : data.shape[1]] = data[:TILE, :TILE]
    return palette_png(tile, class_lut(store, hidden))


def _stamp(path: str) -> tuple[int, ...]:
    """What tells a changed source file from the one read before (nothing, for an object URL)."""
    try:
        st = os.stat(path)
    except OSError:
        return ()
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class Sources:
    """Open source rasters kept between requests (a GDAL dataset keeps the blocks it decoded), at most
    ``keep`` per file in a process: a dataset must not be read by two threads at once, and a request
    waiting a moment for one is faster than a fresh one decoding the same blocks again."""

    def __init__(self, keep: int = 2) -> None:
        self.keep = keep
        self.ready = threading.Condition()
        self.free: dict[tuple[str, tuple[int, ...]], list[Any]] = {}
        self.count: dict[tuple[str, tuple[int, ...]], int] = {}

    @contextlib.contextmanager
    def open(self, path: str) -> Iterator[Any]:
        import rasterio

        key = (path, _stamp(path))
        old: list[Any] = []
        with self.ready:
            for stale in [k for k in self.free if k[0] == path and k != key]:  # the file changed
                old += self.free.pop(stale)
                self.count.pop(stale, None)
            while not self.free.get(key) and self.count.get(key, 0) >= self.keep:
                self.ready.wait()
            pool = self.free.get(key)
            dataset = pool.pop() if pool else None
            if dataset is None:
                self.count[key] = self.count.get(key, 0) + 1
        for d in old:
            d.close()
        try:
            if dataset is None:
                dataset = rasterio.open(path)
        except BaseException:
            with self.ready:
                self.count[key] -= 1
                self.ready.notify()
            raise
        try:
            yield dataset
        finally:
            with self.ready:
                if key in self.count:
                    self.free.setdefault(key, []).append(dataset)
                    dataset = None
                self.ready.notify()
            if dataset is not None:
                dataset.close()


SOURCES = Sources()


def composite_bands(store: MaskStore, dataset: Any, chosen: tuple[int, ...] | None) -> tuple[int, ...]:
    """The source bands drawn: ``chosen`` (1 or 3 band numbers), else red/green/blue where the file
    says which they are, else the first three of the file (or its one band as grey)."""
    if chosen:
        if len(chosen) not in (1, 3) or any(b < 1 or b > dataset.count for b in chosen):
            raise QueryError(f"bands={','.join(map(str, chosen))}: give 1 or 3 band numbers in 1..{dataset.count}")
        return chosen
    from rasterio.enums import ColorInterp

    interp = list(dataset.colorinterp)
    wanted = [ColorInterp.red, ColorInterp.green, ColorInterp.blue]
    if all(c in interp for c in wanted):
        return tuple(interp.index(c) + 1 for c in wanted)
    return (1, 2, 3) if dataset.count >= 3 else (1,)


def stretch_rgba(values: np.ndarray, valid: np.ndarray, limits: np.ndarray) -> np.ndarray:
    """(bands, rows, cols) source values as (rows, cols, 4) RGBA: each band from its (low, high) in
    ``limits`` to 0..255, one band repeated as grey; transparent where not ``valid``."""
    rows, cols = values.shape[1:]
    out = np.empty((rows, cols, 4), dtype=np.uint8)
    for i, band in enumerate(values):
        low, high = float(limits[i, 0]), float(limits[i, 1])
        if band.dtype.kind in "ui" and band.dtype.itemsize <= 2:  # a table of every value: one lookup a pixel
            info = np.iinfo(band.dtype)
            table = _scale(np.arange(info.min, info.max + 1, dtype=np.float32), low, high)
            out[..., i] = table[band.astype(np.int32) - info.min] if info.min else table[band]
        else:
            out[..., i] = _scale(band.astype(np.float32), low, high)
    if len(values) == 1:
        out[..., 1] = out[..., 2] = out[..., 0]
    out[..., 3] = np.where(valid, 255, 0)
    return out


def _scale(values: np.ndarray, low: float, high: float) -> np.ndarray:
    scaled = (values - np.float32(low)) * np.float32(255.0 / max(high - low, 1e-12))
    np.clip(np.nan_to_num(scaled, nan=0.0), 0, 255, out=scaled)
    return scaled.astype(np.uint8)


def _percentiles(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    limits = np.zeros((len(values), 2))
    for i, band in enumerate(values):
        chosen = band[valid]
        chosen = chosen[np.isfinite(chosen)] if chosen.dtype.kind == "f" else chosen
        limits[i] = np.percentile(chosen, [2, 98]) if chosen.size else (0.0, 1.0)
    return limits


@dataclass
class Display:
    """How a source image is drawn: the stretch per band, and the display pyramid (RGBA, every
    ``factor``-th pixel, then every ``2 * factor``-th, ...; empty where GDAL's overviews serve)."""

    limits: np.ndarray
    factor: int
    levels: list[np.ndarray]


def _read_valid(
    dataset: Any, bands: tuple[int, ...], window: Any = None, out_shape: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """The bands' values and where all of them have data (the masks are only read where a band has one)."""
    from rasterio.enums import MaskFlags, Resampling

    flags = dataset.mask_flag_enums
    masked = any(flags[b - 1] != [MaskFlags.all_valid] for b in bands)
    data = dataset.read(list(bands), window=window, out_shape=out_shape, masked=masked, resampling=Resampling.nearest)
    if not masked:
        return data, np.ones(data.shape[1:], dtype=bool)
    return np.ma.getdata(data), np.asarray(~np.ma.getmaskarray(data).any(axis=0))


class Displays:
    """The ``Display`` of each (source, bands), built once per process or loaded from the cache folder
    that the server's worker processes share (``folder``; None keeps the pyramid in memory)."""

    SMALL = 512  # a source this wide or less is drawn from the file at every zoom

    def __init__(self) -> None:
        self.folder: Path | None = None
        self.lock = threading.Lock()
        self.known: dict[tuple[str, tuple[int, ...], tuple[int, ...]], Display] = {}
        self.building: dict[tuple[str, tuple[int, ...], tuple[int, ...]], threading.Lock] = {}

    def of(self, path: str, bands: tuple[int, ...], dataset: Any) -> Display:
        key = (path, _stamp(path), bands)
        with self.lock:
            if key in self.known:
                return self.known[key]
            building = self.building.setdefault(key, threading.Lock())
        with building:  # one thread of this process builds or loads it; the others wait for it
            with self.lock:
                if key in self.known:
                    return self.known[key]
            display = self._make(key, dataset)
            with self.lock:
                self.known[key] = display
        return display

    def _make(self, key: tuple[str, tuple[int, ...], tuple[int, ...]], dataset: Any) -> Display:
        bands = key[2]
        height, width = dataset.height, dataset.width
        if dataset.overviews(bands[0]) or max(height, width) <= self.SMALL:
            scale = max(1, max(height, width) // 1024)  # GDAL reads the overviews for this
            shape = (len(bands), max(1, height // scale), max(1, width // scale))
            return Display(_percentiles(*_read_valid(dataset, bands, out_shape=shape)), 0, [])
        if self.folder is None:
            return self._build(key[0], bands)
        stem = self.folder / hashlib.sha1(repr(key).encode()).hexdigest()[:20]
        with open(stem.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one process of the server builds; the others then load
            marker = stem.with_suffix(".json")
            if not marker.exists():
                display = self._build(key[0], bands)
                for i, level in enumerate(display.levels):
                    partial = stem.with_name(f"{stem.name}-{i}.npy.partial")
                    with open(partial, "wb") as out:
                        np.save(out, level)
                    os.replace(partial, stem.with_name(f"{stem.name}-{i}.npy"))
                written = {"limits": display.limits.tolist(), "factor": display.factor, "levels": len(display.levels)}
                marker.write_text(json.dumps(written))  # last: the pyramid is whole
            done = json.loads(marker.read_text())
        levels = [np.load(stem.with_name(f"{stem.name}-{i}.npy"), mmap_mode="r") for i in range(done["levels"])]
        return Display(np.array(done["limits"]), int(done["factor"]), levels)

    @staticmethod
    def _build(path: str, bands: tuple[int, ...]) -> Display:
        """Read the source once, a band of rows at a time, keeping every ``factor``-th pixel (factor 2,
        or more so that the first level is at most 8192 pixels across: 256 MiB of RGBA); stretch; halve to one tile.
        Its own dataset, decoding blocks on every core (tiles go on being read meanwhile)."""
        import rasterio

        with rasterio.Env(GDAL_NUM_THREADS="ALL_CPUS"), rasterio.open(path) as dataset:
            return Displays._pyramid(dataset, bands)

    @staticmethod
    def _pyramid(dataset: Any, bands: tuple[int, ...]) -> Display:
        from rasterio.windows import Window

        height, width = dataset.height, dataset.width
        factor = 2
        while max(height, width) > 8192 * factor:
            factor *= 2
        block = int(dataset.block_shapes[bands[0] - 1][0])
        strip = max(factor, -(-block // factor) * factor)
        rows, cols = -(-height // factor), -(-width // factor)
        values = np.empty((len(bands), rows, cols), dtype=dataset.dtypes[bands[0] - 1])
        valid = np.empty((rows, cols), dtype=bool)
        for row in range(0, height, strip):
            box = Window(0, row, width, min(strip, height - row))  # type: ignore[call-arg]
            data, ok = _read_valid(dataset, bands, window=box)
            values[:, row // factor : row // factor + -(-box.height // factor)] = data[:, ::factor, ::factor]
            valid[row // factor : row // factor + -(-box.height // factor)] = ok[::factor, ::factor]
        limits = _percentiles(values, valid)
        first = np.empty((rows, cols, 4), dtype=np.uint8)
        for row in range(0, rows, 1024):  # bounded float temporaries
            first[row : row + 1024] = stretch_rgba(values[:, row : row + 1024], valid[row : row + 1024], limits)
        levels = [first]
        while max(levels[-1].shape[:2]) > TILE:
            levels.append(np.ascontiguousarray(levels[-1][::2, ::2]))
        return Display(limits, factor, levels)


DISPLAYS = Displays()


def _grid(dataset: Any, band: int) -> tuple[int, int]:
    """The blocks the source is read and cached in: the file's own where they are tiles of a sensible
    size, else 256 x 256 (a strip-organised file decodes whole strips whatever is asked)."""
    rows, cols = (int(v) for v in dataset.block_shapes[band - 1])
    fits = 128 <= rows <= 1024 and 128 <= cols <= 1024
    return (rows, cols) if fits else (256, 256)


def _source_window(
    path: str, drawn: tuple[int, ...], display: Display, grid: tuple[int, int], box: TileWindow
) -> np.ndarray:
    """Rows ``box.row0:row1`` and columns ``box.col0:col1`` of the source, stretched, as RGBA: from the
    process's stretched source blocks, each read and stretched once."""
    from rasterio.windows import Window

    stamp = _stamp(path)

    def block(index: tuple[int, ...]) -> np.ndarray:
        def load() -> np.ndarray:
            with SOURCES.open(path) as dataset:
                r0, c0 = index[0] * grid[0], index[1] * grid[1]
                part = Window(c0, r0, min(grid[1], dataset.width - c0), min(grid[0], dataset.height - r0))  # type: ignore[call-arg]
                values, valid = _read_valid(dataset, drawn, window=part)
            return stretch_rgba(values, valid, display.limits)

        return BLOCKS.get(("source", path, stamp, drawn, index), load)

    bounds = [(box.row0, box.row1), (box.col0, box.col1)]
    return assemble(bounds, grid, block, np.uint8, (4,))


def image_tile(store: MaskStore, window: TileWindow, bands: tuple[int, ...] | None = None) -> bytes:
    """The source image under ``window``, stretched to 0..255 per band (2nd-98th percentile),
    transparent where the source has no data (RGBA; RGB where every pixel of the tile has data);
    every ``step``-th pixel, as the mask tiles."""
    source = store.info.source
    if source is None or not source.paths:
        raise QueryError(f"{store.path}: the store names no source image")
    path = source.paths[0]
    with SOURCES.open(path) as dataset:
        if (dataset.height, dataset.width) != tuple(store.info.shape):
            raise QueryError(f"{path}: the source is not the store's size any more")
        drawn = composite_bands(store, dataset, bands)
        display = DISPLAYS.of(path, drawn, dataset)
        grid = _grid(dataset, drawn[0])
        step = window.step
        if display.factor == 0 and step > 1 and dataset.overviews(drawn[0]):  # GDAL reads its overviews
            from rasterio.windows import Window

            box = Window(window.col0, window.row0, window.col1 - window.col0, window.row1 - window.row0)  # type: ignore[call-arg]
            shape = (len(drawn), window.rows, window.cols)
            rgba = stretch_rgba(*_read_valid(dataset, drawn, window=box, out_shape=shape), display.limits)
        else:
            rgba = None
    if rgba is None and display.factor and step >= display.factor:  # the display pyramid
        j = min(len(display.levels) - 1, int(np.log2(step // display.factor)))
        f = display.factor * 2**j
        k = step // f
        rows = slice(window.row0 // f, -(-window.row1 // f), k)
        rgba = np.asarray(display.levels[j][rows, window.col0 // f : -(-window.col1 // f) : k])
    elif rgba is None:  # the source's own pixels, every step-th
        rgba = _source_window(path, drawn, display, grid, window)[::step, ::step]
    if rgba.shape[:2] == (TILE, TILE) and rgba[..., 3].all():
        return encode(np.ascontiguousarray(rgba[..., :3]), photo=True)  # all opaque: RGB, a quarter less
    tile = np.zeros((TILE, TILE, 4), dtype=np.uint8)
    tile[: rgba.shape[0], : rgba.shape[1]] = rgba[:TILE, :TILE]
    return encode(tile, photo=True)


def _volume_slice(store: MaskStore, name: str, axis: int, index: int) -> np.ndarray:
    shape = store_array(store, name).shape
    if not 0 <= index < shape[axis]:
        raise QueryError(f"slice {index}: the volume has {shape[axis]} along that axis")
    selection: list[int | slice] = [slice(None)] * 3
    selection[axis] = index
    plane = BLOCKS.read(store, name, tuple(selection))
    return plane[::-1] if axis != 0 else plane  # coronal and sagittal: the first slice at the bottom


def slice_image(store: MaskStore, axis: str, index: int, centre: float, width: float) -> bytes:
    """One plane of the volume's HU image through a window (``centre`` +- ``width`` / 2 -> 0..255)."""
    name = store.info.arrays.image
    if not name or store.info.volume is None:
        raise QueryError(f"{store.path}: not a volume with its image")
    plane = _volume_slice(store, name, AXES[axis], index).astype(np.float32)
    plane -= np.float32(centre - width / 2)
    plane *= np.float32(255.0 / max(width, 1e-6))
    np.clip(np.nan_to_num(plane, nan=0.0), 0, 255, out=plane)
    return encode(plane.astype(np.uint8), photo=True)


def slice_labels(store: MaskStore, axis: str, index: int, hidden: set[int] = frozenset()) -> bytes:  # type: ignore[assignment]
    if store.info.volume is None:
        raise QueryError(f"{store.path}: not a volume")
    plane = _volume_slice(store, store.info.arrays.mask, AXES[axis], index)
    return palette_png(plane, class_lut(store, hidden))


def thumbnail(store: MaskStore, size: int = 160) -> bytes:
    """The mask in its class colours, at most ``size`` pixels across (a volume: its middle axial slice)."""
    levels = list(store.info.levels or [])
    array = store.mask
    for record in levels:  # the first level small enough, else the smallest
        array = level_array(store, record)
        if max(array.shape[-2:]) <= 4 * size:
            break
    plane = np.asarray(array[array.shape[0] // 2] if array.ndim == 3 else array[...])
    step = max(1, -(-max(plane.shape) // size))
    return png(class_lut(store)[plane[::step, ::step]])
