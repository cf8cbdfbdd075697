"""The store's metadata as one typed model: versions, migration of stores made before the version
field, and one-line refusals of foreign, damaged and newer stores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.georef import Georef
from pipeline.errors import StoreError
from pipeline.store import MaskStore
from pipeline.store.blocks import store_from_blocks
from pipeline.store.meta import FORMAT, VERSION, StoreMeta, parse_meta

UTM = 'PROJCS["WGS 84 / UTM zone 30N",GEOGCS["WGS 84",DATUM["WGS_1984",SPHEROID["WGS 84",6378137,298.257223563]],PRIMEM["Greenwich",0],UNIT["degree",0.0174532925199433]],PROJECTION["Transverse_Mercator"],PARAMETER["latitude_of_origin",0],PARAMETER["central_meridian",-3],PARAMETER["scale_factor",0.9996],PARAMETER["false_easting",500000],PARAMETER["false_northing",0],UNIT["metre",1],AXIS["Easting",EAST],AXIS["Northing",NORTH]]'  # noqa: E501


def _store(tmp_path: Path) -> MaskStore:
    georef = Georef(UTM, (500000.0, 10.0, 0.0, 5800000.0, 0.0, -10.0))
    return store_from_blocks(
        tmp_path / "s.zarr", (40, 30), (16, 16), ["other", "field"], lambda b: np.ones(b.shape, np.uint8),
        georef=georef,
    )  # fmt: skip


def _rewrite(store: Path, change) -> None:  # type: ignore[no-untyped-def]
    for path in (store / "zarr.json",):
        doc = json.loads(path.read_text())
        change(doc["attributes"]["raymask"])
        path.write_text(json.dumps(doc))
    consolidated = json.loads((store / "zarr.json").read_text())
    consolidated.pop("consolidated_metadata", None)
    (store / "zarr.json").write_text(json.dumps(consolidated))


def test_a_new_store_says_its_version_and_reads_back_typed(tmp_path: Path) -> None:
    store = _store(tmp_path)
    info = MaskStore.open(store.path).info
    assert isinstance(info, StoreMeta) and info.version == VERSION == store.meta["version"]
    assert info.class_names == ["other", "field"] and info.complete and info.measure_unit == "m2"
    assert info.shape == [40, 30] and info.transform == [500000.0, 10.0, 0.0, 5800000.0, 0.0, -10.0]
    assert info.stats is not None and info.stats["classes"]["field"]["pixels"] == 1200


def test_a_store_made_before_the_version_field_opens_as_version_1(tmp_path: Path) -> None:
    store = _store(tmp_path)
    _rewrite(store.path, lambda meta: meta.pop("version"))
    info = MaskStore.open(store.path).info
    assert info.version == 1 and info.class_names == ["other", "field"]


def test_a_newer_or_damaged_store_is_refused_in_one_line(tmp_path: Path) -> None:
    store = _store(tmp_path)
    _rewrite(store.path, lambda meta: meta.update(version=VERSION + 1))
    with pytest.raises(StoreError, match=r"s\.zarr: written by a newer raymask \(store version 2"):
        MaskStore.open(store.path)
    _rewrite(store.path, lambda meta: (meta.update(version=VERSION), meta.pop("classes")))
    with pytest.raises(StoreError, match=r"s\.zarr: damaged store metadata \(classes: Field required\)"):
        MaskStore.open(store.path)


def test_keys_this_version_does_not_know_survive_an_update(tmp_path: Path) -> None:
    store = _store(tmp_path)
    _rewrite(store.path, lambda meta: meta.update(written_by_a_newer_minor={"x": 1}))
    opened = MaskStore.open(store.path, mode="r+")
    opened.update_meta(status="complete")
    assert MaskStore.open(store.path).meta["written_by_a_newer_minor"] == {"x": 1}


def test_a_completed_store_keeps_no_temporary_files_of_killed_writers(tmp_path: Path) -> None:
    """A worker killed between zarr's write of ``KEY.<uuid>.partial`` and its rename leaves that file;
    the unit is computed again, and completion sweeps the leftover (found by tests/test_resume.py)."""
    planted: list[Path] = []

    def fill(box):  # type: ignore[no-untyped-def]
        if not planted:  # the store exists now: plant what a killed writer leaves
            leftover = tmp_path / "s.zarr" / "mask" / "c" / "1" / "1.87c8606337ef4622ab3e1713985a9aa1.partial"
            leftover.parent.mkdir(parents=True, exist_ok=True)
            leftover.write_bytes(b"")
            planted.append(leftover)
        return np.zeros(box.shape, np.uint8)

    store = store_from_blocks(tmp_path / "s.zarr", (40, 30), (16, 16), ["a"], fill)
    assert planted and not planted[0].exists()
    assert store.status == "complete" and not list(store.path.rglob("*.partial"))


def test_the_measure_unit_keeps_its_key_on_disk() -> None:
    """In code it is ``measure_unit``; stores and summaries have always written ``measure``."""
    raw = {"format": FORMAT, "status": "complete", "created": "t", "shape": [1, 1], "classes": [], "measure": "mm3"}
    meta = parse_meta(raw, "v.zarr")
    assert meta.measure_unit == "mm3" and "measure" not in (meta.model_extra or {})
