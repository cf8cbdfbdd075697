"""Pure connected components over a chunked mask: label chunks, merge across faces, relabel.

Regions are connected pixels (voxels) of one class. Each chunk is labelled on its own; two chunk
labels belong to one region when pixels of the same class touch across the face between their
chunks. Only the face strips are needed to find those pairs, so the whole mask is never in memory:
a union-find over chunk labels turns the pairs into global region ids. The result equals
``scipy.ndimage.label`` on the whole mask, class by class (property-tested).

Connectivity is the number of neighbours: 4 or 8 in 2-D, 6, 18 or 26 in 3-D.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from pipeline.stats import NODATA

_RANK = {4: 1, 8: 2, 6: 1, 18: 2, 26: 3}


def structure(ndim: int, connectivity: int) -> np.ndarray:
    if (ndim, connectivity) not in {(2, 4), (2, 8), (3, 6), (3, 18), (3, 26)}:
        raise ValueError(f"connectivity {connectivity} does not exist in {ndim}-D (2-D: 4 or 8; 3-D: 6, 18 or 26)")
    return ndimage.generate_binary_structure(ndim, _RANK[connectivity])


@dataclass(frozen=True)
class ChunkLabels:
    """A chunk's local regions: ids 1..n (0 = no region), and the class of each id (index 0 unused)."""

    ids: np.ndarray
    classes: np.ndarray


def label_chunk(mask: np.ndarray, *, connectivity: int, background: frozenset[int] = frozenset()) -> ChunkLabels:
    """Label every class except ``background`` and nodata, each class on its own."""
    ids = np.zeros(mask.shape, dtype=np.int64)
    classes = [0]
    struct = structure(mask.ndim, connectivity)
    for cls in np.unique(mask):
        if int(cls) == NODATA or int(cls) in background:
            continue
        local, n = ndimage.label(mask == cls, structure=struct)
        ids[local > 0] = local[local > 0] + (len(classes) - 1)
        classes.extend([int(cls)] * n)
    return ChunkLabels(ids, np.asarray(classes, dtype=np.int64))


class UnionFind:
    """Disjoint sets over 0..n-1 with path halving and union by size."""

    def __init__(self, n: int) -> None:
        self.parent = np.arange(n, dtype=np.int64)
        self.size = np.ones(n, dtype=np.int64)

    def find(self, a: int) -> int:
        parent = self.parent
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = int(parent[a])
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] < self.size[rb]:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.size[ra] += self.size[rb]

    def roots(self) -> np.ndarray:
        return np.asarray([self.find(i) for i in range(len(self.parent))], dtype=np.int64)


def face_pairs(low: np.ndarray, high: np.ndarray, classes: np.ndarray, *, connectivity: int) -> set[tuple[int, int]]:
    """Pairs of (global) ids that touch across a face.

    ``low`` is the last slice of the lower chunk along the axis, ``high`` the first slice of the
    next; both hold global ids (0 for no region) and ``classes[id]`` is each id's class. With face
    connectivity only directly opposite pixels touch; with more, also those offset by one along
    the face's own axes (as many at once as the connectivity allows).
    """
    pairs: set[tuple[int, int]] = set()
    max_offsets = _RANK[connectivity] - 1  # how many face axes a neighbour may also step along
    for shift in itertools.product((-1, 0, 1), repeat=low.ndim):
        if sum(s != 0 for s in shift) > max_offsets:
            continue
        a, b = _shifted(low, high, shift)
        touching = (a > 0) & (b > 0)
        a, b = a[touching], b[touching]
        same = classes[a] == classes[b]
        pairs.update(zip(a[same].tolist(), b[same].tolist()))
    return pairs


def _shifted(low: np.ndarray, high: np.ndarray, shift: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = [], []
    for s, n in zip(shift, low.shape):
        lo.append(slice(max(0, -s), n - max(0, s)))
        hi.append(slice(max(0, s), n - max(0, -s)))
    return low[tuple(lo)], high[tuple(hi)]
