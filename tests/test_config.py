"""Job configs: typed, frozen, validated once; errors name the field and what is allowed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from pipeline.cli import main
from pipeline.config import JobConfig, NdviModelConfig, load_config
from pipeline.errors import ConfigError

BASE = {
    "source": {"path": "scene.tif", "bands": [3, 8]},
    "model": {"kind": "ndvi"},
    "tiling": {"chunk": 512, "halo": 64},
    "output": {"path": "out/scene.zarr"},
}


def write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_config_parses_into_frozen_typed_models(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, BASE))
    assert isinstance(cfg.model, NdviModelConfig)
    assert cfg.source.bands == [3, 8] and cfg.tiling.chunk == 512 and cfg.runtime.address is None
    with pytest.raises(ValidationError):
        cfg.tiling.chunk = 3  # type: ignore[misc]


def test_set_overrides_any_key_with_yaml_values(tmp_path: Path) -> None:
    cfg = load_config(
        write(tmp_path, BASE),
        ["tiling.chunk=1024", "output.path=out/x.zarr", "source.bands=[4, 8]", "runtime.address=null", "model.nir=2"],
    )
    assert cfg.tiling.chunk == 1024 and cfg.output.path == "out/x.zarr" and cfg.source.bands == [4, 8]


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("tiling.chunk=0", r"tiling\.chunk: Input should be greater than 0 \(got 0\)"),
        ("tiling.chunk=-5", r"tiling\.chunk: Input should be greater than 0 \(got -5\)"),
        ("tiling.halo=-1", r"tiling\.halo: Input should be greater than or equal to 0 \(got -1\)"),
        (
            "tiling.chnk=3",
            r"unknown key 'tiling\.chnk' \(allowed: chunk, halo, chunks_per_unit, edge, stitch, window, overlap, "
            r"weights, sigma\)",
        ),
        ("colour=red", r"unknown key 'colour' \(allowed: source, model, tiling, output, regions, runtime\)"),
        ("model.kind=deeplab", r"model.kind: 'deeplab' is not a model kind \(kinds: ndvi, rgb-vegetation"),
        ("model.water_below=0.5", r"water_below \(0\.5\) must not exceed vegetation_above \(0\.3\)"),
        ("source.bands=[0]", r"source\.bands\.0: Input should be greater than or equal to 1"),
        ("runtime.actors=[4,2]", r"runtime\.actors: .*\[4, 2\]: MIN is above MAX"),
        ("runtime.actors=0", r"runtime\.actors"),
    ],
)
def test_errors_name_the_file_the_field_and_the_problem(tmp_path: Path, override: str, expected: str) -> None:
    path = write(tmp_path, BASE)
    with pytest.raises(ConfigError, match=expected) as info:
        load_config(path, [override])
    assert str(info.value).startswith(str(path))
    assert "\n" not in str(info.value)


def test_stride_must_divide_the_chunk(tmp_path: Path) -> None:
    raw = dict(BASE, model={"kind": "torchscript", "path": "m.pt", "classes": ["a", "b"], "stride": 32})
    with pytest.raises(ConfigError, match=r"tiling\.chunk \(500\) must be a multiple of the model stride \(32\)"):
        load_config(write(tmp_path, raw), ["tiling.chunk=500"])


def test_missing_file_and_bad_yaml_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("source: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(write(tmp_path, BASE), ["tiling.chunk"])


def test_actors_take_a_number_or_a_range(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, BASE), ["runtime.actors=[1, 4]"]).runtime.actors == (1, 4)
    assert load_config(write(tmp_path, BASE), ["runtime.actors=3"]).runtime.actors == 3


def test_identity_ignores_where_the_job_runs(tmp_path: Path) -> None:
    a = load_config(write(tmp_path, BASE))
    b = load_config(write(tmp_path, BASE), ["output.path=elsewhere.zarr", "runtime.actors=3"])
    c = load_config(write(tmp_path, BASE), ["tiling.halo=32"])
    assert a.identity() == b.identity() != c.identity()


def test_config_schema_command_prints_the_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config-schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert set(schema["properties"]) == set(JobConfig.model_fields)


def _undescribed(model: type, prefix: str = "") -> list[str]:
    import typing

    out = []
    for name, field in model.model_fields.items():  # type: ignore[attr-defined]
        if not field.description:
            out.append(prefix + name)
        for arg in typing.get_args(field.annotation) or (field.annotation,):
            if isinstance(arg, type) and hasattr(arg, "model_fields"):
                out += _undescribed(arg, f"{prefix}{name}.")
    return out


def test_every_key_of_job_and_batch_configs_is_described(capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.config import BatchConfig

    assert _undescribed(JobConfig) == [] and _undescribed(BatchConfig) == []
    assert main(["config-schema", "--batch"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert set(schema["properties"]) == set(BatchConfig.model_fields)
    assert all("description" in prop for prop in schema["properties"].values())


def test_a_batch_config_s_unknown_key_lists_the_batch_keys(tmp_path: Path) -> None:
    from pipeline.config import load_batch_config

    config = tmp_path / "batch.yaml"
    body = "inputs: ['*.tif']\nmodel: {kind: ndvi}\noutput: {root: out, path: x.zarr}\n"
    config.write_text(body)
    with pytest.raises(ConfigError, match=r"unknown key 'output.path' \(allowed: root, preview, exports\)"):
        load_batch_config(config)
    config.write_text(body.replace("output: {root: out, path: x.zarr}", "output: {root: out}\ninput: x"))
    with pytest.raises(ConfigError, match=r"unknown key 'input' \(allowed: inputs, source, model"):
        load_batch_config(config)


def test_every_key_of_training_configs_is_described(capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.config import TrainConfig

    assert _undescribed(TrainConfig) == []
    assert main(["config-schema", "--train"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert set(schema["properties"]) == set(TrainConfig.model_fields)
    assert all("description" in prop for prop in schema["properties"].values())
