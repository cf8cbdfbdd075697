"""The per-chunk step of polygon export, run on workers (``pipeline.query.polygons`` plans and merges).

``polygon_task`` reads one chunk of the ``regions`` array (global region ids), traces the pixel-edge
outline of every 4-connected piece of equal id (``rasterio.features.shapes``, in global pixel
coordinates: column, row), unions the pieces of each id, and saves them to a small Parquet file
(id, WKB, whether the region crosses a chunk cut). Pieces of crossing regions are merged on the
driver; their vertices are integers, so the union is exact and leaves no seam.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core.geometry import Box
from pipeline.store.location import open_array


@dataclass(frozen=True)
class PolygonTask:
    regions: str  # the store's regions array (path)
    mask: str  # the store's mask array (path): the class of each pixel
    scratch: str
    chunk: int  # C-order flat chunk index
    box: Box
    first_crossing: int  # ids from here on cross a chunk cut (the table lists interior regions first)
    classes: tuple[int, ...] | None  # class ids to keep; None: every labelled class


def polygon_task(task: PolygonTask) -> tuple[int, int]:
    """Outline one chunk's regions; returns (chunk, pieces written)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import rasterio.features
    import shapely
    from affine import Affine

    ids = np.asarray(open_array(task.regions)[task.box.slices()]).astype(np.int32)
    keep = ids > 0
    if task.classes is not None:
        mask = np.asarray(open_array(task.mask)[task.box.slices()])
        keep &= np.isin(mask, task.classes)
    row, col = task.box.start
    pieces: dict[int, list[object]] = {}
    if keep.any():
        origin = Affine.translation(col, row)  # x = column, y = row, in whole pixels: exact integer vertices
        for geometry, value in rasterio.features.shapes(ids, mask=keep, connectivity=4, transform=origin):
            pieces.setdefault(int(value), []).append(shapely.geometry.shape(geometry))
    order = sorted(pieces)
    merged = [shapely.union_all(pieces[i]) if len(pieces[i]) > 1 else pieces[i][0] for i in order]
    table = pa.table(
        {
            "id": pa.array(order, type=pa.int64()),
            "crossing": pa.array([i >= task.first_crossing for i in order], type=pa.bool_()),
            "geometry": pa.array(shapely.to_wkb(merged) if merged else [], type=pa.binary()),
        }
    )
    path = Path(task.scratch) / f"{task.chunk}.parquet"
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)  # a retried task rewrites the whole file
    return task.chunk, len(order)
