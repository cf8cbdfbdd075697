"""What the viewer draws, as PNG bytes: map tiles of the mask and of the source image, slices of a
volume's HU image and labels, thumbnails. Read straight from the store (and the source file) for each
request; the lower-resolution levels of the mask are read where the zoom allows."""

from __future__ import annotations

import io
import threading
import weakref
from typing import Any

import numpy as np
import zarr

from pipeline.core.colors import rgb
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
    """``pixels`` (rows, cols) grey or (rows, cols, 3|4) as PNG; fast compression (tiles are transient)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def palette_png(labels: np.ndarray, lut: np.ndarray) -> bytes:
    """Class ids as a palette PNG (one byte a pixel: far smaller and faster to encode than RGBA), the
    palette and its transparency from ``lut`` (256 RGBA entries)."""
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(labels, dtype=np.uint8), mode="P")
    image.putpalette(lut[:, :3].tobytes())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1, transparency=lut[:, 3].tobytes())
    return buffer.getvalue()


def class_lut(store: MaskStore, hidden: set[int] = frozenset()) -> np.ndarray:  # type: ignore[assignment]
    """(256, 4) RGBA per class id: the class colour, opaque; nodata and hidden classes transparent."""
    lut = np.zeros((256, 4), dtype=np.uint8)
    for c in store.info.classes:
        if c.id not in hidden:
            lut[c.id, :3] = rgb(c.color)
            lut[c.id, 3] = 255
    lut[NODATA] = 0
    return lut


_LEVELS: weakref.WeakKeyDictionary[MaskStore, dict[str, zarr.Array]] = weakref.WeakKeyDictionary()
_LEVELS_LOCK = threading.Lock()


def level_array(store: MaskStore, record: dict[str, Any]) -> zarr.Array:
    """A level's mask array (map levels and a volume's label levels live in nested groups), opened
    once per opened store: every zoomed-out tile reads one."""
    from pipeline.store.location import open_array

    with _LEVELS_LOCK:
        opened = _LEVELS.setdefault(store, {})
        array = opened.get(record["mask"])
    if array is None:
        array = open_array(store.path / record["mask"])
        with _LEVELS_LOCK:
            opened[record["mask"]] = array
    return array


def _place(window: TileWindow, rgba: np.ndarray, tile: int = TILE) -> np.ndarray:
    out = np.zeros((tile, tile, rgba.shape[-1]), dtype=np.uint8)
    out[: rgba.shape[0], : rgba.shape[1]] = rgba[:tile, :tile]
    return out


def mask_tile(store: MaskStore, window: TileWindow, hidden: set[int] = frozenset()) -> bytes:  # type: ignore[assignment]
    """The mask under ``window`` in the class colours (every ``step``-th pixel of the coarsest level
    that has enough of them, so a level pixel is the mode of the pixels it stands for)."""
    levels = list(store.info.levels or [])
    level = level_for(window.step, len(levels))
    array = store.mask if level == 0 else level_array(store, levels[level - 1])
    f, k = 2**level, window.step // 2**level
    rows = slice(window.row0 // f, -(-window.row1 // f))
    cols = slice(window.col0 // f, -(-window.col1 // f))
    data = np.asarray(array[rows, cols])[::k, ::k]
    tile = np.full((TILE, TILE), NODATA, dtype=np.uint8)  # past the image's edge: nodata, transparent
    tile[: data.shape[0], : data.shape[1]] = data[:TILE, :TILE]
    return palette_png(tile, class_lut(store, hidden))


class _Stretch:
    """Per-band 2nd and 98th percentiles of a source image, from one decimated read, kept per source."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.known: dict[tuple[str, tuple[int, ...]], np.ndarray] = {}

    def of(self, path: str, bands: tuple[int, ...], dataset: Any) -> np.ndarray:
        key = (path, bands)
        with self.lock:
            if key in self.known:
                return self.known[key]
        scale = max(1, max(dataset.height, dataset.width) // 512)
        shape = (len(bands), max(1, dataset.height // scale), max(1, dataset.width // scale))
        data = dataset.read(list(bands), out_shape=shape, masked=True).astype("float64")
        limits = np.zeros((len(bands), 2))
        for i, band in enumerate(data):
            values = band.compressed() if np.ma.isMaskedArray(band) else band.ravel()
            values = values[np.isfinite(values)]
            limits[i] = np.percentile(values, [2, 98]) if values.size else (0.0, 1.0)
        with self.lock:
            self.known[key] = limits
        return limits


STRETCH = _Stretch()


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


def image_tile(store: MaskStore, window: TileWindow, bands: tuple[int, ...] | None = None) -> bytes:
    """The source image under ``window``, stretched to 0..255 per band (2nd-98th percentile);
    transparent where the source has no data."""
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.windows import Window

    source = store.info.source
    if source is None or not source.paths:
        raise QueryError(f"{store.path}: the store names no source image")
    path = source.paths[0]
    with rasterio.open(path) as dataset:
        if (dataset.height, dataset.width) != tuple(store.info.shape):
            raise QueryError(f"{path}: the source is not the store's size any more")
        drawn = composite_bands(store, dataset, bands)
        limits = STRETCH.of(path, drawn, dataset)
        shape = (len(drawn), window.rows, window.cols)
        box = Window(window.col0, window.row0, window.col1 - window.col0, window.row1 - window.row0)  # type: ignore[call-arg]
        data = dataset.read(list(drawn), window=box, out_shape=shape, masked=True, resampling=Resampling.nearest)
    low, high = limits[:, 0, None, None], limits[:, 1, None, None]
    scaled = np.clip((np.asarray(data.filled(np.nan), dtype="float64") - low) / np.maximum(high - low, 1e-12), 0, 1)
    grey = scaled if len(drawn) == 3 else np.repeat(scaled, 3, axis=0)
    rgba = np.empty((window.rows, window.cols, 4), dtype=np.uint8)
    rgba[..., :3] = np.nan_to_num(np.moveaxis(grey, 0, -1) * 255).astype(np.uint8)
    valid = ~np.ma.getmaskarray(data).any(axis=0)
    rgba[..., 3] = np.where(valid, 255, 0)
    return png(_place(window, rgba))


def _volume_slice(array: zarr.Array, axis: int, index: int) -> np.ndarray:
    if not 0 <= index < array.shape[axis]:
        raise QueryError(f"slice {index}: the volume has {array.shape[axis]} along that axis")
    selection: list[Any] = [slice(None)] * 3
    selection[axis] = index
    plane = np.asarray(array[tuple(selection)])
    return plane[::-1] if axis != 0 else plane  # coronal and sagittal: the first slice at the bottom


def slice_image(store: MaskStore, axis: str, index: int, centre: float, width: float) -> bytes:
    """One plane of the volume's HU image through a window (``centre`` +- ``width`` / 2 -> 0..255)."""
    image = store.image
    if image is None or store.info.volume is None:
        raise QueryError(f"{store.path}: not a volume with its image")
    plane = _volume_slice(image, AXES[axis], index).astype("float64")
    grey = np.clip((plane - (centre - width / 2)) / max(width, 1e-6), 0, 1)
    return png(np.nan_to_num(grey * 255).astype(np.uint8))


def slice_labels(store: MaskStore, axis: str, index: int, hidden: set[int] = frozenset()) -> bytes:  # type: ignore[assignment]
    if store.info.volume is None:
        raise QueryError(f"{store.path}: not a volume")
    plane = _volume_slice(store.mask, AXES[axis], index)
    return palette_png(plane, class_lut(store, hidden))


def thumbnail(store: MaskStore, size: int = 160) -> bytes:
    """The mask in its class colours, at most ``size`` pixels across (a volume: its middle axial slice)."""
    mask = store.mask
    levels = list(store.info.levels or [])
    array = mask
    for record in levels:  # the first level small enough, else the smallest
        array = level_array(store, record)
        if max(array.shape[-2:]) <= 4 * size:
            break
    plane = np.asarray(array[array.shape[0] // 2] if array.ndim == 3 else array[...])
    step = max(1, -(-max(plane.shape) // size))
    return png(class_lut(store)[plane[::step, ::step]])
