"""The contract every region/ingest ``Executor`` keeps: each item runs exactly once, every result
comes back (in any order), and a task's raymask error reaches the driver with its type."""

from __future__ import annotations

import pytest

from pipeline.errors import SourceError
from pipeline.jobs.cluster import unwrap
from pipeline.jobs.executors import Executor, RayExecutor, SerialExecutor

EXECUTORS = {
    "serial": SerialExecutor,
    "ray": RayExecutor,
    "ray, a handful here": lambda: RayExecutor(serial_up_to=4),
}


def _square(x: int) -> int:
    return x * x


def _fail_on_three(x: int) -> int:
    if x == 3:
        raise SourceError(f"item {x}: unreadable")
    return x


@pytest.fixture(params=list(EXECUTORS), ids=list(EXECUTORS))
def executor(request: pytest.FixtureRequest, ray_session: None) -> Executor:
    return EXECUTORS[request.param]()  # type: ignore[no-any-return]


def test_every_item_runs_once_and_every_result_comes_back(executor: Executor) -> None:
    items = list(range(12))
    assert sorted(executor.map(_square, items)) == [x * x for x in items]
    assert list(executor.map(_square, [])) == []


def test_a_task_error_reaches_the_driver_with_its_type(executor: Executor) -> None:
    with pytest.raises(Exception) as caught:
        list(executor.map(_fail_on_three, list(range(8))))
    error = unwrap(caught.value)
    assert isinstance(error, SourceError) and str(error) == "item 3: unreadable"
