"""Planning, pure: what is left to do, how it is grouped into model calls and leases, and how many
actors of which size a cluster gets. No Ray, zarr, rasterio or torch here; property-tested.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from pipeline.core.blend import BlendGrid
from pipeline.core.geometry import TileGrid, WorkUnit
from pipeline.core.stats import PixelMeasure

if TYPE_CHECKING:  # sources open files; planning only names them
    from pipeline.config import RuntimeConfig
    from pipeline.sources.inputs import Source

T = TypeVar("T")


@dataclass(frozen=True)
class Target:
    """One input's part of a run: where its pixels come from and where its labels go."""

    source: Source
    grid: TileGrid
    edge: str
    store: str
    pixel_measure: PixelMeasure
    n_classes: int
    blend: BlendGrid | None = None  # blended stitching: the sliding-window grid; None: each unit's window, cropped
    probabilities: bool = False  # also store per-class probabilities


Item = tuple[int, tuple[int, ...]]  # (target key, unit index)


def pending_units(grid: TileGrid, done: np.ndarray) -> list[WorkUnit]:
    """Units not yet written, in row-major order. ``done`` is a boolean array over the unit grid."""
    if done.shape != grid.unit_grid_shape:
        raise ValueError(f"done-mask shape {done.shape} does not match the unit grid {grid.unit_grid_shape}")
    return [unit for unit in grid.units() if not done[unit.index]]


def group_batches(items: Sequence[T], key: Callable[[T], Hashable], size: int) -> list[list[T]]:
    """Consecutive runs of items with equal ``key`` (a window shape), cut at ``size``.

    Guarantees: the groups, concatenated, are ``items`` in order; every group is non-empty, at
    most ``size`` long, and its items share one key (so their windows stack into one tensor).
    """
    if size < 1:
        raise ValueError("batch size must be >= 1")
    groups: list[list[T]] = []
    last: Hashable = object()
    for item in items:
        k = key(item)
        if groups and k == last and len(groups[-1]) < size:
            groups[-1].append(item)
        else:
            groups.append([item])
        last = k
    return groups


SQUARE = 4  # units per side of the squares that square_order visits (a lease is one square)


def square_order(items: Sequence[Item], side: int = SQUARE) -> list[Item]:
    """``items`` visited in ``side`` x ``side`` squares of units (over the last two axes), squares
    left to right along strips, strips top to bottom; inputs, and leading axes (z), outermost.

    Why: a unit's window reaches into its neighbours' source blocks (the halo). In row-major
    order the blocks that the next row needs were decoded a whole image row ago, so a cache big
    enough to keep them grows with the image width; in squares they are recent, and a fixed
    cache (GDAL's, 64 MB per worker) keeps them whatever the width. Guarantee: a permutation.
    """

    def key(item: Item) -> tuple[int, ...]:
        target, index = item
        *outer, row, col = index
        return (target, *outer, row // side, col // side, row, col)

    return sorted(items, key=key)


def lease_size(remaining: int, actors: int, batch_size: int) -> int:
    """Units handed to an actor at once: one square of square_order (or a few model calls' worth
    for big batches), but small enough near the end that every actor still gets a share (each
    actor holds two leases, so the next one is read while the current one runs)."""
    if remaining <= 0:
        return 0
    fair = math.ceil(remaining / (2 * max(1, actors)))
    return max(1, min(max(SQUARE * SQUARE, 4 * batch_size), fair))


def batch_for(batch_size: int | str, device: str) -> int:
    """``runtime.batch_size``: ``auto`` is 1 window per call on CPUs (a batch only adds cache
    misses there: measured 2x slower per tile at 4 x 640² for a small U-Net), 8 on GPUs."""
    if batch_size == "auto":
        return 8 if device == "cuda" else 1
    return int(batch_size)


@dataclass(frozen=True)
class Placement:
    """How many actors, and what each one reserves and uses."""

    actors: int  # at the start
    cpus: float
    gpus: float
    threads: int
    min_actors: int = 1  # the pool is topped up to this when actors die
    max_actors: int = 0  # and grows to this while work is queued and the cluster has room (0: actors)

    @property
    def ceiling(self) -> int:
        return max(self.actors, self.max_actors)

    @property
    def device(self) -> str:
        return "cuda" if self.gpus > 0 else "cpu"


def place_actors(
    *,
    node_cpus: Sequence[float],
    node_gpus: Sequence[float],
    actors: int | tuple[int, int] | None,
    actor_cpus: float | str,
    gpus_per_actor: float | str,
    threads: int | None,
) -> Placement:
    """Actors for a cluster whose alive nodes have ``node_cpus`` and ``node_gpus``.

    GPU clusters: one actor per GPU (or per ``gpus_per_actor`` of one, which may be a fraction),
    each with its node's CPUs shared among the node's actors, for reading and writing.
    CPU clusters: one actor per CPU, each with one torch thread. Narrow actors beat one wide one
    (bench/RESULTS.md: on 2 cores two 1-thread actors ran the benchmark U-Net 15-25 % faster end to
    end than one 2-thread actor, and the ``ndvi`` pipeline ceiling 15 % faster): a single-threaded
    forward pass has no barrier to wait at when a read or a write takes its core for a moment, and
    each actor's reads and writes overlap the other's model. The price is one model's memory per
    CPU; ``actor_cpus`` trades it back.

    ``actors``: a number (that many), or ``(MIN, MAX)``: as many as fit now, at least MIN and at
    most MAX, the pool later growing to MAX as nodes join and topped up to MIN as actors die.
    """
    lo, hi = actors if isinstance(actors, tuple) else (actors, actors) if actors else (None, None)
    total_gpus = float(sum(node_gpus))
    gpus = (1.0 if total_gpus >= 1 else 0.0) if gpus_per_actor == "auto" else float(gpus_per_actor)
    if gpus > 0:
        per_node = [math.floor(g / gpus + 1e-9) for g in node_gpus]
        fitting = sum(per_node)
        if actor_cpus == "auto":
            shares = [c / n for c, n in zip(node_cpus, per_node) if n > 0]
            cpus = max(1.0, math.floor(min(shares))) if shares else 1.0
        else:
            cpus = float(actor_cpus)
    else:
        cpus = 1.0 if actor_cpus == "auto" else float(actor_cpus)
        fitting = sum(math.floor(c / cpus + 1e-9) for c in node_cpus)
    count = max(1, fitting) if lo is None or hi is None else min(max(fitting, lo), hi)
    return Placement(
        actors=count, cpus=cpus, gpus=gpus, threads=threads or max(1, int(cpus)),
        min_actors=lo or 1, max_actors=hi or count,
    )  # fmt: skip


def pick_engine(runtime: RuntimeConfig, n_units: int, *, ray_running: bool, ray_address: str | None) -> str:
    """What ``runtime.engine: auto`` means: ``process`` or ``ray``.

    A small job on one machine finishes before a local Ray would have started (several seconds),
    and writes the same bytes in this process; anything bigger, anything aimed at a cluster
    (``runtime.address`` or RAY_ADDRESS), and anything run where Ray is already up (a Ray job, a
    test session) goes to Ray.
    """
    if runtime.engine != "auto":
        return runtime.engine
    if runtime.address or ray_address or ray_running or n_units > runtime.small_job_units:
        return "ray"
    return "process"


def resume_action(status: str | None, same_job: bool, *, overwrite: bool, batch: bool) -> str:
    """What a run does with what it finds at its output path: the one resume policy.

    ``status``: the store there (``"complete"``, ``"incomplete"``) or None for nothing;
    ``same_job``: whether that store was made by this job (config, model and source fingerprint).

    - nothing there: ``create``
    - ``overwrite``: ``replace`` it
    - incomplete, same job: ``resume`` (the units already written stay)
    - incomplete, another job: a batch ``replace``s it (an unfinished older version); a run stops
      (``conflict``): the user may not know what is there
    - complete, same job: a batch ``skip``s it; a run stops (``exists``)
    - complete, another job (the source or config changed): a batch builds a new ``version``
      beside it and swaps it in when complete; a run stops (``exists``)
    """
    if status is None:
        return "create"
    if overwrite:
        return "replace"
    if status != "complete":
        return "resume" if same_job else ("replace" if batch else "conflict")
    if not batch:
        return "exists"
    return "skip" if same_job else "version"
