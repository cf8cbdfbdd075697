"""Decode a DICOM series once, in parallel Ray tasks, into the store's ``image`` array.

Each task owns a slab of whole z-chunks (every y/x chunk in it), so no two tasks ever write the
same chunk. The pixels go from the files to the store inside the tasks; the driver sends frame
descriptions and receives slice counts. The store records when the image is complete, so a
resumed job does not decode again.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import zarr

from pipeline.sources.dicom import Frame, Series, decode_frames
from pipeline.store import MaskStore


def ingest_series(store: MaskStore, series: Series, *, io_cpus: float = 1.0, progress: bool = True) -> int:
    """Decode ``series`` into ``store.image``; returns the number of slices written (0 if already there)."""
    import ray
    from tqdm import tqdm

    if store.meta.get("image_ingested"):
        return 0
    image = store.image
    if image is None:
        raise ValueError(f"{store.path}: not a volume store")
    depth = image.chunks[0]
    array_path = f"{store.path}/{store.meta['arrays']['image']}"
    task = ray.remote(num_cpus=io_cpus)(_ingest_slab)
    pending = [
        task.remote(series.frames[z0 : z0 + depth], array_path, z0) for z0 in range(0, len(series.frames), depth)
    ]
    with tqdm(total=len(series.frames), unit="slice", desc="ingest", disable=not progress) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            bar.update(ray.get(done[0]))
    store.update_meta(image_ingested=True)
    return len(series.frames)


def _ingest_slab(frames: Sequence[Frame], array_path: str, z0: int) -> int:
    values = decode_frames(frames)
    zarr.open_array(array_path, mode="r+")[z0 : z0 + len(values)] = values.astype(np.float32)
    return len(values)
