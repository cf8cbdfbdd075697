"""Fuzzing the parsers users feed by hand (issue 11): whatever the config file, the override, the
box, the point or the GeoJSON, the answer is a config, a parse, or a ``RaymaskError`` with one
line; never another exception. Example counts are bounded here; ``make fuzz`` runs many more
(``HYPOTHESIS_PROFILE=fuzz``)."""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.config import apply_overrides, config_from_dict, load_batch_config, load_config, parse_override
from pipeline.core.selection import check_box, parse_numbers, parse_zones
from pipeline.errors import RaymaskError

SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=True), st.text(max_size=12)
)
KEYS = st.sampled_from(
    ["source", "model", "tiling", "output", "regions", "runtime", "path", "bands", "kind", "chunk", "halo",
     "red", "nir", "classes", "inputs", "root", "address", "engine", "connectivity", "x", ""]
)  # fmt: skip
TREES = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(KEYS, children, max_size=5),
    max_leaves=20,
)
EXAMPLES = 5000 if os.environ.get("HYPOTHESIS_PROFILE") == "fuzz" else 150  # `make fuzz`: the long run
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def one_line_error(exc: RaymaskError) -> None:
    assert str(exc) and "\n" not in str(exc).strip(), repr(str(exc))


@FUZZ
@given(st.dictionaries(KEYS, TREES, max_size=7))
def test_any_config_tree_is_a_config_or_one_line(tree: dict) -> None:
    try:
        config_from_dict(tree, origin="fuzz.yaml")
    except RaymaskError as exc:
        one_line_error(exc)


@FUZZ
@given(st.text(max_size=200))
def test_any_yaml_text_is_a_config_or_one_line(tmp_path_factory, text: str) -> None:
    path = tmp_path_factory.mktemp("cfg") / "job.yaml"
    path.write_text(text, encoding="utf-8")
    for load in (load_config, load_batch_config):
        try:
            load(path)
        except RaymaskError as exc:
            one_line_error(exc)


@FUZZ
@given(st.lists(st.text(max_size=30), max_size=4), st.dictionaries(KEYS, TREES, max_size=4))
def test_any_override_is_applied_or_one_line(overrides: list[str], tree: dict) -> None:
    try:
        for text in overrides:
            parse_override(text)
        config_from_dict(apply_overrides(tree, overrides), origin="fuzz.yaml")
    except RaymaskError as exc:
        one_line_error(exc)


@FUZZ
@given(st.text(max_size=60), st.sampled_from([[4], [6], [2], [3], [4, 6], [2, 3]]))
def test_any_box_or_point_text_is_numbers_or_one_line(text: str, count: list[int]) -> None:
    try:
        numbers = parse_numbers(text, count, "--bbox")
        assert len(numbers) in count
        if len(numbers) in (4, 6):
            check_box(numbers)
    except RaymaskError as exc:
        one_line_error(exc)


@FUZZ
@given(TREES)
def test_any_geojson_document_is_zones_or_one_line(doc: object) -> None:
    try:
        parse_zones(doc, "zones.geojson")
    except RaymaskError as exc:
        one_line_error(exc)


@FUZZ
@given(
    st.fixed_dictionaries(
        {"type": st.sampled_from(["FeatureCollection", "Feature", "Polygon", "MultiPolygon", "Point"])},
        optional={
            "features": st.lists(
                st.dictionaries(st.sampled_from(["type", "geometry", "properties"]), TREES), max_size=3
            ),
            "coordinates": st.recursive(st.floats(allow_nan=True) | st.integers(), lambda c: st.lists(c, max_size=5)),
            "geometry": TREES,
            "crs": TREES,
        },
    )
)  # fmt: skip
def test_geojson_shaped_documents_are_zones_or_one_line(doc: dict) -> None:
    try:
        parse_zones(doc, "zones.geojson")
    except RaymaskError as exc:
        one_line_error(exc)


def test_the_shipped_configs_still_load() -> None:
    """The fuzzers' oracle is not vacuous: real configs parse."""
    root = Path(__file__).resolve().parent.parent / "configs"
    from pipeline.config import load_train_config

    for path in sorted(root.glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        if path.name.startswith("train-"):
            load_train_config(path)
        else:
            (load_batch_config if "inputs" in raw else load_config)(path)


@functools.cache
def ct_headers() -> list:
    """The bundled CT series' headers (no pixel data): what the series assembler reads."""
    import pydicom

    from tests.conftest import CT_SERIES

    return [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(CT_SERIES.iterdir())]


PERTURB = st.sampled_from(
    ["ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "SeriesInstanceUID",
     "SOPInstanceUID", "Modality", "RescaleSlope", "NumberOfFrames"]
)  # fmt: skip
NUMBERS = st.lists(st.floats(-1e6, 1e6, allow_nan=False) | st.sampled_from([float("nan"), 0.0]), min_size=0, max_size=7)


@settings(max_examples=EXAMPLES // 4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.data(),
    st.lists(st.integers(0, 19), min_size=1, max_size=24),  # a subset, in any order, with repeats (copies)
    st.lists(st.tuples(st.integers(0, 23), PERTURB, NUMBERS), max_size=3),
)
def test_any_subset_order_copy_or_edit_of_a_series_is_a_series_or_one_line(
    tmp_path_factory, data, picks: list[int], edits: list
) -> None:

    from pipeline.sources.dicom import discover

    folder = tmp_path_factory.mktemp("series")
    with warnings.catch_warnings():  # pydicom warns about the invalid values this writes on purpose
        warnings.simplefilter("ignore")
        write_series(folder, data, picks, edits)
    try:
        found, _ = discover([str(folder)])
        assert found and all(s.frames for s in found)
    except RaymaskError as exc:
        one_line_error(exc)


def write_series(folder: Path, data, picks: list[int], edits: list) -> None:  # type: ignore[no-untyped-def]
    import copy

    for n, k in enumerate(picks):
        ds = copy.deepcopy(ct_headers()[k])
        for target, key, values in edits:
            if target != n:
                continue
            if key in ("SeriesInstanceUID", "SOPInstanceUID", "Modality"):
                setattr(ds, key, data.draw(st.sampled_from(["", "1.2.3", "CT", "MR", "9" * 64])))
            elif key in ("Rows", "NumberOfFrames"):
                setattr(ds, key, data.draw(st.integers(0, 4)))
            elif values:
                setattr(ds, key, [f"{v:.6g}" for v in values])
            elif key in ds:
                delattr(ds, key)
        ds.save_as(folder / f"f{n:03d}.dcm", enforce_file_format=False)
