"""Write a finished store's lower-resolution levels (``pipeline.core.pyramid`` has the rules).

Volumes, as OME-Zarr (NGFF 0.5) wants them: ``labels/mask/1..n`` beside ``labels/mask/0`` (mode) and,
when the HU image is stored, ``1..n`` beside the image's ``0`` at the root (mean), each listed in its
group's ``multiscales`` with scale and translation, so napari, vizarr and Neuroglancer browse them.
Maps, in the same layout under ``levels/``: ``levels/mask/1..n`` (mode), their group's
``multiscales`` naming ``../../mask`` as level 0 with y/x scale and translation in the CRS's units,
and each level's GDAL geotransform in the store metadata (``levels``), which ``raymask export``
gives GDAL as the COG's overviews.

Levels are written after every unit of the mask landed and before the store is marked complete; a
run cut short while writing them rewrites them when resumed. Each level is read from the one above
it a band of chunk rows at a time (memory: two bands of the finer level).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import zarr

from pipeline.core import ngff
from pipeline.core.pyramid import level_shapes, level_transform, mean2x, mode2x, ngff_scale_translation
from pipeline.core.stats import NODATA
from pipeline.store.mask_store import VOLUME_IMAGE, MaskStore, class_attrs

MAP_LEVELS = "levels/mask"


def write_levels(store: MaskStore) -> list[dict[str, Any]]:
    """Write every level of ``store``'s mask (and of a volume's image); returns what ``levels`` records."""
    info = store.info
    mask = store.mask
    shapes = level_shapes(mask.shape, mask.chunks)
    volume = info.volume is not None
    classes = tuple((c.name, c.color) for c in info.classes)
    if volume:
        group = zarr.open_group(store.path / "labels" / "mask", mode="r+")
        label_paths = [str(k) for k in range(1, len(shapes) + 1)]
    else:
        group = zarr.open_group(store.path, mode="r+").require_group(MAP_LEVELS)
        label_paths = [str(k) for k in range(1, len(shapes) + 1)]
    _clear(group, keep="0" if volume else None)
    source = mask
    for path, shape in zip(label_paths, shapes, strict=True):
        target = _create(group, path, shape, mask, fill=NODATA, attributes=class_attrs(classes))
        _halve(source, target, lambda a: mode2x(a, NODATA))
        source = target
    records: list[dict[str, Any]] = []
    for level, shape in enumerate(shapes, start=1):
        record: dict[str, Any] = {"level": level, "shape": list(shape)}
        record["mask"] = f"labels/mask/{level}" if volume else f"{MAP_LEVELS}/{level}"
        if info.transform:
            record["transform"] = level_transform(info.transform, level)
        records.append(record)
    if volume:
        assert info.volume is not None
        spacing = [float(v) for v in info.volume.spacing_mm]
        attrs = dict(group.attrs)
        attrs["ome"] = {**attrs["ome"], "multiscales": _ngff("mask", spacing, len(shapes) + 1, "0")}
        group.attrs.update(attrs)
        if info.image_ingested and store.image is not None:
            root = zarr.open_group(store.path, mode="r+")
            _clear(root, keep=VOLUME_IMAGE, only=[str(k) for k in range(1, 64)])
            source = store.image
            for level, shape in enumerate(shapes, start=1):
                target = _create(root, str(level), shape, store.image, fill=np.nan)
                _halve(source, target, mean2x)
                source = target
                records[level - 1]["image"] = str(level)
            root_attrs = dict(root.attrs)
            root_attrs["ome"] = {**root_attrs["ome"], "multiscales": _ngff("image", spacing, len(shapes) + 1, "0")}
            root.attrs.update(root_attrs)
    else:
        spacing = _map_spacing(info.transform)
        group.attrs.update(
            {
                "multiscales": _ngff(
                    "mask", spacing, len(shapes) + 1, f"../../{info.arrays.mask}", axes=("y", "x"), unit=_unit(info)
                ),
                "long_name": "lower resolution levels of the mask (mode of 2 x 2)",
            }
        )
    store.update_meta(levels=records)
    return records


def _clear(group: zarr.Group, keep: str | None, only: list[str] | None = None) -> None:
    """Remove level arrays a cut-short earlier attempt left (never ``keep``, level 0)."""
    for name in list(group.array_keys()):
        if name == keep or (only is not None and name not in only) or not name.isdigit():
            continue
        del group[name]


def _create(
    group: zarr.Group, path: str, shape: tuple[int, ...], like: zarr.Array, *, fill: Any, attributes: Any = None
) -> zarr.Array:
    chunks = tuple(min(c, s) for c, s in zip(like.chunks, shape, strict=True))
    return group.create_array(
        path,
        shape=shape,
        dtype=like.dtype,
        chunks=chunks,
        fill_value=fill,
        dimension_names=like.metadata.dimension_names,  # type: ignore[union-attr]
        attributes=attributes or {},
        overwrite=True,
    )


def _halve(source: zarr.Array, target: zarr.Array, reduce: Any) -> None:
    """``target`` = ``reduce`` of ``source``, one band of target chunk rows (and slices) at a time."""
    rows, height = target.chunks[-2], target.shape[-2]
    lead = target.shape[:-2]
    lead_chunk = target.chunks[:-2]
    for start in _starts(lead, lead_chunk):
        lead_slices = tuple(slice(s, min(s + c, n)) for s, c, n in zip(start, lead_chunk, lead, strict=True))
        for r0 in range(0, height, rows):
            r1 = min(r0 + rows, height)
            block = np.asarray(source[(*lead_slices, slice(2 * r0, min(2 * r1, source.shape[-2])), slice(None))])
            target[(*lead_slices, slice(r0, r1), slice(None))] = reduce(block)


def _starts(shape: tuple[int, ...], chunks: tuple[int, ...]) -> list[tuple[int, ...]]:
    if not shape:
        return [()]
    grids = np.meshgrid(*[np.arange(0, n, c) for n, c in zip(shape, chunks, strict=True)], indexing="ij")
    return [tuple(int(v) for v in point) for point in np.stack([g.ravel() for g in grids], axis=-1)]


def _ngff(
    name: str,
    spacing: list[float],
    count: int,
    first: str,
    *,
    axes: tuple[str, ...] = ngff.AXES,
    unit: str | None = "millimeter",
) -> list[dict[str, Any]]:
    datasets = []
    for level in range(count):
        scale, translation = ngff_scale_translation(spacing, level)
        transforms: list[dict[str, Any]] = [{"type": "scale", "scale": scale}]
        if level:
            transforms.append({"type": "translation", "translation": translation})
        datasets.append({"path": first if level == 0 else str(level), "coordinateTransformations": transforms})
    shown_axes = [{"name": a, "type": "space", **({"unit": unit} if unit else {})} for a in axes]
    return [{"name": name, "axes": shown_axes, "datasets": datasets}]


def _map_spacing(transform: list[float] | None) -> list[float]:
    """(row, column) pixel size of a north-up map in CRS units; 1 for pixel-space images."""
    if not transform:
        return [1.0, 1.0]
    _, a, _, _, _, e = transform
    return [abs(float(e)), abs(float(a))]


def _unit(info: Any) -> str | None:
    if not info.crs:
        return None
    from pyproj import CRS

    crs = CRS.from_wkt(info.crs)
    if crs.is_geographic:
        return "degree"
    unit = crs.axis_info[0].unit_name if crs.axis_info else ""
    return "meter" if unit in ("metre", "meter") else None
