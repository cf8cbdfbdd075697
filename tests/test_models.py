"""Model kinds: one network exported to TorchScript, torch.export (.pt2) and ONNX gives the same
labels through `raymask run`, in 2-D on bundled Sentinel-2 imagery and in 3-D on a DICOM series;
bad network files are one line each, before any store exists."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from tests.conftest import S2, run_json, tiny_unet, write_config
from tests.test_bad_input import assert_one_line_error, raymask
from tests.test_volume import tiny_unet3d, write_series

KINDS = {"torchscript": ".pt", "torch-export": ".pt2", "onnx": ".onnx"}


def save(network: torch.nn.Module, kind: str, path: Path, example: torch.Tensor) -> Path:
    """``network`` saved as ``kind``, with dynamic batch and spatial axes."""
    network = network.eval()
    dynamic = {"x": dict.fromkeys(range(example.ndim), torch.export.Dim.AUTO)}
    dynamic["x"].pop(1)  # the bands are fixed
    if kind == "torchscript":
        torch.jit.save(torch.jit.script(network), str(path))
    elif kind == "torch-export":
        torch.export.save(torch.export.export(network, (example,), dynamic_shapes=dynamic), str(path))
    else:
        with warnings.catch_warnings():  # the exporter's own deprecation and progress notes
            warnings.simplefilter("ignore")
            torch.onnx.export(network, (example,), str(path), dynamo=True, input_names=["x"],
                              dynamic_shapes=dynamic, verbose=False)  # fmt: skip
    return path


@pytest.fixture(scope="module")
def unet_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("unet")
    net = tiny_unet(2, 3, seed=5)  # all three classes on the Aberystwyth scene
    example = torch.randn(2, 2, 64, 96)
    return {kind: save(net, kind, folder / f"unet{ext}", example) for kind, ext in KINDS.items()}


def job(tmp_path: Path, kind: str, path: Path, **model: object) -> Path:
    return write_config(
        tmp_path / f"{kind}.yaml",
        source={"path": str(S2), "bands": [3, 8]},
        model={"kind": kind, "path": str(path), "classes": ["a", "b", "c"], "stride": 4, "receptive_radius": 20,
               "normalize": {"mean": [66, 340], "std": [42, 172]}, **model},
        tiling={"chunk": 128, "halo": 24},
        output={"path": f"{tmp_path}/{kind}.zarr", "preview": False},
        regions={"enabled": False},
        runtime={"engine": "process"},
    )  # fmt: skip


def test_one_network_in_three_formats_gives_the_same_labels(
    unet_files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    masks = {}
    for kind, path in unet_files.items():
        summary = run_json(capsys, str(job(tmp_path, kind, path)))
        assert summary["status"] == "complete" and summary["exact"] is True, summary
        masks[kind] = zarr.open_array(f"{tmp_path}/{kind}.zarr/mask", mode="r")[:]
    assert np.bincount(masks["torchscript"].ravel(), minlength=3)[:3].min() > 1000  # every class is there
    assert np.array_equal(masks["torch-export"], masks["torchscript"])
    assert np.array_equal(masks["onnx"], masks["torchscript"])


def test_a_3d_network_in_three_formats_gives_the_same_labels(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(5)
    write_series(tmp_path / "series", rng.normal(0, 200, size=(12, 40, 36)).cumsum(axis=0).round())
    net, masks = tiny_unet3d(), {}
    for kind, ext in KINDS.items():
        path = save(net, kind, tmp_path / f"unet3d{ext}", torch.randn(1, 1, 8, 16, 16))
        config = write_config(
            tmp_path / f"{kind}.yaml",
            source={"path": str(tmp_path / "series")},
            model={"kind": kind, "path": str(path), "dims": 3, "classes": ["a", "b", "c"], "stride": 2,
                   "receptive_radius": 10, "scale": 0.005},
            tiling={"chunk": [8, 16, 16], "halo": 10},
            output={"path": f"{tmp_path}/{kind}.zarr", "preview": False},
            runtime={"engine": "process"},
        )  # fmt: skip
        summary = run_json(capsys, str(config))
        assert summary["status"] == "complete" and summary["exact"] is True
        masks[kind] = zarr.open_array(f"{tmp_path}/{kind}.zarr/labels/mask/0", mode="r")[:]
    assert len(np.unique(masks["torchscript"])) > 1
    assert np.array_equal(masks["torch-export"], masks["torchscript"])
    assert np.array_equal(masks["onnx"], masks["torchscript"])


Maker = Callable[[Path], Path]


def fixed_size_onnx(tmp_path: Path) -> Path:
    path = tmp_path / "fixed.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(tiny_unet(2, 3).eval(), (torch.randn(1, 2, 64, 64),), str(path), dynamo=True)
    return path


def four_band_onnx(tmp_path: Path) -> Path:
    return save(tiny_unet(4, 3), "onnx", tmp_path / "four.onnx", torch.randn(1, 4, 64, 64))


@pytest.mark.parametrize(
    ("kind", "make", "model", "message"),
    [
        ("onnx", fixed_size_onnx, {}, "fixed.onnx: the graph takes a fixed 64 × 64 input, but this job's windows are"),
        ("onnx", four_band_onnx, {}, "four.onnx: the graph takes 4 input bands, the job gives it 2 (source.bands)"),
        ("onnx", lambda d: (d / "text.onnx").write_text("hello") and d / "text.onnx", {},
         "text.onnx: not an ONNX graph onnxruntime can load"),
        ("torch-export", lambda d: (d / "text.pt2").write_text("hello") and d / "text.pt2", {},
         "text.pt2: not an exported program (torch.export.save, a .pt2 file)"),
        ("onnx", four_band_onnx, {"precision": "bfloat16"},
         "model.precision: an ONNX graph runs in the precision it was exported in"),
    ],
    ids=["onnx-fixed-size", "onnx-band-count", "onnx-not-a-graph", "pt2-not-a-program", "onnx-precision"],
)  # fmt: skip
def test_bad_network_files_are_one_line_before_any_store(
    tmp_path: Path, kind: str, make: Maker, model: dict[str, object], message: str
) -> None:
    config = job(tmp_path, kind, make(tmp_path), **model)
    assert_one_line_error(raymask("run", str(config)), message)
    assert not (tmp_path / f"{kind}.zarr").exists()
