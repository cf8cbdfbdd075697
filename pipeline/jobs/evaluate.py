"""``raymask evaluate STORE LABELS``: a mask store against reference labels, chunk by chunk.

The labels are a one-band raster on the store's grid (a GeoTIFF, or a PNG mask for a frame), or for
a volume store a NIfTI label image or a DICOM SEG on the series' voxels
(``pipeline.sources.labels``: checked against the store's patient affine; a NIfTI in another axis
order or direction is read in the store's). Each of the store's mask chunks is read with the same
box of the labels, so memory stays one chunk whatever the image's size (a SEG is decoded whole: its
frames are bit-packed). Reported per class: IoU, Dice, precision, recall and the pixels of it in the
labels, the confusion matrix (rows: the labels, columns: the store) and the overall pixel accuracy.
Pixels the store has no prediction for (nodata) count as misses of their labelled class; labels
outside the store's classes (with ``label_values``, nothing is) are refused in one line naming the
file.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from pipeline.config import SourceConfig
from pipeline.core.geometry import Box
from pipeline.core.stats import NODATA
from pipeline.core.training import IGNORE, class_metrics, confusion, label_classes, unknown_ids
from pipeline.errors import SourceError


def evaluate_store(store_path: str, labels_path: str, label_values: list[float] | None = None,
                   progress: bool = False) -> dict[str, Any]:  # fmt: skip
    from pipeline.store import MaskStore

    store = MaskStore.open(store_path)
    info = store.info
    if not info.complete:
        raise SourceError(f"{store_path}: the store is not complete (status {info.status}); finish the run first")
    names = [c.name for c in info.classes]
    shape = tuple(int(v) for v in info.shape)
    reader = _volume_labels(store_path, labels_path, info, names) if info.volume else _raster_labels(labels_path, info)
    classes = len(names)
    matrix = np.zeros((classes + 1, classes + 1), dtype=np.int64)  # the last column: no prediction (nodata)
    chunks = tuple(int(c) for c in store.mask.chunks)
    grid = [range(0, n, c) for n, c in zip(shape, chunks, strict=True)]
    boxes = [
        Box(start, tuple(min(a + c, n) for a, c, n in zip(start, chunks, shape, strict=True)))
        for start in itertools.product(*grid)
    ]
    bar = None
    if progress:
        import sys

        from tqdm import tqdm

        bar = tqdm(total=len(boxes), desc="evaluate", unit="chunk", file=sys.stderr)
    for box in boxes:
        predicted = store.read_mask(box)
        raw, labelled = reader(box)
        truth = label_classes(raw, label_values, classes)
        unknown = unknown_ids(truth[labelled], classes)
        if unknown:
            shown = ", ".join(map(str, unknown[:5]))
            raise SourceError(
                f"{labels_path}: label values {shown} are not class ids 0..{classes - 1} of the store "
                f"({', '.join(names)}); map them with --label-values"
            )
        truth[~labelled] = IGNORE
        missed = np.where(predicted == NODATA, classes, predicted)
        matrix += confusion(missed, truth, classes + 1)
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    # The last column is "no prediction": a miss of the labelled class (its recall and IoU count it), never
    # a false positive of another; the last row, a labelled "no prediction", is always empty.
    rows = class_metrics(matrix)[:classes]
    for k, row in enumerate(rows):
        row["unpredicted"] = int(matrix[k, classes])
    square = matrix[:classes, :classes]
    total = int(matrix[:classes].sum())
    return {
        "store": str(store_path), "labels": str(labels_path), "classes": names,
        "per_class": dict(zip(names, rows, strict=True)),
        "confusion": square.tolist(),
        "unpredicted": int(matrix[:classes, classes].sum()),
        "accuracy": float(np.trace(square) / total) if total else None,
        "pixels": total,
    }  # fmt: skip


def _raster_labels(labels_path: str, info: Any) -> Any:
    from pipeline.sources.geotiff import open_source

    source, label_info = open_source(SourceConfig(path=labels_path, bands=[1]))
    shape = tuple(int(v) for v in info.shape)
    if tuple(label_info.shape) != shape:
        raise SourceError(f"{labels_path}: not on the store's grid ({label_info.shape[0]} x {label_info.shape[1]} vs "
                          f"{shape[0]} x {shape[1]})")  # fmt: skip
    transform = tuple(info.transform) if info.transform else None
    if label_info.georef.transform and transform and tuple(label_info.georef.transform) != transform:
        raise SourceError(
            f"{labels_path}: not on the store's grid (transform {label_info.georef.transform} vs {transform})"
        )

    def read(box: Box) -> tuple[np.ndarray, np.ndarray]:
        raw, labelled = source.read(box)
        return raw[0], labelled

    return read


def _volume_labels(store_path: str, labels_path: str, info: Any, names: list[str]) -> Any:
    from pipeline.core.volume import VolumeGeometry
    from pipeline.sources.labels import open_volume_labels

    volume = info.volume
    geometry = VolumeGeometry(
        shape=tuple(int(n) for n in volume.shape),  # type: ignore[arg-type]
        spacing=tuple(float(v) for v in volume.spacing_mm),  # type: ignore[arg-type]
        origin=tuple(float(v) for v in volume.origin_mm),  # type: ignore[arg-type]
        direction=tuple(tuple(float(v) for v in row) for row in volume.direction),  # type: ignore[misc]
    )
    labels = open_volume_labels(labels_path, geometry, names, series=f"the store {store_path}")

    def read(box: Box) -> tuple[np.ndarray, np.ndarray]:
        raw = labels.read(box.start, box.stop)
        return raw, np.ones(raw.shape, dtype=bool)

    return read
