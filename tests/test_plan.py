"""Planning, pure: batches of equal windows, lease sizes, actors per cluster shape (property-tested)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.core.plan import batch_for, group_batches, lease_size, place_actors, resume_action, square_order


@given(
    keys=st.lists(st.integers(0, 3), max_size=60),
    size=st.integers(1, 8),
)
def test_batches_keep_order_share_a_key_and_respect_the_size(keys: list[int], size: int) -> None:
    items = list(enumerate(keys))
    groups = group_batches(items, lambda item: item[1], size)
    assert [item for group in groups for item in group] == items
    for group in groups:
        assert 1 <= len(group) <= size
        assert len({k for _, k in group}) == 1
    # maximal: a group is cut only by the size or by a change of key
    for a, b in itertools.pairwise(groups):
        assert len(a) == size or a[-1][1] != b[0][1]


def test_a_batch_size_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="batch size"):
        group_batches([1], lambda x: x, 0)


@given(remaining=st.integers(0, 100_000), actors=st.integers(1, 64), batch=st.integers(1, 16))
def test_leases_are_bounded_and_leave_every_actor_a_share(remaining: int, actors: int, batch: int) -> None:
    size = lease_size(remaining, actors, batch)
    if remaining == 0:
        assert size == 0
        return
    assert 1 <= size <= max(16, 4 * batch)  # one square of units, or four model calls
    assert size <= max(1, -(-remaining // (2 * actors)))  # two leases per actor never exceed what is left


def test_one_actor_per_gpu_by_default_with_the_node_cpus_shared() -> None:
    placement = place_actors(
        node_cpus=[32, 32], node_gpus=[4, 4], actors=None, actor_cpus="auto", gpus_per_actor="auto", threads=None
    )
    assert (placement.actors, placement.gpus, placement.cpus, placement.threads) == (8, 1.0, 8.0, 8)
    assert placement.device == "cuda"


def test_fractional_gpus_put_several_actors_on_one_gpu() -> None:
    placement = place_actors(
        node_cpus=[16], node_gpus=[1], actors=None, actor_cpus="auto", gpus_per_actor=0.25, threads=None
    )
    assert (placement.actors, placement.gpus, placement.cpus) == (4, 0.25, 4.0)


def test_cpu_clusters_get_one_single_threaded_actor_per_cpu() -> None:
    laptop = place_actors(
        node_cpus=[2], node_gpus=[0], actors=None, actor_cpus="auto", gpus_per_actor="auto", threads=None
    )
    assert (laptop.actors, laptop.cpus, laptop.threads, laptop.gpus, laptop.device) == (2, 1.0, 1, 0.0, "cpu")
    nodes = place_actors(
        node_cpus=[64, 8.5], node_gpus=[0, 0], actors=None, actor_cpus="auto", gpus_per_actor=0, threads=None
    )
    assert (nodes.actors, nodes.cpus, nodes.threads) == (72, 1.0, 1)  # a half CPU left over holds no actor
    wide = place_actors(node_cpus=[64, 8], node_gpus=[0, 0], actors=None, actor_cpus=8, gpus_per_actor=0, threads=None)
    assert (wide.actors, wide.cpus, wide.threads) == (9, 8.0, 8)  # 8 per actor fits both nodes: 8 + 1
    asked = place_actors(node_cpus=[8], node_gpus=[0], actors=3, actor_cpus=2.0, gpus_per_actor="auto", threads=1)
    assert (asked.actors, asked.cpus, asked.threads) == (3, 2.0, 1)


@given(
    cpus=st.lists(st.integers(1, 128), min_size=1, max_size=8),
    gpus=st.lists(st.integers(0, 8), min_size=8, max_size=8),
)
def test_auto_placement_always_fits_the_nodes(cpus: list[int], gpus: list[int]) -> None:
    node_gpus = gpus[: len(cpus)]
    p = place_actors(node_cpus=cpus, node_gpus=node_gpus, actors=None, actor_cpus="auto", gpus_per_actor="auto",
                     threads=None)  # fmt: skip
    assert p.actors >= 1 and p.cpus >= 1 and p.threads >= 1
    if sum(node_gpus) >= 1:
        assert p.gpus == 1.0 and p.actors == sum(node_gpus)
        per_node = [(c, g) for c, g in zip(cpus, node_gpus) if g]
        assert all(p.cpus * g <= max(c, g) for c, g in per_node)  # the node's CPUs are shared, never oversold
    else:
        assert p.gpus == 0.0
        assert p.cpus <= min(cpus) or min(cpus) < 1
        assert p.actors == sum(int(np.floor(c / p.cpus)) for c in cpus)


@given(rows=st.integers(1, 13), cols=st.integers(1, 13), side=st.integers(1, 5), inputs=st.integers(1, 3))
def test_square_order_is_a_permutation_that_visits_squares(rows: int, cols: int, side: int, inputs: int) -> None:
    items = [(k, (r, c)) for k in range(inputs) for r in range(rows) for c in range(cols)]
    ordered = square_order(list(reversed(items)), side)
    assert sorted(ordered) == sorted(items)
    assert [k for k, _ in ordered] == sorted(k for k, _ in ordered)  # inputs one after another
    squares = [(k, r // side, c // side) for k, (r, c) in ordered]
    seen: list[tuple[int, int, int]] = []
    for square in squares:  # each square's units come in one run
        if not seen or seen[-1] != square:
            assert square not in seen
            seen.append(square)


def test_square_order_keeps_leading_axes_outermost() -> None:
    items = [(0, (z, r, c)) for z in range(2) for r in range(5) for c in range(5)]
    ordered = square_order(items, 2)
    assert [i[1][0] for i in ordered] == sorted(i[1][0] for i in ordered)
    assert ordered[:4] == [(0, (0, 0, 0)), (0, (0, 0, 1)), (0, (0, 1, 0)), (0, (0, 1, 1))]


@pytest.mark.parametrize(("asked", "device", "expected"), [("auto", "cpu", 1), ("auto", "cuda", 8), (3, "cpu", 3)])
def test_batch_size_auto_is_one_window_on_cpus_and_eight_on_gpus(asked: object, device: str, expected: int) -> None:
    assert batch_for(asked, device) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("status", "same", "overwrite", "run", "batch"),
    [
        (None, False, False, "create", "create"),
        (None, False, True, "create", "create"),
        ("incomplete", True, False, "resume", "resume"),
        ("incomplete", False, False, "conflict", "replace"),
        ("complete", True, False, "exists", "skip"),
        ("complete", False, False, "exists", "version"),
        ("complete", True, True, "replace", "replace"),
        ("incomplete", False, True, "replace", "replace"),
    ],
)
def test_one_resume_policy_for_run_and_batch(
    status: str | None, same: bool, overwrite: bool, run: str, batch: str
) -> None:
    assert resume_action(status, same, overwrite=overwrite, batch=False) == run
    assert resume_action(status, same, overwrite=overwrite, batch=True) == batch


@given(
    cpus=st.lists(st.integers(0, 16), min_size=1, max_size=6),
    lo=st.integers(1, 8),
    extra=st.integers(0, 8),
)
def test_an_actor_range_starts_with_what_fits_clamped_to_it(cpus: list[int], lo: int, extra: int) -> None:
    hi = lo + extra
    p = place_actors(node_cpus=cpus, node_gpus=[0] * len(cpus), actors=(lo, hi), actor_cpus="auto",
                     gpus_per_actor="auto", threads=None)  # fmt: skip
    assert lo <= p.actors <= hi and (p.min_actors, p.max_actors, p.ceiling) == (lo, hi, hi)
    assert p.actors == min(max(sum(cpus), lo), hi)  # one per CPU where the range allows
    fixed = place_actors(node_cpus=cpus, node_gpus=[0] * len(cpus), actors=lo, actor_cpus="auto",
                         gpus_per_actor="auto", threads=None)  # fmt: skip
    assert (fixed.actors, fixed.min_actors, fixed.ceiling) == (lo, lo, lo)  # a number: exactly that, kept
    auto = place_actors(node_cpus=cpus, node_gpus=[0] * len(cpus), actors=None, actor_cpus="auto",
                        gpus_per_actor="auto", threads=None)  # fmt: skip
    assert auto.actors == max(1, sum(cpus)) == auto.ceiling and auto.min_actors == 1
