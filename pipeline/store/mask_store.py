"""The mask store: one zarr v3 group per input.

Layout::

    STORE.zarr/
      zarr.json             group; attrs["raymask"] holds provenance, status and statistics
      mask                  (y, x) uint8 class ids, 255 = nodata, chunked as the work grid
      y, x                  pixel-centre coordinates (georeferenced, unrotated grids)
      spatial_ref           0-d; CF grid mapping: crs_wkt, spatial_ref, GeoTransform
      units/pixels          (uy, ux, class) int64 per work unit; -1 until the unit landed
      units/measure         (uy, ux, class) float64 per work unit: m², mm² or mm³ (the unit: attrs measure)
      units/near_ties       (uy, ux) int64 per work unit: pixels whose top two logits are within 2e-4
      probability           (class, y, x) uint8 round(p * 254), 255 = nodata (output.probabilities; volumes too)
      regions               (y, x) uint32 connected-region ids, 0 = none (volumes: labels/regions/0)
      region_table/         one 1-D array per column, one row per region (pipeline.core.region_table)

Each output chunk is written by exactly one task, whole, so there is no read-modify-write and
a retried task rewrites the same bytes. A unit's ``units/pixels`` row is written after its mask
chunks: its presence is the unit's "done" mark, so a resumed job skips exactly those units and
the final statistics are summed from the store, not from what one run happened to see.
``status`` becomes ``complete`` only after every unit is done.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import zarr
import zarr.errors

from pipeline.core import ngff
from pipeline.core.geometry import Box, TileGrid, WorkUnit
from pipeline.core.georef import Georef, cf_grid_mapping, pixel_measure
from pipeline.core.stats import NODATA, PROBABILITY_SCALE, ChunkStats, PixelMeasure, count_classes
from pipeline.core.transform import axis_centres
from pipeline.core.volume import VolumeGeometry
from pipeline.errors import StoreError, one_line
from pipeline.store.location import (
    ObjectPath,
    StorePath,
    copy_prefix,
    creation_marker,
    delete_object,
    delete_prefix,
    get_object,
    key_exists,
    open_array,
    open_group,
    put_object,
    refuse_foreign,
    refuse_replacing,
    replacement_marker,
    store_path,
    unreachable,
    upload_tree,
    zarr_store,
)
from pipeline.store.meta import FORMAT, VERSION, StoreMeta, parse_meta

VOLUME_IMAGE = "0"  # the NGFF image's level 0, at the root
VOLUME_MASK = "labels/mask/0"
VOLUME_REGIONS = "labels/regions/0"
REGION_TABLE = "region_table"
PROBABILITY = "probability"
INCOMPLETE, COMPLETE = "incomplete", "complete"


@dataclass(frozen=True)
class StoreLayout:
    """What a store is created with; everything else is filled in as the job runs."""

    grid: TileGrid
    classes: tuple[tuple[str, str], ...]
    georef: Georef
    provenance: dict[str, Any]
    volume: VolumeGeometry | None = None  # set for volumetric (OME-Zarr) stores
    pixel_area_mm2: float | None = None  # 2-D medical images with a stated pixel spacing
    probabilities: bool = False  # a per-class probability array beside the mask
    codes: dict[str, dict[str, Any]] = field(default_factory=dict)  # class name -> {category, type} (DICOM SEG)

    @property
    def measure_unit(self) -> str | None:
        """The unit of the store's measures: m² of ground, mm³ of tissue, mm² of an image, or None."""
        if self.volume is not None:
            return "mm3"
        if self.pixel_area_mm2 is not None:
            return "mm2"
        return "m2" if self.georef.crs_wkt is not None and self.georef.transform is not None else None


class MaskStore:
    def __init__(self, path: StorePath, group: zarr.Group) -> None:
        self.path: StorePath = path  # a Path, or an ObjectPath (``s3://...``) for a store read from object storage
        self.group = group
        self._writing: dict[str, zarr.Array] = {}
        self._info: StoreMeta | None = None  # arrays write_unit writes, opened once (their metadata is fixed)
        self._reader: zarr.Array | None = None  # the mask as read_mask reads it, opened once

    # -- opening -----------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path | ObjectPath, *, mode: str = "r") -> MaskStore:
        where = store_path(path)
        if isinstance(where, ObjectPath):
            try:
                found = key_exists(where, "zarr.json")
            except StoreError:
                raise
            except Exception as exc:  # obstore: credentials, bucket, endpoint; one line naming the URL
                raise unreachable(where, exc) from exc
            if not found:
                refuse_replacing(where)
                raise StoreError(f"{where}: no such store")
            return cls._opened(where, open_group(where, mode="r" if mode == "r" else "r+"))
        path = where
        if not path.exists():
            raise StoreError(f"{path}: no such store")
        try:
            group = zarr.open_group(str(path), mode=mode)  # type: ignore[arg-type]
        except (zarr.errors.GroupNotFoundError, FileNotFoundError, ValueError) as exc:
            meta = path / "zarr.json"
            if meta.is_file():
                raise StoreError(
                    f"{path}: not a raymask store any more: zarr.json is damaged ({one_line(exc, 80)})"
                ) from exc
            raise StoreError(f"{path}: not a zarr store") from exc
        return cls._opened(path, group)

    @classmethod
    def _opened(cls, path: StorePath, group: zarr.Group) -> MaskStore:
        store = cls(path, group)
        _ = store.info  # parses and checks the metadata: a foreign, damaged or newer store fails here
        return store

    @classmethod
    def create(cls, path: str | Path | ObjectPath, layout: StoreLayout) -> MaskStore:
        """Build the empty store beside ``path`` and rename it into place, so that a crash
        during creation never leaves a half-made store where a job will look for one.

        Object storage has no rename: the store is built at its prefix under a marker object
        (``NAME.zarr.creating``), its root metadata (what makes it a raymask store) written last and
        the marker removed after. A prefix that holds a marker is an interrupted creation, cleared
        before building again; one that holds anything else is not touched."""
        where = store_path(path)
        if isinstance(where, ObjectPath):
            marker = creation_marker(where)
            refuse_foreign(where)
            put_object(marker, _now().encode())
            delete_prefix(where)
            cls._build(where, layout)
            delete_object(marker)
            return cls.open(where, mode="r+")
        path = where
        staging = path.with_name(f".{path.name}.creating-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        cls._build(staging, layout)
        os.rename(staging, path)
        return cls.open(path, mode="r+")

    @classmethod
    def _build(cls, path: StorePath, layout: StoreLayout) -> None:
        grid = layout.grid
        group = open_group(path, mode="w", zarr_format=3)
        meta = dict(layout.provenance)
        meta.update(
            format=FORMAT,
            version=VERSION,
            status=INCOMPLETE,
            created=_now(),
            shape=list(grid.shape),
            classes=[
                {"id": i, "name": n, "color": c, **({"code": layout.codes[n]} if n in layout.codes else {})}
                for i, (n, c) in enumerate(layout.classes)
            ],
            nodata=NODATA,
            crs=layout.georef.crs_wkt,
            transform=list(layout.georef.transform) if layout.georef.transform else None,
            measure=layout.measure_unit,  # the key on disk: see StoreMeta.measure_unit
            pixel_area_mm2=layout.pixel_area_mm2,
            arrays={
                "mask": "mask" if layout.volume is None else VOLUME_MASK,
                "image": None,
                **({"probability": PROBABILITY} if layout.probabilities else {}),
            },
            every_chunk=True,
        )
        names = [n for n, _ in layout.classes]
        if layout.volume is not None:
            meta["volume"] = ngff.geometry_attrs(layout.volume)
            meta["arrays"]["image"] = VOLUME_IMAGE
            group.attrs.update(ngff.image_attrs(layout.volume))
            cls._build_volume(group, layout)
        else:
            cls._build_image(group, layout)
        if layout.probabilities:
            dims = ["class", *ngff.AXES] if layout.volume is not None else ["class", "y", "x"]
            group.create_array(
                PROBABILITY,
                shape=(len(names), *grid.shape),
                dtype="uint8",
                chunks=(len(names), *grid.chunk),
                fill_value=NODATA,
                dimension_names=dims,
                attributes={"long_name": "class probability", "scale": 1 / PROBABILITY_SCALE, "classes": names},
            )
        parse_meta(meta, str(path))  # what is written is what readers accept
        group.attrs["raymask"] = meta
        cls._build_units(group, grid, len(names))
        _consolidate(path)

    @classmethod
    def _build_volume(cls, group: zarr.Group, layout: StoreLayout) -> None:
        assert layout.volume is not None
        grid, dims = layout.grid, list(ngff.AXES)
        group.create_array(
            VOLUME_IMAGE, shape=grid.shape, dtype="float32", chunks=grid.chunk, fill_value=np.nan, dimension_names=dims
        )
        labels = group.create_group("labels", attributes=ngff.labels_group_attrs(["mask"]))
        label = labels.create_group("mask", attributes=ngff.label_image_attrs(layout.volume, layout.classes))
        label.create_array(
            "0", shape=grid.shape, dtype="uint8", chunks=grid.chunk, fill_value=NODATA, dimension_names=dims,
            attributes=class_attrs(layout.classes),
        )  # fmt: skip

    @classmethod
    def _build_image(cls, group: zarr.Group, layout: StoreLayout) -> None:
        grid = layout.grid
        mask_attrs = class_attrs(layout.classes)
        georeferenced = layout.georef.crs_wkt is not None or layout.georef.transform is not None
        if georeferenced:
            mask_attrs["grid_mapping"] = "spatial_ref"
            ref = group.create_array("spatial_ref", shape=(), dtype="int64", fill_value=0, dimension_names=[])
            ref.attrs.update(cf_grid_mapping(layout.georef))
            ref[...] = 0
        if layout.georef.transform is not None and not layout.georef.is_rotated:
            y, x = axis_centres(layout.georef.transform, (grid.shape[0], grid.shape[1]))
            for name, values, standard in (("y", y, "projection_y_coordinate"), ("x", x, "projection_x_coordinate")):
                coord = group.create_array(
                    name, shape=values.shape, dtype="float64", chunks=values.shape, dimension_names=[name]
                )
                coord[:] = values
                coord.attrs.update({"standard_name": standard, "axis": name.upper()})
        group.create_array(
            "mask",
            shape=grid.shape,
            dtype="uint8",
            chunks=grid.chunk,
            fill_value=NODATA,
            dimension_names=["y", "x"],
            attributes=mask_attrs,
        )

    @classmethod
    def _build_units(cls, group: zarr.Group, grid: TileGrid, n: int) -> None:
        units = group.create_group("units")
        chunks = (1,) * len(grid.unit_grid_shape) + (n,)
        dims = [f"unit_{a}" for a in ("z", "y", "x")[-len(grid.unit_grid_shape) :]] + ["class"]
        units.create_array(
            "pixels",
            shape=(*grid.unit_grid_shape, n),
            dtype="int64",
            chunks=chunks,
            fill_value=-1,
            dimension_names=dims,
        )
        units.create_array(
            "measure",
            shape=(*grid.unit_grid_shape, n),
            dtype="float64",
            chunks=chunks,
            fill_value=np.nan,
            dimension_names=dims,
        )
        units.create_array(
            "near_ties",
            shape=grid.unit_grid_shape,
            dtype="int64",
            chunks=chunks[:-1],
            fill_value=-1,
            dimension_names=dims[:-1],
        )

    @staticmethod
    def remove(path: str | Path | ObjectPath) -> None:
        """Delete a raymask store (and only that: a foreign directory is refused)."""
        store = MaskStore.open(path)
        if isinstance(store.path, ObjectPath):
            delete_prefix(store.path)
        else:
            shutil.rmtree(store.path)

    # -- reading -----------------------------------------------------------------------------

    @property
    def meta(self) -> dict[str, Any]:
        """The raw metadata (what ``info`` parses); write through ``update_meta``."""
        return cast(dict[str, Any], self.group.attrs.get("raymask"))

    @property
    def info(self) -> StoreMeta:
        """The store's metadata, typed (``pipeline.store.meta``)."""
        if self._info is None:
            self._info = parse_meta(self.group.attrs.get("raymask"), str(self.path))
        return self._info

    @property
    def status(self) -> str:
        return self.info.status

    @property
    def mask(self) -> zarr.Array:
        return cast(zarr.Array, self.group[self.info.arrays.mask])

    def read_mask(self, box: Box) -> np.ndarray:
        """The labels in ``box``; a chunk file that is missing (where every chunk was written) or
        cannot be decoded is one line naming the store and the chunk, never nodata or a traceback."""
        if self._reader is None:  # opened once: each open reads and parses the array's metadata
            self._reader = self.mask
        mask = self._reader
        first = [a // c for a, c in zip(box.start, mask.chunks)]
        last = [max(f, (b - 1) // c) for f, b, c in zip(first, box.stop, mask.chunks)]
        keys = ["/".join(str(i + f) for i, f in zip(index, first))
                for index in np.ndindex(*[b - a + 1 for a, b in zip(first, last)])]  # fmt: skip
        if self.info.every_chunk and self.info.complete and box.size:  # an unfinished store lacks chunks
            for key in keys:
                if not key_exists(self.path, f"{self.info.arrays.mask}/c/{key}"):
                    raise StoreError(
                        f"{self.path}: mask chunk {key} is missing; the store is damaged "
                        "(run its job again with --overwrite)"
                    )
        try:
            return np.asarray(mask[box.slices()])
        except Exception as exc:  # the codecs raise RuntimeError, ValueError, ... on damaged bytes
            where = keys[0] if len(keys) == 1 else f"{keys[0]} .. {keys[-1]}"
            raise StoreError(
                f"{self.path}: mask chunk {where} cannot be decoded ({one_line(exc, 120)}); the store is damaged"
            ) from exc

    @property
    def image(self) -> zarr.Array | None:
        path = self.info.arrays.image
        return cast(zarr.Array, self.group[path]) if path else None

    @property
    def georef(self) -> Georef:
        info = self.info
        return Georef(info.crs, tuple(info.transform) if info.transform else None)  # type: ignore[arg-type]

    def pixel_measure(self) -> PixelMeasure:
        """What one pixel measures: m² per row (maps), mm² (medical images), mm³ (volumes), or None."""
        info = self.info
        if info.measure_unit is None:
            return None
        voxel = float(np.prod(info.volume.spacing_mm)) if info.measure_unit == "mm3" and info.volume else None
        area = info.pixel_area_mm2 if info.measure_unit == "mm2" else None
        return pixel_measure(self.georef, info.shape[0], voxel_mm3=voxel, pixel_area_mm2=area)

    @property
    def is_volume(self) -> bool:
        return self.info.volume is not None

    @property
    def mask_path(self) -> str:
        return self.info.arrays.mask

    @property
    def regions_info(self) -> dict[str, Any] | None:
        """What the last completed labelling wrote (connectivity, classes, count), or None."""
        regions = self.info.regions
        return regions.model_dump() if regions is not None else None

    def regions(self) -> zarr.Array:
        info = self._checked_regions()
        return open_array(self.path / info["array"])

    def region_table(self) -> zarr.Group:
        info = self._checked_regions()
        return open_group(self.path / info["table"], use_consolidated=False)

    def _checked_regions(self) -> dict[str, Any]:
        info = self.regions_info
        if info is None:
            raise StoreError(
                f"{self.path}: no regions in this store (regions.enabled was false, or the job has not finished); "
                f"label them with: raymask regions {self.path} --compute"
            )
        try:  # from the files themselves: consolidated metadata may predate an interrupted swap
            table = open_group(self.path / info["table"], use_consolidated=False)
            table_token = table.attrs.get("token")
            array_token = open_array(self.path / info["array"]).attrs.get("raymask_regions_token")
        except (KeyError, FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.ArrayNotFoundError):
            table_token = array_token = None
        if not table_token == array_token == info.get("token"):
            raise StoreError(
                f"{self.path}: the regions were being replaced when a run stopped; "
                f"label them again with: raymask regions {self.path} --compute"
            )
        return info

    def _units(self, name: str) -> zarr.Array:
        return cast(zarr.Array, self.group[f"units/{name}"])

    def units_done(self) -> np.ndarray:
        """Boolean array over the unit grid: True where the unit's chunks and statistics landed."""
        return np.asarray(self._units("pixels")[..., 0]) >= 0

    def near_ties(self) -> int | None:
        """Pixels, over the units written, whose top two logits were within 2e-4 (None: not counted)."""
        if "near_ties" not in self.group["units"]:  # type: ignore[operator]
            return None
        counts = np.asarray(self._units("near_ties")[...])
        done = self.units_done()
        if not (counts[done] >= 0).all():
            return None  # a model without logits
        return int(counts[done].sum())

    def probability(self) -> zarr.Array | None:
        """The per-class probabilities (uint8, ``pipeline.core.stats.decode_probability``), if stored."""
        name = self.info.arrays.probability
        return cast(zarr.Array, self.group[name]) if name else None

    def totals(self) -> ChunkStats:
        """Per-class sums over the units that landed."""
        pixels = np.asarray(self._units("pixels")[:])
        area = np.asarray(self._units("measure")[:])
        done = pixels[..., 0] >= 0
        return ChunkStats(pixels[done].sum(axis=0).astype(np.int64), area[done].sum(axis=0))

    # -- writing -----------------------------------------------------------------------------

    def write_unit(
        self,
        unit: WorkUnit,
        labels: np.ndarray,
        *,
        pixel_measure: PixelMeasure,
        n_classes: int,
        probabilities: np.ndarray | None = None,
        near_ties: int | None = None,
    ) -> ChunkStats:
        """Write a unit's chunks (``labels`` covers ``unit.core``; ``probabilities``, with a class
        axis first, too), then its statistics row: the row's presence marks the unit done.

        ``pixel_measure`` is m² per pixel for each image row, or one mm³ per voxel, or None;
        ``near_ties`` the unit's pixels whose top two logits are within 2e-4 (None: no logits).
        """
        stats = self.write_chunks(
            unit, unit.core, labels, pixel_measure=pixel_measure, n_classes=n_classes, probabilities=probabilities
        )
        self.write_unit_stats(unit, stats, near_ties=near_ties)
        return stats

    def write_chunks(
        self,
        unit: WorkUnit,
        box: Box,
        labels: np.ndarray,
        *,
        pixel_measure: PixelMeasure,
        n_classes: int,
        probabilities: np.ndarray | None = None,
    ) -> ChunkStats:
        """Write the chunks of ``unit`` that ``box`` covers (whole chunks: ``labels`` covers ``box``,
        a block of the unit's chunks); returns their statistics. The unit is not done until
        ``write_unit_stats``."""
        arrays = self._writers()
        inside = [chunk for chunk in unit.chunks if box.contains(chunk)]
        if sum(chunk.size for chunk in inside) != box.size:
            raise ValueError(f"{box} is not a block of whole chunks of unit {unit.index}")
        for chunk in inside:
            arrays["mask"][chunk.slices()] = labels[chunk.within(box)]
        stored = arrays.get("probability")
        if stored is not None:
            if probabilities is None:
                raise StoreError(f"{self.path}: the store keeps probabilities, but the unit brought none")
            for chunk in inside:
                stored[(slice(None), *chunk.slices())] = probabilities[(slice(None), *chunk.within(box))]
        if isinstance(pixel_measure, np.ndarray):
            pixel_measure = pixel_measure[box.start[0] : box.stop[0]]
        return count_classes(labels, n_classes, pixel_measure)

    def write_unit_stats(self, unit: WorkUnit, stats: ChunkStats, *, near_ties: int | None = None) -> None:
        """A unit's statistics row, written after all its chunks: the unit is done."""
        arrays = self._writers()
        if near_ties is not None and "near_ties" in arrays:
            arrays["near_ties"][unit.index] = near_ties
        arrays["measure"][unit.index] = stats.measure
        arrays["pixels"][unit.index] = stats.pixels

    def _writers(self) -> dict[str, zarr.Array]:
        """The arrays units write, opened once (each open reads and parses the array's metadata)."""
        if not self._writing:
            writing = {
                "mask": self.mask.with_config({"write_empty_chunks": True}),  # see StoreMeta.every_chunk
                "measure": self._units("measure"),
                "pixels": self._units("pixels"),
            }
            if self.info.arrays.probability:
                array = cast(zarr.Array, self.group[self.info.arrays.probability])
                writing["probability"] = array.with_config({"write_empty_chunks": True})
            if "near_ties" in self.group["units"]:  # type: ignore[operator]
                writing["near_ties"] = self._units("near_ties")
            self._writing = writing
        return self._writing

    def update_meta(self, **changes: Any) -> None:
        meta = dict(self.meta)
        meta.update(changes)
        parse_meta(meta, str(self.path))  # a change that breaks the model is refused before it lands
        self.group.attrs["raymask"] = meta
        self._info = None
        _consolidate(self.path)

    def install_regions(self, array: StorePath, table: StorePath, summary: dict[str, Any]) -> None:
        """Move a finished ``regions`` array (volumes: its label group) and table into the store.

        The old ones stay readable until the new ones are in place; the metadata names the new
        ones last, with a token that both carry, so a run stopped half-way is detected on read.
        """
        where = self.path
        name = str(Path(VOLUME_REGIONS).parent) if self.is_volume else "regions"
        if isinstance(where, ObjectPath):
            # No rename: the old objects go, the new ones are copied in; until the metadata names
            # the new token, readers are told the regions are being replaced (see _checked_regions).
            for src, dst in ((array, where / name), (table, where / REGION_TABLE)):
                delete_prefix(dst)
                if isinstance(src, ObjectPath):
                    copy_prefix(src, dst)  # server-side, from the scratch prefix beside the store
                else:
                    upload_tree(src, dst)
            retired = None
        else:
            retired = where.with_name(f".{where.name}.regions-old-{os.getpid()}")
            shutil.rmtree(retired, ignore_errors=True)
            retired.mkdir()
            for src, local in ((array, where / name), (table, where / REGION_TABLE)):
                assert isinstance(src, Path), "a store on disk has its scratch on disk"
                swap_in(src, local, retired / local.name)
        arrays = dict(self.meta.get("arrays", {}))
        arrays["regions"] = summary["array"]
        if self.is_volume:
            labels = open_group(self.path / "labels", mode="r+")
            ome = cast(dict[str, Any], labels.attrs.get("ome") or {})
            names = list(ome.get("labels", []))
            if "regions" not in names:
                labels.attrs.update(ngff.labels_group_attrs([*names, "regions"]))
        self.update_meta(arrays=arrays, regions=summary)
        self.group = open_group(self.path, mode="r+")
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)

    def mark_complete(self, statistics: dict[str, Any]) -> None:
        if not self.units_done().all():
            raise StoreError(f"{self.path}: {int((~self.units_done()).sum())} work units missing; not marking complete")
        self._sweep_partial_writes()
        self.update_meta(status=COMPLETE, completed=_now(), stats=statistics)

    def _sweep_partial_writes(self) -> int:
        """Remove what writers killed mid-write left behind: zarr writes a chunk to
        ``KEY.<uuid>.partial`` and renames it into place, so a SIGKILL between the two leaves the
        temporary file (the chunk itself was written again by the unit's retry). Called only when
        the store completes, when no writer of the run is left."""
        if isinstance(self.path, ObjectPath):
            return 0  # object stores write each chunk whole: nothing partial is ever left
        leftovers = list(self.path.rglob("*.partial"))
        for path in leftovers:
            path.unlink(missing_ok=True)
        return len(leftovers)


def class_attrs(classes: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    """What the mask array says of itself for xarray, rioxarray and CF readers: its classes as CF
    ``flag_values`` / ``flag_meanings`` (with colours), and ``nodata`` (rioxarray's ``rio.nodata``)."""
    names = [n for n, _ in classes]
    return {
        "long_name": "class id",
        "flag_values": list(range(len(names))),
        "flag_meanings": " ".join(n.replace(" ", "_") for n in names),
        "flag_colors": [c for _, c in classes],
        "nodata": NODATA,
    }


def _consolidate(path: StorePath) -> None:
    """Consolidated metadata lets xarray open the store in one read; zarr warns it is not in the v3 spec yet."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)
        zarr.consolidate_metadata(zarr_store(path, read_only=False))


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def replace_version(new: ObjectPath, dest: ObjectPath) -> None:
    """Put the complete store at ``new`` in place of the one at ``dest``, on object storage.

    There is no rename, so the new version is copied over the old, server-side: a marker object
    (``NAME.zarr.replacing``, holding ``new``'s URL) is written first, the old root metadata goes
    (from then on a reader is told the store is being replaced, never shown a mix), the old objects
    go, the new ones are copied in with the root metadata last, then ``new`` and the marker go. A
    run killed at any step leaves the marker and a complete ``new``: ``finish_replacement`` ends it.
    """
    put_object(replacement_marker(dest), str(new).encode())
    _replace(new, dest)


def finish_replacement(dest: ObjectPath) -> bool:
    """End a replacement of the store at ``dest`` that a killed run left; False when there was none."""
    raw = get_object(replacement_marker(dest))
    if raw is None:
        return False
    _replace(ObjectPath(raw.decode()), dest)
    return True


def _replace(new: ObjectPath, dest: ObjectPath) -> None:
    new_root = get_object(new / "zarr.json")
    dest_root = get_object(dest / "zarr.json")
    if new_root is None and dest_root is None:
        raise StoreError(
            f"{dest}: a replacement by {new} was interrupted and {new} is gone; run the job again with --overwrite"
        )
    if new_root is not None and dest_root != new_root:  # not copied yet, or not all of it
        if dest_root is not None:
            delete_object(dest / "zarr.json")
        delete_prefix(dest)
        copy_prefix(new, dest)
    delete_prefix(new)
    delete_object(replacement_marker(dest))


def swap_in(new: Path, dest: Path, retired: Path) -> None:
    """Put ``new`` at ``dest``; what was at ``dest`` (if anything) moves to ``retired`` first.

    Two renames on one filesystem: a reader sees the old or the new, and a crash between them
    leaves the old at ``retired`` and the new at ``new``, both whole.
    """
    if dest.exists():
        os.rename(dest, retired)
    os.rename(new, dest)
