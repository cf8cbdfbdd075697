"""Regions labelled into real zarr stores chunk by chunk equal scipy.ndimage.label on the whole mask."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from pyproj import CRS
from scipy import ndimage

from pipeline.config import RegionsConfig
from pipeline.core.geometry import Box
from pipeline.core.georef import Georef
from pipeline.core.stats import NODATA
from pipeline.core.volume import VolumeGeometry
from pipeline.errors import ConfigError, StoreError
from pipeline.jobs.executors import Executor, RayExecutor, SerialExecutor
from pipeline.jobs.regions import label_store, resolve
from pipeline.query import open_store
from pipeline.store import MaskStore
from pipeline.store.blocks import store_from_blocks
from tests.conftest import assert_store_equals_scipy

BNG = Georef(CRS.from_epsg(27700).to_wkt(), (1000.0, 10.0, 0.0, 2000.0, 0.0, -10.0))


def label(mask: np.ndarray, chunk: tuple[int, ...], connectivity: int, path: Path,
          executor: Executor | None = None, georef: Georef | None = None) -> MaskStore:  # fmt: skip
    classes = ["a", "b", "c"]
    volume = None
    if mask.ndim == 3:
        eye = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))
        volume = VolumeGeometry(mask.shape, (2.0, 0.5, 0.5), (-10.0, 20.0, 30.0), eye)  # type: ignore[arg-type]
    store_from_blocks(path, mask.shape, chunk, classes, lambda box: mask[box.slices()], georef=georef,
                      volume=volume)  # fmt: skip
    store = MaskStore.open(path, mode="r+")
    spec = resolve(RegionsConfig(connectivity=connectivity), mask.ndim, classes)  # type: ignore[arg-type]
    label_store(store, spec, source=None, executor=executor or SerialExecutor())
    return MaskStore.open(path)


@given(
    st.integers(1, 24), st.integers(1, 24), st.integers(2, 8), st.integers(2, 8),
    st.sampled_from([4, 8]), st.integers(0, 2**32 - 1),
)  # fmt: skip
@settings(max_examples=20, deadline=None)
def test_store_regions_equal_scipy_2d(rows, cols, ch, cw, connectivity, seed) -> None:
    rng = np.random.default_rng(seed)
    mask = np.where(rng.random((rows, cols)) < 0.8, rng.integers(0, 3, (rows, cols)), NODATA).astype(np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        store = label(mask, (ch, cw), connectivity, Path(tmp) / "m.zarr")
        assert_store_equals_scipy(store, mask, connectivity)


@given(st.integers(1, 8), st.integers(2, 4), st.sampled_from([6, 18, 26]), st.integers(0, 2**32 - 1))
@settings(max_examples=12, deadline=None)
def test_store_regions_equal_scipy_3d(size, ch, connectivity, seed) -> None:
    rng = np.random.default_rng(seed)
    mask = np.where(rng.random((size, size + 2, size + 1)) < 0.6, rng.integers(0, 2, (size, size + 2, size + 1)),
                    NODATA).astype(np.uint8)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        store = label(mask, (ch, ch + 1, ch), connectivity, Path(tmp) / "v.zarr")
        assert_store_equals_scipy(store, mask, connectivity)


def spiral(n: int) -> np.ndarray:
    mask = np.full((n, n), 1, dtype=np.uint8)
    top, left, bottom, right = 0, 0, n - 1, n - 1
    while top <= bottom and left <= right:  # a square spiral of class 0, width 1, gaps of class 1
        mask[top, left : right + 1] = 0
        mask[top : bottom + 1, right] = 0
        if top + 2 <= bottom:
            mask[bottom, left : right + 1] = 0
        if left + 2 <= right:
            mask[top + 2 : bottom + 1, left] = 0
            if top + 2 <= bottom - 2:
                mask[top + 2, left + 1] = 0  # the bridge into the next ring: one spiral, not nested rings
        top, left, bottom, right = top + 2, left + 2, bottom - 2, right - 2
    return mask


@pytest.mark.slow  # end to end, several seconds: `make test` runs it, `make check` does not
@pytest.mark.parametrize("chunk", [(3, 3), (7, 5), (64, 64)])
def test_a_spiral_over_many_chunks_is_one_region(chunk, tmp_path) -> None:
    mask = spiral(61)
    store = label(mask, chunk, 4, tmp_path / "s.zarr")
    assert_store_equals_scipy(store, mask, 4)
    assert len(open_store(store.path).regions("a")) == 1  # the spiral: one region through every chunk


def test_u_shapes_and_a_frame_touching_all_four_edges(tmp_path) -> None:
    mask = np.full((90, 70), 2, dtype=np.uint8)
    mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = 0  # one region on all four edges
    for left in range(5, 60, 12):  # U shapes whose arms join only at the bottom, 80 rows away
        mask[3:85, left] = mask[3:85, left + 6] = mask[84, left : left + 7] = 1
    store = label(mask, (8, 8), 4, tmp_path / "u.zarr")
    assert_store_equals_scipy(store, mask, 4)
    frame = open_store(store.path).regions("a")
    assert len(frame) == 1 and frame.iloc[0][["row_start", "row_stop", "col_start", "col_stop"]].tolist() == [
        0,
        90,
        0,
        70,
    ]
    assert len(open_store(store.path).regions("b")) == 5


def test_ray_tasks_give_the_same_store_as_this_process(ray_session, tmp_path) -> None:
    rng = np.random.default_rng(3)
    mask = (ndimage.uniform_filter(rng.random((120, 90)), 5) > 0.5).astype(np.uint8)
    serial = label(mask, (32, 16), 8, tmp_path / "serial.zarr", georef=BNG)
    ray = label(mask, (32, 16), 8, tmp_path / "ray.zarr", RayExecutor(), georef=BNG)
    assert_store_equals_scipy(ray, mask, 8)
    assert np.array_equal(serial.regions()[...], ray.regions()[...])
    a, b = open_store(serial.path).regions(), open_store(ray.path).regions()
    assert a.equals(b)
    np.testing.assert_allclose(a["area_m2"], a["pixels"] * 100.0)  # 10 m pixels
    assert not (tmp_path / ".ray.zarr.regions").exists()


def test_relabelling_replaces_regions_and_leaves_the_mask_alone(tmp_path) -> None:
    mask = np.zeros((40, 40), dtype=np.uint8)
    mask[np.eye(40, dtype=bool)] = 1  # a diagonal: 40 regions 4-connected, one 8-connected
    store = label(mask, (10, 10), 4, tmp_path / "d.zarr")
    before = np.asarray(store.mask[...]).copy()
    assert store.regions_info["per_class"]["b"] == 40  # type: ignore[index]
    spec = resolve(RegionsConfig(connectivity=8), 2, ["a", "b", "c"])
    label_store(MaskStore.open(store.path, mode="r+"), spec, source=None, executor=SerialExecutor())
    store = MaskStore.open(store.path)
    assert store.regions_info["per_class"]["b"] == 1  # type: ignore[index]
    assert store.status == "complete" and np.array_equal(store.mask[...], before)
    assert_store_equals_scipy(store, mask, 8)


class FailingExecutor(SerialExecutor):
    """Runs tasks here and fails on the fifth: a worker that dies for good mid-way."""

    def map(self, fn, items):  # type: ignore[no-untyped-def]
        for i, item in enumerate(items):
            if i == 4:
                raise RuntimeError("worker lost")
            yield fn(item)


def test_a_failed_relabel_keeps_the_previous_regions(tmp_path) -> None:
    mask = spiral(41)
    store = label(mask, (8, 8), 4, tmp_path / "s.zarr")
    table = open_store(store.path).regions()
    spec = resolve(RegionsConfig(connectivity=8), 2, ["a", "b", "c"])
    with pytest.raises(RuntimeError, match="worker lost"):
        label_store(MaskStore.open(store.path, mode="r+"), spec, source=None, executor=FailingExecutor())
    again = MaskStore.open(store.path)
    assert again.status == "complete" and open_store(store.path).regions().equals(table)
    assert_store_equals_scipy(again, mask, 4)
    label_store(MaskStore.open(store.path, mode="r+"), spec, source=None, executor=SerialExecutor())
    assert_store_equals_scipy(MaskStore.open(store.path), mask, 8)


def test_interrupted_install_is_detected_on_read(tmp_path) -> None:
    mask = spiral(21)
    store = label(mask, (8, 8), 4, tmp_path / "s.zarr")
    zarr.open_group(str(tmp_path / "s.zarr" / "region_table"), mode="r+").attrs["token"] = "another run"
    with pytest.raises(StoreError, match=r"being replaced when a run stopped.*--compute"):
        open_store(store.path).regions()


def test_regions_config_is_checked(tmp_path) -> None:
    with pytest.raises(ConfigError, match="connectivity 6 does not exist in 2-D"):
        resolve(RegionsConfig(connectivity=6), 2, ["a"])
    with pytest.raises(ConfigError, match="no class 'trees'; classes: other, vegetation"):
        resolve(RegionsConfig(classes=["trees"]), 2, ["other", "vegetation"])
    assert resolve(RegionsConfig(), 3, ["background", "polyp"]).classes == (1,)
    assert resolve(RegionsConfig(), 3, ["background", "polyp"]).connectivity == 6


def test_a_store_without_regions_says_how_to_make_them(tmp_path) -> None:
    store_from_blocks(tmp_path / "n.zarr", (8, 8), (4, 4), ["a"], lambda b: np.zeros(b.shape, np.uint8))
    with pytest.raises(StoreError, match=r"no regions in this store.*raymask regions .*n\.zarr --compute"):
        open_store(tmp_path / "n.zarr").regions()


def test_box_helper_covers_the_image(tmp_path) -> None:
    seen = []
    store_from_blocks(
        tmp_path / "b.zarr", (10, 7), (4, 3), ["a"], lambda b: (seen.append(b), np.zeros(b.shape, np.uint8))[1]
    )
    assert sum(b.size for b in seen) == 70 and Box((8, 6), (10, 7)) in seen
