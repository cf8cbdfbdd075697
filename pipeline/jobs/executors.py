"""Where per-chunk tasks run (DICOM ingest, region labelling): Ray tasks, or this process."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol, TypeVar, cast

T = TypeVar("T")
R = TypeVar("R")


class Executor(Protocol):
    def map(self, fn: Callable[[T], R], items: list[T]) -> Iterator[R]:
        """Run ``fn`` on every item; yield the results as they finish (any order)."""
        ...

    def in_process(self, items: int) -> bool:
        """Whether ``map`` over that many items runs them all in this process (scratch files on this
        machine's disk are then reachable by every step)."""
        ...


class SerialExecutor:
    """Everything in this process (benchmarks, tests of the pure steps, tiny stores)."""

    def map(self, fn: Callable[[T], R], items: list[T]) -> Iterator[R]:
        return (fn(item) for item in items)

    def in_process(self, items: int) -> bool:
        return True


class RayExecutor:
    """One Ray task per item (1 CPU each); a task whose worker dies is retried (Ray's default 3 times).

    Up to ``serial_up_to`` items run in this process instead: each Ray task may start a worker
    process of its own (about a second on a small machine) for milliseconds of work.
    """

    def __init__(self, num_cpus: float = 1.0, *, serial_up_to: int = 0) -> None:
        self.num_cpus = num_cpus
        self.serial_up_to = serial_up_to

    def in_process(self, items: int) -> bool:
        return items <= self.serial_up_to

    def map(self, fn: Callable[[T], R], items: list[T]) -> Iterator[R]:
        if len(items) <= self.serial_up_to:
            yield from SerialExecutor().map(fn, items)
            return
        import ray

        from pipeline.jobs.cluster import storage_options

        remote = ray.remote(num_cpus=self.num_cpus, max_retries=3, retry_exceptions=False, **storage_options())(fn)
        pending = [remote.remote(item) for item in items]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            yield cast(R, ray.get(done[0]))
