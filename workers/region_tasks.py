"""The per-chunk steps of region labelling that run on workers (``pipeline.jobs.regions`` plans
them and merges on the driver).

1. ``label_task``: read the mask chunk (and the source under it, for mean intensities), label
   each class, write the chunk-local ids to a scratch array, and save the chunk's region sums and
   its face slices to a small ``.npz`` file. Only the count comes back.
3. ``relabel_task``: map local ids to final ids into the new ``regions`` array.

Every task rewrites whole files, so a retried task (a dead worker) is harmless.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.core.geometry import Box
from pipeline.core.regions import face_slices, label_chunk, region_stats, relabel_table
from pipeline.core.stats import NODATA, decode_probability
from pipeline.sources.inputs import Source
from pipeline.store.location import StorePath, open_array, store_path, write_bytes


@dataclass(frozen=True)
class LabelTask:
    mask: str  # the store's mask array (path)
    scratch: str  # a folder, or a prefix beside a store on object storage (every node reaches it)
    chunk: int  # C-order flat chunk index
    box: Box
    connectivity: int
    classes: tuple[int, ...]
    pixel_measure: np.ndarray | float | None
    source: Source | None
    probability: str | None = None  # the store's probability array (path), if it keeps one


@dataclass(frozen=True)
class RelabelTask:
    scratch: str
    regions: str
    chunk: int
    box: Box
    labels: int  # the chunk's local label count
    interior_before: int  # regions inside earlier chunks
    crossing_local: np.ndarray  # the chunk's labels that cross a cut, ascending
    crossing_final: np.ndarray  # and their final ids


def label_task(task: LabelTask) -> tuple[int, int]:
    """Step 1 for one chunk; returns (chunk, label count)."""
    mask = np.asarray(open_array(task.mask)[task.box.slices()])
    labelled = label_chunk(mask, connectivity=task.connectivity, classes=set(task.classes))
    local = open_array(store_path(task.scratch) / "local", mode="r+")
    local[task.box.slices()] = labelled.ids.astype(np.uint32)
    intensity = None
    if task.source is not None and labelled.count:
        intensity, _ = task.source.read(task.box)
    bands = len(task.source.bands) if task.source is not None else 0
    own = None
    if task.probability is not None and labelled.count:
        stored = np.asarray(open_array(task.probability)[(slice(None), *task.box.slices())])
        classes = np.where(mask == NODATA, 0, mask)[None].astype(np.intp)
        own = decode_probability(np.take_along_axis(stored, classes, axis=0)[0])
        own[labelled.ids == 0] = 0.0  # nodata and unlabelled classes count in no region
    stats = region_stats(
        labelled, task.box.start, pixel_measure=task.pixel_measure, intensity=intensity, bands=bands, probability=own
    )
    arrays: dict[str, Any] = stats.to_arrays()
    for axis in range(mask.ndim):
        for side, (ids, cls) in enumerate(zip(face_slices(labelled.ids, axis), face_slices(mask, axis))):
            arrays[f"face{axis}{side}"] = ids.astype(np.uint32)
            arrays[f"class{axis}{side}"] = cls
    _save_npz(store_path(task.scratch) / "chunks" / f"{task.chunk}.npz", arrays)
    return task.chunk, labelled.count


def relabel_task(task: RelabelTask) -> int:
    """Step 3 for one chunk."""
    local = np.asarray(open_array(store_path(task.scratch) / "local")[task.box.slices()])
    table = relabel_table(task.labels, task.interior_before, task.crossing_local, task.crossing_final)
    regions = open_array(task.regions, mode="r+")
    regions[task.box.slices()] = table[local]
    return task.chunk


def _save_npz(path: StorePath, arrays: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_bytes(path, buffer.getvalue())
