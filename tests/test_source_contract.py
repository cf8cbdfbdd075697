"""The contract every ``Source`` keeps, run against each implementation on bundled data (zarr-python's
store tests are the model): what ``read`` returns, that a window reads the same whatever window
contains it (tiling cannot change the pixels), that the per-worker cache changes nothing, and that a
source survives pickling (it travels to Ray workers)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.config import SourceConfig
from pipeline.core.geometry import Box
from pipeline.sources.inputs import Source, open_input
from pipeline.sources.store_array import StoreArraySource
from tests.conftest import EDGE_CASES, LANDSAT, RGB_BYTE, S2


def _opened(path: str | list[str], tmp_path: Path, bands: list[int] | None = None) -> Source:
    config = SourceConfig(path=path, bands=bands)
    return open_input(config, store_path=tmp_path / "unused.zarr").source


def _store_array(tmp_path: Path) -> Source:
    values = np.random.default_rng(0).normal(size=(6, 40, 30)).astype(np.float32)
    zarr.create_array(str(tmp_path / "s.zarr" / "image"), data=values, chunks=(2, 16, 16))
    return StoreArraySource(str(tmp_path / "s.zarr"), "image")


SOURCES = {
    "geotiff, 2 of 10 bands": lambda tmp: _opened(str(S2), tmp, [3, 8]),
    "geotiff with a nodata collar": lambda tmp: _opened(str(RGB_BYTE), tmp),
    "band files stacked": lambda tmp: _opened([str(p) for p in LANDSAT], tmp),
    "a single DICOM frame": lambda tmp: _opened(str(EDGE_CASES / "693_J2KR.dcm"), tmp),
    "a store's array": _store_array,
}


@pytest.fixture(params=list(SOURCES), ids=list(SOURCES))
def source(request: pytest.FixtureRequest, tmp_path: Path) -> Source:
    return SOURCES[request.param](tmp_path)  # type: ignore[no-any-return]


def _box(source: Source, lo: int, hi: int) -> Box:
    """A box from ``lo`` to ``hi`` on every axis of the source (2-D rasters, 3-D arrays)."""
    return Box((lo,) * _ndim(source), (hi,) * _ndim(source))


def _ndim(source: Source) -> int:
    return 3 if isinstance(source, StoreArraySource) else 2


def test_read_returns_bands_by_pixels_and_a_boolean_validity_of_the_box(source: Source) -> None:
    box = _box(source, 1, 5)
    data, valid = source.read(box)
    assert data.shape == (len(source.bands), *box.shape)
    assert valid.shape == box.shape and valid.dtype == bool
    assert len(source.paths) >= 1


def test_a_window_reads_the_same_inside_any_bigger_window(source: Source) -> None:
    inner = _box(source, 3, 9)
    outer = _box(source, 0, 12)
    data, valid = source.read(inner)
    big, big_valid = source.read(outer)
    crop = inner.within(outer)
    assert np.array_equal(data, big[(slice(None), *crop)], equal_nan=True)
    assert np.array_equal(valid, big_valid[crop])


def test_the_worker_cache_changes_nothing(source: Source) -> None:
    box = _box(source, 2, 10)
    cache: dict[str, object] = {}
    first = source.read(box, cache=cache)
    again = source.read(box, cache=cache)  # served through what the first read cached
    plain = source.read(box)
    for a, b in ((first, plain), (again, plain)):
        assert np.array_equal(a[0], b[0], equal_nan=True) and np.array_equal(a[1], b[1])


def test_a_source_survives_pickling_for_ray_workers(source: Source) -> None:
    box = _box(source, 0, 7)
    copy = pickle.loads(pickle.dumps(source))
    assert copy.paths == source.paths and copy.bands == source.bands
    assert np.array_equal(copy.read(box)[0], source.read(box)[0], equal_nan=True)
