"""The DICOM ingest task: decode a slab of whole z-chunks of a series into the store's image
(``pipeline.jobs.ingest`` plans the slabs). No two slabs share a chunk."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.sources.dicom import Frame, decode_frames
from pipeline.store.location import open_array


@dataclass(frozen=True)
class Slab:
    frames: tuple[Frame, ...]
    array: str  # the store's image array (path)
    z0: int


def ingest_slab(slab: Slab) -> int:
    values = decode_frames(slab.frames)
    open_array(slab.array, mode="r+")[slab.z0 : slab.z0 + len(values)] = values.astype(np.float32)
    return len(values)
