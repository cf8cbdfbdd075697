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

from typing import Any, cast

import numpy as np
import zarr

from pipeline.core import ngff
from pipeline.core.pyramid import level_shapes, level_transform, mean2x, mode2x, ngff_scale_translation
from pipeline.core.stats import NODATA
from pipeline.store.location import open_group
from pipeline.store.mask_store import VOLUME_IMAGE, MaskStore, class_attrs

MAP_LEVELS = "levels/mask"


def write_levels(store: MaskStore) -> list[dict[str, Any]]:
    """Write every level of ``store``'s mask (and of a volume's image and regions); returns what the
    store's ``levels`` records."""
    info = store.info
    mask = store.mask
    shapes = level_shapes(mask.shape, mask.chunks)
    volume = info.volume is not None
    classes = tuple((c.name, c.color) for c in info.classes)
    # groups opened past the consolidated metadata: a group object taken from it would write its stale
    # listing back into the group's zarr.json with its attributes, hiding the new levels
    group = _open(store, "labels/mask") if volume else _open(store, "").require_group(MAP_LEVELS)
    _label_levels(group, mask, shapes, NODATA, class_attrs(classes))
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
        _set_multiscales(group, _ngff("mask", spacing, len(shapes) + 1, "0"))
        root = store.group  # the store's own handle: its attributes are rewritten by update_meta below
        if info.image_ingested and store.image is not None:
            _clear(root, keep=VOLUME_IMAGE)
            source = store.image
            for level, shape in enumerate(shapes, start=1):
                target = _create(root, str(level), shape, store.image, fill=np.nan)
                _halve(source, target, mean2x)
                source = target
                records[level - 1]["image"] = str(level)
        # NGFF: the image and its label images have as many levels
        _set_multiscales(root, _ngff("image", spacing, len(shapes) + 1, "0"))
        if info.arrays.regions:
            write_region_levels(store, len(shapes))
    else:
        group.attrs.update(
            {
                "multiscales": _ngff(
                    "mask", _map_spacing(info.transform), len(shapes) + 1, f"../../{info.arrays.mask}",
                    axes=("y", "x"), unit=_unit(info),
                ),
                "long_name": "lower resolution levels of the mask (mode of 2 x 2)",
            }
        )  # fmt: skip
    store.update_meta(levels=records)
    return records


def write_region_levels(store: MaskStore, count: int | None = None) -> None:
    """A volume's ``labels/regions`` levels (mode of region ids, 0 = none), as many as the mask has;
    called again when the regions are relabelled."""
    info = store.info
    if info.volume is None or not info.arrays.regions:
        return
    mask = store.mask
    shapes = level_shapes(mask.shape, mask.chunks)
    if count is None:
        count = len(info.levels or [])
    group = _open(store, "labels/regions")
    _label_levels(group, group["0"], shapes[:count], 0, {})  # type: ignore[arg-type]
    spacing = [float(v) for v in info.volume.spacing_mm]
    _set_multiscales(group, _ngff("regions", spacing, count + 1, "0"))


def _open(store: MaskStore, path: str) -> zarr.Group:
    return open_group(store.path / path if path else store.path, mode="r+", use_consolidated=False)


def _label_levels(
    group: zarr.Group, level0: zarr.Array, shapes: list[tuple[int, ...]], nodata: int, attrs: Any
) -> None:
    _clear(group, keep="0")
    source = level0
    for level, shape in enumerate(shapes, start=1):
        target = _create(group, str(level), shape, level0, fill=nodata, attributes=attrs)
        _halve(source, target, lambda a: mode2x(a, nodata))
        source = target


def _set_multiscales(group: zarr.Group, multiscales: list[dict[str, Any]]) -> None:
    ome = dict(cast(dict[str, Any], group.attrs.get("ome") or {}))
    ome["multiscales"] = multiscales
    group.attrs.update({"ome": ome})


def _clear(group: zarr.Group, keep: str) -> None:
    """Remove the level arrays (named 1, 2, ...) an earlier attempt left; never ``keep``, level 0."""
    for name in list(group.array_keys()):
        if name != keep and name.isdigit():
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
