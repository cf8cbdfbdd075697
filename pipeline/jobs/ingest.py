"""Decode a DICOM series once, in parallel tasks (Ray, or this process for small jobs), into the
store's ``image`` array.

Each task owns a slab of whole z-chunks (every y/x chunk in it), so no two tasks ever write the
same chunk. The pixels go from the files to the store inside the tasks; the driver sends frame
descriptions and receives slice counts. The store records when the image is complete, so a
resumed job does not decode again.
"""

from __future__ import annotations

from pipeline.jobs.executors import Executor
from pipeline.sources.dicom import Series
from pipeline.store import MaskStore
from workers.ingest import Slab, ingest_slab


def ingest_series(store: MaskStore, series: Series, *, executor: Executor, progress: bool = True) -> int:
    """Decode ``series`` into ``store.image``; returns the number of slices written (0 if already there)."""
    from tqdm import tqdm

    if store.info.image_ingested:
        return 0
    image = store.image
    if image is None:
        raise ValueError(f"{store.path}: not a volume store")
    depth = image.chunks[0]
    array_path = f"{store.path}/{store.info.arrays.image}"
    slabs = [Slab(tuple(series.frames[z0 : z0 + depth]), array_path, z0) for z0 in range(0, len(series.frames), depth)]
    with tqdm(total=len(series.frames), unit="slice", desc="ingest", disable=not progress) as bar:
        for written in executor.map(ingest_slab, slabs):
            bar.update(written)
    store.update_meta(image_ingested=True)
    return len(series.frames)
