"""Label a store's regions chunk by chunk, on Ray workers or in this process.

Steps (``pipeline.core.regions`` holds the pure parts, ``workers.region_tasks`` the per-chunk tasks):

1. **label** (one task per chunk): read the mask chunk (and the source under it, for mean
   intensities), label each class, write the chunk-local ids to a scratch array, and save the
   chunk's region sums and its face slices to a small ``.npz`` file. Only the count comes back.
2. **merge** (driver): read the face slices cut by cut, pair labels that touch, and resolve the
   pairs into final ids. Memory: one cut plane and the labels that cross cuts.
3. **relabel** (one task per chunk): map local ids to final ids into the new ``regions`` array.
4. **table** (driver, streaming): fold the chunk sums into the region table, chunk by chunk.

Everything is built in a scratch folder beside the store (``.NAME.zarr.regions``; on object storage
a prefix beside it, which every node's tasks reach) and moved (copied) in at the end; a store that
already had regions keeps them until the new ones are complete (on disk). Every task rewrites whole
files, so a retried task (a dead worker) is harmless.
"""

from __future__ import annotations

import io
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import zarr

from pipeline.config import RegionsConfig
from pipeline.core import ngff
from pipeline.core.geometry import Box, TileGrid
from pipeline.core.region_table import TableContext, columns
from pipeline.core.regions import (
    Merge,
    RegionStats,
    cut_pairs,
    cuts,
    default_connectivity,
    merge,
    structure,
)
from pipeline.errors import ConfigError
from pipeline.jobs.executors import Executor
from pipeline.sources.inputs import Source
from pipeline.store import REGION_TABLE, VOLUME_REGIONS, MaskStore, location
from pipeline.store.levels import write_region_levels
from pipeline.store.location import ObjectPath, StorePath
from workers.region_tasks import LabelTask, RelabelTask, label_task, relabel_task

TABLE_CHUNK = 65_536
T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class RegionSpec:
    connectivity: int
    classes: tuple[int, ...]  # class ids that get regions


def resolve(config: RegionsConfig, ndim: int, class_names: list[str], *, where: str = "regions") -> RegionSpec:
    """Check a regions config against the store or job it applies to."""
    connectivity = config.connectivity or default_connectivity(ndim)
    try:
        structure(ndim, connectivity)
    except ValueError as exc:
        raise ConfigError(f"{where}.connectivity: {exc}") from exc
    if config.classes is None:
        ids = tuple(i for i, n in enumerate(class_names) if n != "background")
    else:
        unknown = [c for c in config.classes if c not in class_names]
        if unknown:
            raise ConfigError(f"{where}.classes: no class {unknown[0]!r}; classes: {', '.join(class_names)}")
        ids = tuple(class_names.index(c) for c in config.classes)
    return RegionSpec(connectivity, ids)


def label_store(
    store: MaskStore,
    spec: RegionSpec,
    *,
    source: Source | None,
    executor: Executor,
    progress: bool = False,
    modality: str | None = None,
) -> dict[str, Any]:
    """Label ``store``'s regions and install the ``regions`` array and the region table; returns
    the summary written to the store's metadata."""
    info = store.info
    mask = store.mask
    shape = tuple(int(n) for n in mask.shape)
    chunk = tuple(int(n) for n in mask.chunks)
    ndim = len(shape)
    grid = TileGrid.chunked(shape, chunk)
    indices = list(np.ndindex(*grid.grid_shape))
    boxes = [grid.chunk_box(i) for i in indices]
    # Beside the store, where it is: on object storage every node's tasks reach the scratch prefix
    # (the lease on the store makes it this run's alone). When every step runs in this process, a
    # local folder does the same for far fewer requests, and is copied in at the end.
    scratch: StorePath = store.path.with_name(f".{store.path.name}.regions")
    if isinstance(scratch, ObjectPath) and executor.in_process(len(boxes)):
        scratch = Path(tempfile.mkdtemp(prefix=f".{store.path.name}.regions-"))
    location.remove(scratch)
    if isinstance(scratch, Path):
        (scratch / "chunks").mkdir(parents=True)
    volume = store.is_volume
    location.create_array(scratch / "local", shape=shape, chunks=chunk, dtype="uint32", fill_value=0)
    pixel_measure = store.pixel_measure()
    bands = tuple(source.bands) if source is not None else ()

    def measure_of_pixels(box: Box) -> np.ndarray | float | None:
        if isinstance(pixel_measure, np.ndarray):
            return pixel_measure[box.start[0] : box.stop[0]]
        return pixel_measure

    mask_path = str(store.path / store.mask_path)
    probability = str(store.path / info.arrays.probability) if info.arrays.probability else None
    label_items = [
        LabelTask(
            mask_path, str(scratch), i, b, spec.connectivity, spec.classes, measure_of_pixels(b), source, probability
        )
        for i, b in enumerate(boxes)
    ]
    counts = [0] * len(boxes)
    for c, n in _bar(executor.map(label_task, label_items), len(boxes), "regions: label", progress):
        counts[c] = n

    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    flat = {index: i for i, index in enumerate(indices)}

    def face(index: tuple[int, ...], axis: int, side: int) -> tuple[np.ndarray, np.ndarray]:
        c = flat[index]
        with np.load(io.BytesIO(location.read_bytes(scratch / "chunks" / f"{c}.npz"))) as data:
            ids = data[f"face{axis}{side}"].astype(np.int64)
            return np.where(ids > 0, ids + offsets[c], 0), data[f"class{axis}{side}"]

    pairs = [np.zeros((0, 2), dtype=np.int64)]
    pairs += [
        cut_pairs(grid, axis, layer, face, connectivity=spec.connectivity) for axis, layer in cuts(grid.grid_shape)
    ]
    plan = merge(counts, np.concatenate(pairs))
    del pairs

    token = uuid.uuid4().hex
    regions_path = _create_regions_array(scratch, store, shape, chunk, token)
    relabel_items = [
        RelabelTask(
            str(scratch), str(regions_path), i, b, counts[i], int(plan.interior_before[i]), *plan.crossing_in(i)
        )
        for i, b in enumerate(boxes)
    ]
    for _ in _bar(executor.map(relabel_task, relabel_items), len(boxes), "regions: relabel", progress):
        pass

    context = TableContext(
        ndim=ndim,
        measure_unit=info.measure_unit,
        georef=store.georef,
        affine=np.asarray(info.volume.affine) if info.volume is not None else None,
        bands=bands,
        modality=modality,
        probabilities=probability is not None,
    )
    per_class = _write_table(scratch / "table", plan, scratch, context, len(bands), token, spec)
    names = info.class_names
    summary = {
        "connectivity": spec.connectivity,
        "classes": [names[i] for i in spec.classes],
        "count": plan.n_regions,
        "crossing": plan.n_components,  # regions that span more than one chunk
        "per_class": {names[c]: int(n) for c, n in enumerate(per_class) if c in spec.classes},
        "table": REGION_TABLE,
        "array": VOLUME_REGIONS if volume else "regions",
        "token": token,
        "intensity": bool(bands),
    }
    store.install_regions(scratch / ("regions-group" if volume else "regions"), scratch / "table", summary)
    if volume and store.info.levels:  # relabelled: the new regions get as many levels as the mask has
        write_region_levels(store)
    location.remove(scratch)
    return summary


def _create_regions_array(
    scratch: StorePath, store: MaskStore, shape: tuple[int, ...], chunk: tuple[int, ...], token: str
) -> StorePath:
    attrs: dict[str, Any] = {"long_name": "region id (0: no region)", "raymask_regions_token": token}
    if store.is_volume:
        group = location.open_group(scratch / "regions-group", mode="w", zarr_format=3)
        group.attrs.update(ngff.regions_image_attrs(store.meta["volume"]))  # the raw dict NGFF copies
        group.create_array("0", shape=shape, chunks=chunk, dtype="uint32", fill_value=0,
                           dimension_names=list(ngff.AXES), attributes=attrs)  # fmt: skip
        return scratch / "regions-group" / "0"
    if "spatial_ref" in store.group:
        attrs["grid_mapping"] = "spatial_ref"
    location.create_array(scratch / "regions", shape=shape, chunks=chunk, dtype="uint32", fill_value=0,
                          dimension_names=["y", "x"], attributes=attrs)  # fmt: skip
    return scratch / "regions"


def _write_table(
    path: StorePath, plan: Merge, scratch: StorePath, context: TableContext, bands: int, token: str, spec: RegionSpec
) -> np.ndarray:
    """Stream the region table into ``path``: interior regions chunk by chunk, then crossing ones."""
    n = plan.n_regions
    group = location.open_group(path, mode="w", zarr_format=3)
    crossing = RegionStats.empty(plan.n_components, context.ndim, bands)
    per_class = np.zeros(256, dtype=np.int64)
    arrays: dict[str, zarr.Array] = {}
    written = 0
    buffer: list[RegionStats] = []

    def flush() -> None:
        nonlocal written
        if not buffer:
            return
        part = RegionStats.concat(buffer)
        buffer.clear()
        cols = columns(part, written + 1, context)
        for name, values in cols.items():
            if name not in arrays:
                arrays[name] = group.create_array(name, shape=(n,), chunks=(max(1, min(n, TABLE_CHUNK)),),
                                                  dtype=values.dtype, fill_value=0)  # fmt: skip
            arrays[name][written : written + len(part)] = values
        np.add.at(per_class, part.classes, 1)
        written += len(part)

    for c in range(len(plan.offsets) - 1):
        with np.load(io.BytesIO(location.read_bytes(scratch / "chunks" / f"{c}.npz"))) as data:
            stats = RegionStats.from_arrays(data)
        local, final = plan.crossing_in(c)
        interior = np.ones(len(stats), dtype=bool)
        interior[local - 1] = False
        buffer.append(stats.take(np.flatnonzero(interior)))
        if len(local):
            crossing.fold(final - plan.n_interior - 1, stats.take(local - 1))
        if sum(len(b) for b in buffer) >= TABLE_CHUNK:
            flush()
    flush()
    buffer.append(crossing)
    flush()
    group.attrs.update({"rows": n, "token": token, "connectivity": spec.connectivity, "classes": list(spec.classes)})
    return per_class


def _bar(items: Iterable[T], total: int, desc: str, progress: bool) -> Iterator[T]:
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit="chunk", disable=not progress, dynamic_ncols=True) as bar:
        for item in items:
            bar.update(1)
            yield item
