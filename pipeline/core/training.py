"""Pure logic of training and evaluation: the split by file, where patches are cut, augmentation,
class weights, label values to class ids, the confusion matrix and the per-class metrics read from it.

No I/O, no torch, no Ray: ``pipeline.jobs.train`` and ``pipeline.jobs.evaluate`` feed it arrays.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

IGNORE = 255  # a label pixel that counts for nothing: nodata in the image, or no label


def split_by_file(
    names: Sequence[str], fraction: float, seed: int, chosen: Sequence[str] = ()
) -> tuple[list[str], list[str]]:
    """(training, validation) files: ``chosen`` for validation where given, else ``fraction`` of the
    files (at least one) drawn with ``seed``. Whole files, never patches of one file on both sides."""
    names = list(names)
    if chosen:
        validation = [n for n in names if n in set(chosen)]
    else:
        count = min(len(names) - 1, max(1, round(len(names) * fraction))) if len(names) > 1 else 0
        order = np.random.default_rng(seed).permutation(len(names))
        validation = [names[i] for i in sorted(order[:count])]
    training = [n for n in names if n not in set(validation)]
    return training, validation


def label_classes(values: np.ndarray, label_values: Sequence[float] | None, classes: int) -> np.ndarray:
    """Label pixels as class ids (uint8): with ``label_values`` (one per class), each pixel becomes the
    class whose value is nearest (a JPEG mask's 0/255 with compression noise); else the value itself.
    Non-finite values become IGNORE. Ids are not checked here (``unknown_ids``)."""
    values = np.asarray(values)
    if label_values is None:
        out = np.where(np.isfinite(values), values, IGNORE) if values.dtype.kind == "f" else values
        return _as_ids(out)
    table = np.asarray(label_values, dtype=np.float64)
    finite = np.isfinite(values) if values.dtype.kind == "f" else np.ones(values.shape, dtype=bool)
    distance = np.abs(np.where(finite, values, 0)[..., None].astype(np.float64) - table)
    ids = distance.argmin(axis=-1).astype(np.uint8)
    ids[~finite] = IGNORE
    return ids


def _as_ids(values: np.ndarray) -> np.ndarray:
    """Integers 0..255 as they are; anything else (negative, above 255, fractional) as 254, a value
    ``unknown_ids`` reports for any realistic class count, never wrapped round into a real class."""
    values = np.asarray(values)
    whole = values == np.floor(values) if values.dtype.kind == "f" else np.ones(values.shape, dtype=bool)
    inside = whole & (values >= 0) & (values <= 255)
    return np.where(inside, values, 254).astype(np.uint8)


def unknown_ids(labels: np.ndarray, classes: int) -> list[int]:
    """The label values that are neither a declared class id (0..classes-1) nor IGNORE."""
    present = np.unique(labels)
    return [int(v) for v in present if v >= classes and v != IGNORE]


def class_weights(counts: np.ndarray) -> np.ndarray:
    """'balanced' weights (scikit-learn's): inversely proportional to each class's pixel count, so every
    class present weighs as much in total and a pixel weighs 1 on average; a class absent from the
    training data gets weight 0 (it cannot be learned)."""
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    weights = np.zeros_like(counts)
    weights[present] = counts[present].sum() / (present.sum() * counts[present])
    return weights


def patch_origins(
    shape: tuple[int, ...], patch: int | tuple[int, ...], stride: int, count: int, rng: np.random.Generator,
    labels: np.ndarray | None = None, classes: int = 0,
) -> list[tuple[int, ...]]:  # fmt: skip
    """``count`` corners (the lowest index on each axis) of ``patch``-sized windows inside an image or
    volume of ``shape``, on multiples of ``stride`` (where inference's tiles start, so the network
    sees the same phase); an int ``patch`` is the same size on every axis. With ``labels``, balanced
    toward rare classes: each patch first draws a class among those present (uniformly), then a
    pixel of that class, and is placed around it."""
    sizes = (patch,) * len(shape) if isinstance(patch, int) else tuple(int(p) for p in patch)
    if len(sizes) != len(shape):
        raise ValueError(f"a {len(sizes)}-D patch for a {len(shape)}-D image")
    if any(n < p for n, p in zip(shape, sizes, strict=True)):
        shown = " x ".join(map(str, sizes))
        raise ValueError(f"a {shown} patch does not fit in a {' x '.join(map(str, shape))} image")
    last = [(n - p) // stride for n, p in zip(shape, sizes, strict=True)]

    def anywhere() -> tuple[int, ...]:
        return tuple(int(rng.integers(m + 1)) * stride for m in last)

    if labels is None:
        return [anywhere() for _ in range(count)]
    present = [k for k in range(classes) if (labels == k).any()]
    out = []
    for _ in range(count):
        if not present:
            out.append(anywhere())
            continue
        k = present[int(rng.integers(len(present)))]
        where = np.flatnonzero(labels == k)
        pixel = np.unravel_index(int(where[int(rng.integers(len(where)))]), shape)
        out.append(corner_around(tuple(int(p) for p in pixel), shape, sizes, stride, rng))
    return out


def corner_around(
    pixel: tuple[int, ...], shape: tuple[int, ...], sizes: tuple[int, ...], stride: int, rng: np.random.Generator
) -> tuple[int, ...]:
    """The corner of a ``sizes`` window on the stride grid, inside ``shape``, that holds ``pixel``
    at a random place (moved inward at the borders; the stride may move it by less than a stride)."""
    corner = []
    for at, n, p in zip(pixel, shape, sizes, strict=True):
        corner.append(int(min(max(0, int(at) - int(rng.integers(p))), n - p) // stride * stride))
    return tuple(corner)


def draw_block(counts: np.ndarray, rng: np.random.Generator) -> tuple[int, int] | None:
    """For balanced patches of an image read window by window: a class drawn uniformly among those
    present, then a block drawn in proportion to its pixels of that class; ``counts`` is (blocks,
    classes). Then a pixel of the class drawn uniformly in the block is a pixel drawn uniformly among
    all of the class's pixels, as ``patch_origins`` draws from a whole image. None: no class."""
    counts = np.asarray(counts, dtype=np.float64)
    present = np.flatnonzero(counts.sum(0) > 0)
    if not len(present):
        return None
    k = int(present[int(rng.integers(len(present)))])
    column = counts[:, k]
    block = int(rng.choice(len(column), p=column / column.sum()))
    return k, block


def augment(
    image: np.ndarray, labels: np.ndarray, rng: np.random.Generator, *, flips: bool, rot90: bool, jitter: float,
    per_band: bool = False,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """A random flip (each spatial axis), quarter turn (in the plane of the last two axes: rows and
    columns, whose spacing is the same) and a gain and an offset (``jitter`` of the normalised values'
    scale: brightness and contrast) applied to a (bands, ...) image and its labels alike. The gain and
    offset are the same for every band unless ``per_band``: a different one per band shifts colours
    (or spectra), which hurts where colour is the cue (a polyp against mucosa; NDVI-like ratios)."""
    if flips:
        for axis in range(labels.ndim):
            if rng.random() < 0.5:
                image, labels = np.flip(image, axis + 1), np.flip(labels, axis)
    if rot90:
        k = int(rng.integers(4))
        image, labels = np.rot90(image, k, axes=(-2, -1)), np.rot90(labels, k, axes=(-2, -1))
    if jitter > 0:
        bands = image.shape[0]
        scale = (bands if per_band else 1,) + (1,) * labels.ndim
        gain = 1 + rng.uniform(-jitter, jitter, scale)
        offset = rng.uniform(-jitter, jitter, scale)
        image = image * gain.astype(image.dtype) + offset.astype(image.dtype)
    return np.ascontiguousarray(image), np.ascontiguousarray(labels)


def confusion(predicted: np.ndarray, truth: np.ndarray, classes: int) -> np.ndarray:
    """(classes, classes) counts, rows the true class, columns the predicted; pixels whose truth is
    not a class (IGNORE, nodata) do not count; a predicted id outside the classes counts in no column."""
    truth = np.asarray(truth).ravel().astype(np.int64)
    predicted = np.asarray(predicted).ravel().astype(np.int64)
    keep = (truth < classes) & (predicted >= 0) & (predicted < classes)
    flat = truth[keep] * classes + predicted[keep]
    return np.bincount(flat, minlength=classes * classes).reshape(classes, classes)


def class_metrics(matrix: np.ndarray) -> list[dict[str, float | int | None]]:
    """Per class from a confusion matrix: IoU, Dice, precision, recall (None where undefined: a class
    neither present nor predicted), and the pixels of it in the truth."""
    matrix = np.asarray(matrix, dtype=np.int64)
    out: list[dict[str, float | int | None]] = []
    for k in range(len(matrix)):
        tp = int(matrix[k, k])
        fp = int(matrix[:, k].sum()) - tp
        fn = int(matrix[k, :].sum()) - tp
        out.append({
            "iou": tp / (tp + fp + fn) if tp + fp + fn else None,
            "dice": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None,
            "precision": tp / (tp + fp) if tp + fp else None,
            "recall": tp / (tp + fn) if tp + fn else None,
            "pixels": tp + fn,
        })  # fmt: skip
    return out


def normalisation(sums: np.ndarray, squares: np.ndarray, counts: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-band mean and standard deviation from running sums over the valid pixels of every file."""
    counts = np.maximum(np.asarray(counts, dtype=np.float64), 1)
    mean = np.asarray(sums, dtype=np.float64) / counts
    var = np.maximum(np.asarray(squares, dtype=np.float64) / counts - mean**2, 0)
    std = np.where(np.sqrt(var) > 0, np.sqrt(var), 1.0)
    return [float(v) for v in mean], [float(v) for v in std]
