"""Pure connected components over a chunked mask: label chunks, merge across cuts, relabel.

Regions are connected pixels (voxels) of one class. Each chunk is labelled on its own
(:func:`label_chunk`) and summarised (:func:`region_stats`); two chunk labels belong to one region
when pixels of the same class touch across a cut between chunk layers. Only the chunks' face
slices are needed to find those pairs (:func:`cut_pairs`), so the whole mask is never in memory.
:func:`merge` turns the pairs into final ids with a sparse connected-components pass over the
labels that touch across a cut; labels that touch nothing across a cut are already final.

Final ids: first the regions that lie inside one chunk, chunk by chunk in C order and in label
order within a chunk, then the regions that cross chunk faces, in order of their first chunk.
The partition equals ``scipy.ndimage.label`` on the whole mask, class by class (property-tested).

Connectivity is the number of neighbours: 4 or 8 in 2-D, 6, 18 or 26 in 3-D.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from pipeline.core.geometry import TileGrid
from pipeline.core.stats import NODATA

_RANK = {4: 1, 8: 2, 6: 1, 18: 2, 26: 3}
CONNECTIVITIES = {2: (4, 8), 3: (6, 18, 26)}
MAX_ID = 2**32 - 1  # region ids are stored as uint32; 0 = no region


def structure(ndim: int, connectivity: int) -> np.ndarray:
    if connectivity not in CONNECTIVITIES.get(ndim, ()):
        allowed = "; ".join(f"{d}-D: {' or '.join(map(str, c))}" for d, c in CONNECTIVITIES.items())
        raise ValueError(f"connectivity {connectivity} does not exist in {ndim}-D ({allowed})")
    return ndimage.generate_binary_structure(ndim, _RANK[connectivity])


def default_connectivity(ndim: int) -> int:
    """Face neighbours only (4 in 2-D, 6 in 3-D): scipy.ndimage.label's default."""
    return CONNECTIVITIES[ndim][0]


@dataclass(frozen=True)
class ChunkLabels:
    """A chunk's local regions: ids 1..n (0 = no region), and the class of each id (index 0 unused)."""

    ids: np.ndarray
    classes: np.ndarray

    @property
    def count(self) -> int:
        return len(self.classes) - 1


def label_chunk(mask: np.ndarray, *, connectivity: int, classes: Collection[int] | None = None) -> ChunkLabels:
    """Label each class in ``classes`` (None: every class but nodata) on its own."""
    ids = np.zeros(mask.shape, dtype=np.int64)
    found = [0]
    struct = structure(mask.ndim, connectivity)
    present = np.flatnonzero(np.bincount(mask.reshape(-1), minlength=NODATA + 1))
    for cls in present:
        if int(cls) == NODATA or (classes is not None and int(cls) not in classes):
            continue
        local, n = ndimage.label(mask == cls, structure=struct)
        inside = local > 0
        ids[inside] = local[inside] + (len(found) - 1)
        found.extend([int(cls)] * n)
    return ChunkLabels(ids, np.asarray(found, dtype=np.int64))


@dataclass(frozen=True)
class RegionStats:
    """Per-region sums, one row per region, in columns; rows from several chunks fold together.

    ``start``/``stop`` are the half-open bounding box in global pixel indices; ``index_sum`` the
    sum of each pixel's global index per axis (centroid = index_sum / pixels); ``measure`` the
    summed area or volume (NaN without one); ``intensity_sum`` the summed source value per band;
    ``probability_sum`` the summed probability of the region's class (0 where none is stored).
    """

    classes: np.ndarray  # (n,) int64
    pixels: np.ndarray  # (n,) int64
    measure: np.ndarray  # (n,) float64
    start: np.ndarray  # (n, ndim) int64
    stop: np.ndarray  # (n, ndim) int64
    index_sum: np.ndarray  # (n, ndim) float64
    intensity_sum: np.ndarray  # (n, bands) float64; bands may be 0
    probability_sum: np.ndarray  # (n,) float64

    def __len__(self) -> int:
        return len(self.classes)

    def take(self, rows: np.ndarray) -> RegionStats:
        return RegionStats(*(getattr(self, f)[rows] for f in _FIELDS))

    @classmethod
    def concat(cls, parts: Sequence[RegionStats]) -> RegionStats:
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in _FIELDS))

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {f: getattr(self, f) for f in _FIELDS}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray] | object) -> RegionStats:
        return cls(*(np.asarray(arrays[f]) for f in _FIELDS))  # type: ignore[index]

    @classmethod
    def empty(cls, n: int, ndim: int, bands: int) -> RegionStats:
        """``n`` rows ready for :meth:`fold`: zero sums, and boxes that any pixel shrinks."""
        big = np.iinfo(np.int64).max
        return cls(
            np.full(n, -1, dtype=np.int64),
            np.zeros(n, dtype=np.int64),
            np.zeros(n, dtype=np.float64),
            np.full((n, ndim), big, dtype=np.int64),
            np.full((n, ndim), -1, dtype=np.int64),
            np.zeros((n, ndim), dtype=np.float64),
            np.zeros((n, bands), dtype=np.float64),
            np.zeros(n, dtype=np.float64),
        )

    def fold(self, rows: np.ndarray, part: RegionStats) -> None:
        """Add ``part``'s rows into this table's rows ``rows`` (in place; rows may repeat)."""
        self.classes[rows] = part.classes
        np.add.at(self.pixels, rows, part.pixels)
        np.add.at(self.measure, rows, part.measure)
        np.minimum.at(self.start, rows, part.start)
        np.maximum.at(self.stop, rows, part.stop)
        np.add.at(self.index_sum, rows, part.index_sum)
        np.add.at(self.intensity_sum, rows, part.intensity_sum)
        np.add.at(self.probability_sum, rows, part.probability_sum)


_FIELDS = ("classes", "pixels", "measure", "start", "stop", "index_sum", "intensity_sum", "probability_sum")


def region_stats(
    chunk: ChunkLabels,
    origin: Sequence[int],
    *,
    pixel_measure: np.ndarray | float | None = None,
    intensity: np.ndarray | None = None,
    bands: int = 0,
    probability: np.ndarray | None = None,
) -> RegionStats:
    """Summarise a labelled chunk whose first pixel is at global index ``origin``.

    ``pixel_measure`` is m² per pixel for each row of a 2-D chunk, or one value per pixel or voxel, or
    None; ``intensity`` is ``(bands, *chunk shape)`` source values, or None (then ``bands`` zero
    columns, so that chunks with and without regions fold together); ``probability`` is each
    pixel's probability of its own class (the chunk's shape), or None.
    """
    ids = chunk.ids
    n = chunk.count
    ndim = ids.ndim
    flat = ids.reshape(-1)
    pixels = np.bincount(flat, minlength=n + 1)[1:].astype(np.int64)
    if pixel_measure is None:
        area = np.full(n, np.nan)
    elif isinstance(pixel_measure, np.ndarray):
        weights = np.broadcast_to(pixel_measure.reshape((-1,) + (1,) * (ndim - 1)), ids.shape).reshape(-1)
        area = np.bincount(flat, weights=weights, minlength=n + 1)[1:]
    else:
        area = pixels * float(pixel_measure)
    start = np.zeros((n, ndim), dtype=np.int64)
    stop = np.zeros((n, ndim), dtype=np.int64)
    for i, box in enumerate(ndimage.find_objects(ids, max_label=n)):
        if box is not None:  # always: ids are 1..n with no gaps
            start[i] = [s.start for s in box]
            stop[i] = [s.stop for s in box]
    start += np.asarray(origin, dtype=np.int64)
    stop += np.asarray(origin, dtype=np.int64)
    index_sum = np.zeros((n, ndim), dtype=np.float64)
    for axis in range(ndim):
        shape = [1] * ndim
        shape[axis] = ids.shape[axis]
        coord = np.broadcast_to(np.arange(ids.shape[axis], dtype=np.float64).reshape(shape), ids.shape).reshape(-1)
        index_sum[:, axis] = np.bincount(flat, weights=coord, minlength=n + 1)[1:] + pixels * float(origin[axis])
    bands = bands if intensity is None else intensity.shape[0]
    intensity_sum = np.zeros((n, bands), dtype=np.float64)
    for b in range(0 if intensity is None else bands):
        assert intensity is not None
        values = np.asarray(intensity[b], dtype=np.float64).reshape(-1)
        intensity_sum[:, b] = np.bincount(flat, weights=values, minlength=n + 1)[1:]
    probability_sum = np.zeros(n, dtype=np.float64)
    if probability is not None:
        values = np.asarray(probability, dtype=np.float64).reshape(-1)
        probability_sum = np.bincount(flat, weights=values, minlength=n + 1)[1:].astype(np.float64)
    return RegionStats(
        chunk.classes[1:].copy(), pixels, area.astype(np.float64), start, stop, index_sum, intensity_sum,
        probability_sum,
    )  # fmt: skip


def face_slices(ids: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """The first and the last slice of ``ids`` along ``axis``."""
    return np.take(ids, 0, axis=axis), np.take(ids, ids.shape[axis] - 1, axis=axis)


def face_pairs(
    low: np.ndarray, low_classes: np.ndarray, high: np.ndarray, high_classes: np.ndarray, *, connectivity: int
) -> np.ndarray:
    """``(m, 2)`` unique pairs of ids that touch across a cut, same class on both sides.

    ``low`` is the slice just before the cut, ``high`` the slice just after, each with the class of
    every pixel (0 ids: no region). With face connectivity only directly opposite pixels touch;
    with more, also those offset by one along the cut's own axes (as many at once as the
    connectivity allows).
    """
    found = []
    max_offsets = _RANK[connectivity] - 1  # how many cut axes a neighbour may also step along
    for shift in itertools.product((-1, 0, 1), repeat=low.ndim):
        if sum(s != 0 for s in shift) > max_offsets:
            continue
        lo, hi = _shifted(low.shape, shift)
        a, b = low[lo], high[hi]
        keep = (a > 0) & (b > 0) & (low_classes[lo] == high_classes[hi])
        found.append(np.stack([a[keep], b[keep]], axis=1))
    pairs = np.concatenate(found) if found else np.zeros((0, 2), dtype=np.int64)
    return np.unique(pairs.astype(np.int64), axis=0)


def _shifted(shape: tuple[int, ...], shift: tuple[int, ...]) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    lo, hi = [], []
    for s, n in zip(shift, shape):
        lo.append(slice(max(0, -s), n - max(0, s)))
        hi.append(slice(max(0, s), n - max(0, -s)))
    return tuple(lo), tuple(hi)


FaceReader = Callable[[tuple[int, ...], int, int], tuple[np.ndarray, np.ndarray]]


def cut_pairs(grid: TileGrid, axis: int, layer: int, face: FaceReader, *, connectivity: int) -> np.ndarray:
    """Pairs of global labels that touch across the cut between chunk layers ``layer`` and ``layer + 1``.

    The cut is assembled across the whole image (one plane of ids and classes on each side), not
    chunk pair by chunk pair: with 8-, 18- or 26-connectivity a region can cross a chunk corner
    into a chunk that shares no face with it. ``face(chunk index, axis, side)`` returns that
    chunk's first (side 0) or last (side 1) slice along ``axis``: global ids and classes.
    """
    plane = tuple(n for a, n in enumerate(grid.shape) if a != axis)
    sides = []
    for side, at in ((1, layer), (0, layer + 1)):
        ids = np.zeros(plane, dtype=np.int64)
        classes = np.zeros(plane, dtype=np.int64)
        others = [range(n) if a != axis else range(at, at + 1) for a, n in enumerate(grid.grid_shape)]
        for index in itertools.product(*others):
            box = grid.chunk_box(index)
            where = tuple(s for a, s in enumerate(box.slices()) if a != axis)
            ids[where], classes[where] = face(index, axis, side)
        sides.append((ids, classes))
    (low, low_classes), (high, high_classes) = sides
    return face_pairs(low, low_classes, high, high_classes, connectivity=connectivity)


def cuts(grid_shape: Sequence[int]) -> Iterable[tuple[int, int]]:
    """``(axis, layer)`` of every cut between two layers of chunks."""
    for axis, n in enumerate(grid_shape):
        for layer in range(n - 1):
            yield axis, layer


@dataclass(frozen=True)
class Merge:
    """How chunk-local labels become final region ids.

    Global label ``offsets[c] + l`` is chunk ``c``'s local label ``l``. ``crossing`` holds the
    sorted global labels that touch a same-class label across a cut, and ``component`` the
    region (0-based, among crossing regions) each belongs to.
    """

    offsets: np.ndarray  # (chunks + 1,) int64
    crossing: np.ndarray  # sorted int64
    component: np.ndarray  # int64, one per crossing label
    n_components: int
    interior_before: np.ndarray  # (chunks + 1,) interior regions in chunks before c

    @property
    def n_interior(self) -> int:
        return int(self.interior_before[-1])

    @property
    def n_regions(self) -> int:
        return self.n_interior + self.n_components

    def crossing_in(self, chunk: int) -> tuple[np.ndarray, np.ndarray]:
        """Chunk ``chunk``'s crossing labels (local, ascending) and their final ids."""
        lo, hi = np.searchsorted(self.crossing, [self.offsets[chunk] + 1, self.offsets[chunk + 1] + 1])
        local = self.crossing[lo:hi] - self.offsets[chunk]
        return local, self.n_interior + 1 + self.component[lo:hi]

    def lookup(self, chunk: int) -> np.ndarray:
        """Local label -> final id for one chunk (index 0 -> 0), as uint32."""
        n = int(self.offsets[chunk + 1] - self.offsets[chunk])
        local, final = self.crossing_in(chunk)
        return relabel_table(n, int(self.interior_before[chunk]), local, final)


def relabel_table(n: int, interior_before: int, crossing_local: np.ndarray, crossing_final: np.ndarray) -> np.ndarray:
    """Local label -> final id for a chunk with ``n`` labels, from what :class:`Merge` says of it."""
    table = np.zeros(n + 1, dtype=np.uint32)
    interior = np.ones(n + 1, dtype=bool)
    interior[0] = False
    interior[crossing_local] = False
    table[interior] = interior_before + np.arange(1, int(interior.sum()) + 1)
    table[crossing_local] = crossing_final
    return table


def merge(counts: Sequence[int], pairs: np.ndarray) -> Merge:
    """Final ids from per-chunk label counts and ``(m, 2)`` global label pairs that touch."""
    counts_arr = np.asarray(counts, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts_arr)]).astype(np.int64)
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    crossing = np.unique(pairs)
    if len(crossing):
        a, b = np.searchsorted(crossing, pairs[:, 0]), np.searchsorted(crossing, pairs[:, 1])
        graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(len(crossing), len(crossing)))
        n_components, raw = connected_components(graph, directed=False)
        first = np.full(n_components, len(crossing), dtype=np.int64)
        np.minimum.at(first, raw, np.arange(len(crossing)))  # crossing is sorted: first member = smallest label
        rank = np.empty(n_components, dtype=np.int64)
        rank[np.argsort(first, kind="stable")] = np.arange(n_components)
        component = rank[raw]
        chunk_of = np.searchsorted(offsets, crossing, side="left") - 1  # offsets[c] < label <= offsets[c + 1]
        interior = counts_arr - np.bincount(chunk_of, minlength=len(counts_arr))
    else:
        n_components, component, interior = 0, np.zeros(0, dtype=np.int64), counts_arr
    interior_before = np.concatenate([[0], np.cumsum(interior)]).astype(np.int64)
    if interior_before[-1] + n_components > MAX_ID:
        raise ValueError(f"{interior_before[-1] + n_components} regions do not fit uint32 ids")
    return Merge(offsets, crossing, component.astype(np.int64), int(n_components), interior_before)
