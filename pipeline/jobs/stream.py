"""Run work units on workers, in this process or on Ray actors, and yield one small row per unit.

Why not one Ray task per tile: measured on 2 cores (bench/RESULTS.md), scheduling a read task,
a batch on an actor pool and a write task for every 512 px tile through Ray Data cost 0.2-0.45 s
per tile, whatever the model, and moved every window through the object store twice. Here each
worker (``workers.unit_worker.UnitWorker``, one model per actor, a GPU each where there are GPUs)
is given *leases*, short lists of units, and runs read -> predict -> write for them itself,
pipelined in its own threads; the driver only hands out leases and counts rows. Each actor holds
two leases, so it starts reading the next one while the model finishes the current one; but a second
lease comes only from units that no actor without work could take (with 2 units and 2 actors, the
first actor loaded took both and the other had nothing to do: blended jobs have few, large units).

Fault tolerance: when an actor's process dies (killed, out of memory, a native crash), the units
of its leases that had not reported are put back at the front of the queue and a new actor takes
its place; a unit whose workers died more than ``runtime.max_retries`` times fails with a
WorkerError. Units are written whole and rewritten with the same bytes, so a retry is harmless.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pipeline.config import ModelConfig, NetworkModelConfig, RuntimeConfig
from pipeline.core.plan import Item, Placement, Target, batch_for, lease_size, place_actors, square_order
from pipeline.errors import ConfigError, WorkerError, describe, one_line, rebuild
from pipeline.jobs.cluster import local_cpus, storage_options
from pipeline.sources.geotiff import WORKER_QUIET

GROW_EVERY_S = 2.0  # how often a running pool looks for room to grow into

Row = dict[str, Any]


@dataclass
class StreamClock:
    """What a run's summary reports apart: worker start-up (model loading) and steady work."""

    workers_s: float = 0.0
    compute_s: float = 0.0
    placement: Placement | None = None
    replaced: int = 0  # actors started in place of ones that died
    grown: int = 0  # actors added while the run went on (nodes that joined, runtime.actors: [MIN, MAX])
    lost: int = 0  # actors that died (with their node, or killed)


def stream(
    targets: dict[int, Target],
    units: list[Item],
    *,
    model: ModelConfig,
    runtime: RuntimeConfig,
    engine: str,
    isolate: bool = False,
    progress: bool = True,
    clock: StreamClock | None = None,
) -> Iterator[Row]:
    """Yield ``{key, unit, error, error_type}`` per finished unit (``error`` is "" when it landed).

    Without ``isolate`` the first failed unit stops the run with its error (the raymask error
    class it was raised as, one line); with it (batch runs), failures are rows like the others.
    """
    clock = clock or StreamClock()
    units = square_order(units)
    run = _in_process if engine == "process" else _on_ray
    rows = run(targets, units, model, runtime, clock)
    bar = _Bar(len(units), progress)
    started = time.perf_counter()
    try:
        for row in rows:
            if row is None:  # workers are up: start the bar's clock now, so its rate and ETA are the steady ones
                clock.workers_s = time.perf_counter() - started
                bar.start()
                continue
            bar.update()
            if row["error"] and not isolate:
                message = row["error"].partition("\n")[0]
                raise rebuild(row["error_type"], message)
            yield row
    finally:
        close = getattr(rows, "close", None)
        if close is not None:
            close()
        bar.close()
        clock.compute_s = time.perf_counter() - started - clock.workers_s


def _in_process(
    targets: dict[int, Target], units: list[Item], model: ModelConfig, runtime: RuntimeConfig, clock: StreamClock
) -> Iterator[Row | None]:
    from workers.unit_worker import UnitWorker

    cpus = local_cpus()
    device = _local_device(runtime, model)
    clock.placement = Placement(actors=1, cpus=float(cpus), gpus=1.0 if device == "cuda" else 0.0,
                                threads=runtime.threads or cpus)  # fmt: skip
    with warnings.catch_warnings():  # set here, before the worker's threads start (filters are process-wide)
        for category in WORKER_QUIET:
            warnings.simplefilter("ignore", category)
        worker = UnitWorker(
            targets,
            model,
            threads=clock.placement.threads,
            device=device,
            batch_size=batch_for(runtime.batch_size, device),
            prefetch=runtime.prefetch,
            io_threads=runtime.io_threads,
        )
        try:
            yield None
            yield from worker.process(units)
        finally:
            worker.close()


def _local_device(runtime: RuntimeConfig, model: ModelConfig) -> str:
    """The GPU when this machine has one and the model can use it (index models are numpy: CPU)."""
    no_gpu = runtime.gpus_per_actor != "auto" and float(runtime.gpus_per_actor) == 0
    if no_gpu or not isinstance(model, NetworkModelConfig):
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _placement(runtime: RuntimeConfig) -> Placement:
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    cpus = [float(n["Resources"].get("CPU", 0)) for n in nodes]
    gpus = [float(n["Resources"].get("GPU", 0)) for n in nodes]
    placement = place_actors(
        node_cpus=cpus,
        node_gpus=gpus,
        actors=runtime.actors,
        actor_cpus=runtime.actor_cpus,
        gpus_per_actor=runtime.gpus_per_actor,
        threads=runtime.threads,
    )
    fits = any(c >= placement.cpus and g >= placement.gpus for c, g in zip(cpus, gpus))
    if not fits:  # Ray would wait for such a node forever
        raise ConfigError(
            f"runtime: an actor needs {placement.cpus:g} CPUs and {placement.gpus:g} GPUs, but no node of the "
            f"cluster has that much (nodes: {', '.join(f'{c:g} CPU/{g:g} GPU' for c, g in zip(cpus, gpus))}); "
            "lower runtime.actor_cpus or runtime.gpus_per_actor"
        )
    return placement


class _Actor:
    """One live actor and the leases it holds: each a generator of rows and its unreported units."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.leases: dict[Any, set[Item]] = {}


def _on_ray(
    targets: dict[int, Target],
    units: list[Item],
    model: ModelConfig,
    runtime: RuntimeConfig,
    clock: StreamClock,
) -> Iterator[Row | None]:
    import ray
    from ray.exceptions import RayActorError, RayTaskError, WorkerCrashedError

    from workers.unit_worker import UnitWorker

    placement = clock.placement = _placement(runtime)
    batch = batch_for(runtime.batch_size, placement.device)
    worker_cls = ray.remote(UnitWorker)
    targets_ref = ray.put(targets)

    def start() -> _Actor:
        handle = worker_cls.options(  # type: ignore[attr-defined]
            num_cpus=placement.cpus,
            num_gpus=placement.gpus,
            max_concurrency=3,  # two leases at once, plus the ready() probe
            max_restarts=0,  # a dead actor is replaced here, with its units requeued
            scheduling_strategy="SPREAD",
            **storage_options(),
        ).remote(
            targets_ref,
            model,
            threads=placement.threads,
            device=placement.device,
            batch_size=batch,
            prefetch=runtime.prefetch,
            io_threads=runtime.io_threads,
            actor=True,
        )
        return _Actor(handle)

    queue: deque[Item] = deque(units)
    attempts: dict[Item, int] = {}
    actors = [start() for _ in range(min(placement.actors, max(1, len(units))))]  # no more actors than units
    working: set[_Actor] = set()  # loaded and given work; the summary reports the most at once
    clock.placement = dataclasses.replace(placement, actors=0)
    owner: dict[Any, _Actor] = {}
    loading: dict[Any, _Actor] = {}  # ready() probes of actors still loading their model

    def give(actor: _Actor) -> None:
        idle = sum(1 for a in actors if a is not actor and not a.leases)  # loading, or waiting for work
        if actor.leases and len(queue) <= idle:
            return  # a second lease (read ahead) only from what the actors without work cannot take
        size = lease_size(len(queue), len(actors), batch)
        lease = [queue.popleft() for _ in range(min(size, len(queue)))]
        if lease:
            generator = actor.handle.process.options(num_returns="streaming").remote(lease)
            actor.leases[generator] = set(lease)
            owner[generator] = actor

    def room() -> bool:
        """Whether the cluster has the resources of one more actor free now (summed over nodes)."""
        free = ray.available_resources()
        return free.get("CPU", 0.0) >= placement.cpus - 1e-9 and free.get("GPU", 0.0) >= placement.gpus - 1e-9

    checked = [time.monotonic()]

    def grow() -> None:
        """Add an actor when work is queued beyond what the live ones hold, the pool is under its
        ceiling, none is still loading (its resources are not yet counted as taken) and the
        cluster has room: nodes that joined after the start get work."""
        now = time.monotonic()
        if now - checked[0] < GROW_EVERY_S or loading or len(actors) >= placement.ceiling:
            return
        checked[0] = now
        if len(queue) > sum(len(lease) for a in actors for lease in a.leases.values()) and room():
            clock.grown += 1
            actor = start()
            actors.append(actor)
            loading[actor.handle.ready.remote()] = actor

    def lost(actor: _Actor, cause: BaseException) -> Iterator[Row]:
        """The actor died: requeue what it had not reported, or fail units that used up their retries."""
        ray.kill(actor.handle, no_restart=True)
        actors.remove(actor)
        working.discard(actor)
        clock.lost += 1
        for generator, pending in actor.leases.items():
            owner.pop(generator, None)
            for item in sorted(pending):
                attempts[item] = attempts.get(item, 0) + 1
                if attempts[item] > runtime.max_retries:
                    error = WorkerError(
                        f"work unit {list(item[1])}: its worker died {attempts[item]} times "
                        f"(last: {one_line(cause, 160)}); out of memory?"
                    )
                    yield {"key": item[0], "unit": item[1], "error": describe(error), "error_type": "WorkerError"}
                else:
                    queue.appendleft(item)
        actor.leases.clear()
        # Replaced while the pool is under its minimum, or where the cluster still has room (a
        # crashed worker); an actor lost with its node is not, and the pool shrinks with the cluster.
        if queue and (len(actors) < placement.min_actors or room()):
            clock.replaced += 1
            replacement = start()
            actors.append(replacement)
            loading[replacement.handle.ready.remote()] = replacement

    # Work starts on each actor as soon as its model is loaded: actors start at different times on
    # a cluster, and one that cannot be placed (more asked for than the nodes hold, an autoscaler
    # that never delivers) must not hold up the others.
    loading.update({actor.handle.ready.remote(): actor for actor in actors})
    started, load_deaths, peak = False, 0, 0
    try:
        while owner or (queue and loading):
            grow()
            ready, _ = ray.wait([*loading, *owner], num_returns=1, timeout=GROW_EVERY_S)
            if not ready:
                continue
            if ready[0] in loading:
                actor = loading.pop(ready[0])
                try:
                    failure = ray.get(ready[0])
                except (RayActorError, WorkerCrashedError) as exc:  # died while loading: it held no units
                    load_deaths += 1
                    if load_deaths <= runtime.max_retries:
                        yield from lost(actor, exc)  # a replacement loads the model again
                        continue
                    if working:  # the others carry on without it
                        ray.kill(actor.handle, no_restart=True)
                        actors.remove(actor)
                        continue
                    raise WorkerError(  # no actor could load the model: stop
                        f"{getattr(model, 'path', model.kind)}: a worker died while loading the model "
                        f"{load_deaths} times (last: {one_line(exc, 160)}); out of memory?"
                    ) from None
                if failure is not None:
                    raise rebuild(*failure)
                working.add(actor)
                peak = max(peak, len(working))
                clock.placement = dataclasses.replace(placement, actors=peak)
                if not started:
                    started = True
                    yield None
                for _ in range(2):
                    give(actor)
                continue
            generator = ready[0]
            actor = owner[generator]
            try:
                row: Row = ray.get(next(generator))  # type: ignore[call-overload,assignment,arg-type]
            except StopIteration:
                del owner[generator]
                actor.leases.pop(generator, None)
                give(actor)
                continue
            except (RayActorError, WorkerCrashedError) as exc:
                yield from lost(actor, exc)
                continue
            except RayTaskError as exc:  # raised outside a unit's own try: every unreported unit of the lease fails
                del owner[generator]
                for item in sorted(actor.leases.pop(generator, set())):
                    yield {"key": item[0], "unit": item[1], "error": describe(exc), "error_type": "RuntimeError"}
                give(actor)
                continue
            item = (int(row["key"]), tuple(int(i) for i in row["unit"]))
            actor.leases[generator].discard(item)
            yield row
    finally:
        for actor in actors:
            ray.kill(actor.handle, no_restart=True)


class _Bar:
    """tqdm over units, started when the first unit lands (so its rate and ETA are steady-state)."""

    def __init__(self, total: int, enabled: bool) -> None:
        from tqdm import tqdm

        self.bar = tqdm(
            total=total, unit="unit", desc="raymask: starting workers", disable=not enabled, dynamic_ncols=True
        )

    def start(self) -> None:
        self.bar.set_description("raymask")
        self.bar.reset(total=self.bar.total)

    def update(self) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
