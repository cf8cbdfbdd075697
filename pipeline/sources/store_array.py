"""Read tiles from an array inside a store: volumes are ingested once, then tiled from there."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.core.geometry import Box
from pipeline.store.location import open_array


@dataclass(frozen=True)
class StoreArraySource:
    """One band read from ``array`` of the zarr store at ``store``; every voxel is valid."""

    store: str
    array: str

    @property
    def paths(self) -> tuple[str, ...]:
        return (self.store,)

    @property
    def bands(self) -> tuple[int, ...]:
        return (1,)

    def read(self, box: Box, *, cache: dict[str, Any] | None = None) -> tuple[np.ndarray, np.ndarray]:
        path = f"{self.store}/{self.array}"
        array = cache.get(path) if cache is not None else None
        if array is None:
            array = open_array(path)  # a local folder or an s3:// store
            if cache is not None:
                cache[path] = array
        data = np.asarray(array[box.slices()], dtype=np.float32)
        return data[None], np.ones(box.shape, dtype=bool)
