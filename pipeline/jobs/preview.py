"""A preview PNG beside the store: the source (decimated, stretched) with the mask overlaid and a legend."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from rasterio.errors import NotGeoreferencedWarning

from pipeline.core.colors import rgb
from pipeline.core.geometry import Box
from pipeline.core.stats import NODATA
from pipeline.sources.geotiff import open_raster
from pipeline.sources.inputs import Source
from pipeline.store import MaskStore
from pipeline.store.location import ObjectPath, put_object

MAX_EDGE = 1024
ALPHA = 0.45


def preview_path(store_path: Any) -> Any:
    return store_path.with_name(store_path.name.removesuffix(".zarr") + ".preview.png")


def write_preview(store: MaskStore, source: Source) -> Any:
    """Images: the source decimated to at most 1024 px. Volumes: the middle slice."""
    if store.image is not None:
        mid = store.image.shape[0] // 2
        mask = np.asarray(store.mask[mid])
        image = np.ma.masked_invalid(np.asarray(store.image[mid], dtype=np.float64))
        base = np.stack([_stretch(image)] * 3, axis=-1)
    elif store.info.source is not None and store.info.source.modality:  # a 2-D DICOM image: small enough to read whole
        step = max(1, -(-max(store.mask.shape) // MAX_EDGE))
        mask = np.asarray(store.mask[::step, ::step])
        pixels, _ = source.read(Box((0, 0), tuple(store.mask.shape)))
        layers = [np.ma.masked_invalid(band[::step, ::step].astype(np.float64)) for band in pixels[:3]]
        stretched = [_stretch(layer) for layer in layers]
        base = np.stack(stretched * 3 if len(stretched) == 1 else stretched, axis=-1)
    else:
        step = max(1, -(-max(store.mask.shape) // MAX_EDGE))
        mask = np.asarray(store.mask[::step, ::step])
        assert store.info.source is not None
        base = _base_image(store.info.source.paths, store.info.source.bands, mask.shape)
    classes = [c.model_dump(exclude_none=True) for c in store.info.classes]
    colours = np.zeros((256, 3), dtype=np.float32)
    for cls in classes:
        colours[cls["id"]] = rgb(cls["color"])
    overlay = colours[mask]
    blend = np.where((mask != NODATA)[..., None], (1 - ALPHA) * base + ALPHA * overlay, base * 0.5)
    image_out = Image.fromarray(blend.clip(0, 255).astype(np.uint8))
    out = _with_legend(image_out, classes, (store.info.stats or {}).get("classes", {}))
    path = preview_path(store.path)
    if isinstance(path, ObjectPath):  # beside the store in the bucket
        import io

        buffer = io.BytesIO()
        out.save(buffer, format="PNG")
        put_object(path, buffer.getvalue())
        return path
    out.save(path)
    return path


def _base_image(paths: list[str], bands: list[int], shape: tuple[int, ...]) -> np.ndarray:
    chosen = bands[:3] if len(bands) >= 3 else bands[:1]
    layers = []
    for band in chosen:
        path, index = (paths[0], band) if len(paths) == 1 else (paths[band - 1], 1)
        with open_raster(path) as src, warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            layers.append(src.read(index, out_shape=shape, masked=True).astype(np.float64))
    stretched = [_stretch(layer) for layer in layers]
    return np.stack(stretched * 3 if len(stretched) == 1 else stretched, axis=-1)


def _stretch(layer: np.ma.MaskedArray) -> np.ndarray:
    values = layer.compressed()
    if values.size == 0:
        return np.zeros(layer.shape)
    lo, hi = np.percentile(values, [2, 98])
    scaled = (layer.filled(lo) - lo) / max(hi - lo, 1e-12) * 255.0
    return np.asarray(scaled.clip(0, 255))


def _with_legend(image: Image.Image, classes: list[dict], table: dict) -> Image.Image:
    font = ImageFont.load_default(size=14)
    rows = [(c["color"], _legend_text(c["name"], table.get(c["name"], {}))) for c in classes]
    rows.append(("#000000", "nodata"))
    width = 20 + max(int(font.getlength(text)) for _, text in rows) + 40
    canvas = Image.new("RGB", (image.width + width, max(image.height, 24 * len(rows) + 20)), "white")
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, (colour, text) in enumerate(rows):
        y = 10 + 24 * i
        draw.rectangle([image.width + 10, y, image.width + 26, y + 16], fill=colour, outline="black")
        draw.text((image.width + 34, y), text, fill="black", font=font)
    return canvas


def _legend_text(name: str, row: dict) -> str:
    if row.get("area_ha") is not None:
        return f"{name}: {row['area_ha']:,.1f} ha"
    if row.get("area_cm2") is not None:
        return f"{name}: {row['area_cm2']:,.2f} cm²"
    if row.get("volume_ml") is not None:
        return f"{name}: {row['volume_ml']:,.1f} mL"
    if row.get("pixels") is not None:
        return f"{name}: {row['pixels']:,} px"
    return name
