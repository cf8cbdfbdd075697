"""Model kinds: one network exported to TorchScript, torch.export (.pt2) and ONNX gives the same
labels through `raymask run`, in 2-D on bundled Sentinel-2 imagery and in 3-D on a DICOM series;
bad network files are one line each, before any store exists."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr

from pipeline.config import load_config
from tests.conftest import ROOT, S2, run_json, tiny_unet, write_config
from tests.test_bad_input import assert_one_line_error, raymask
from tests.test_volume import tiny_unet3d, write_series

KINDS = {"torchscript": ".pt", "torch-export": ".pt2", "onnx": ".onnx"}


def save(network: torch.nn.Module, kind: str, path: Path, example: torch.Tensor) -> Path:
    """``network`` saved as ``kind``, with dynamic batch and spatial axes."""
    network = network.eval()
    axes = dict.fromkeys(range(example.ndim), torch.export.Dim.AUTO)
    axes.pop(1)  # the bands are fixed
    dynamic = (axes,)  # by position: the forward's argument may have any name
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


# -- model cards ----------------------------------------------------------------------------------

POLYP = ROOT / "configs" / "polyp-frames.yaml"


def card_job(tmp_path: Path, name: str, **model: object) -> Path:
    raw = yaml.safe_load(POLYP.read_text())
    raw["model"] = {"card": str(ROOT / "models" / "polyp" / "MODEL.yaml"), **model}
    raw["source"]["path"] = str(ROOT / raw["source"]["path"])
    raw["output"] = {"path": f"{tmp_path}/{name}.zarr", "preview": False}
    return write_config(tmp_path / f"{name}.yaml", **raw)


def test_a_config_naming_only_the_card_runs_as_the_explicit_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], shipped_store
) -> None:
    explicit, _ = shipped_store("polyp-frames.yaml")
    summary = run_json(capsys, str(card_job(tmp_path, "card")))
    assert summary["status"] == "complete" and summary["exact"] is True
    assert np.array_equal(zarr.open_array(f"{tmp_path}/card.zarr/mask", mode="r")[:],
                          zarr.open_array(str(explicit / "mask"), mode="r")[:])  # fmt: skip
    assert [c["name"] for c in json.loads((tmp_path / "card.zarr" / "zarr.json").read_text())["attributes"]["raymask"]
            ["classes"]] == ["background", "polyp"]  # fmt: skip


def test_what_the_config_states_overrides_the_card(tmp_path: Path) -> None:
    config = load_config(card_job(tmp_path, "over", receptive_radius=40, classes=["bg", "lesion"]))
    assert config.model.receptive_radius == 40  # type: ignore[union-attr]
    assert [getattr(c, "name", c) for c in config.model.classes] == ["bg", "lesion"]  # type: ignore[union-attr]
    assert config.model.stride == 4 and Path(config.model.path) == ROOT / "models" / "polyp" / "model.pt"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"classes": ["a", "b", "c"]}, "model.classes names 3 classes, but the card"),
        ({"dims": 3}, "model.dims: 3, but the card"),
        ({"kind": "onnx"}, "model.kind: 'onnx', but the card"),
    ],
    ids=["class-count", "dims", "kind"],
)
def test_a_config_that_contradicts_the_card_is_one_line(tmp_path: Path, model: dict, message: str) -> None:
    result = raymask("run", str(card_job(tmp_path, "bad", **model)))
    assert_one_line_error(result, "bad.yaml:", message)
    assert not (tmp_path / "bad.zarr").exists()


def test_a_missing_or_malformed_card_is_one_line(tmp_path: Path) -> None:
    config = write_config(tmp_path / "job.yaml", source={"path": str(S2)}, model={"card": str(tmp_path / "none")},
                          output={"path": f"{tmp_path}/o.zarr"})  # fmt: skip
    assert_one_line_error(raymask("run", str(config)), f"{tmp_path}/none: no model card (MODEL.yaml) there")
    card = tmp_path / "MODEL.yaml"
    card.write_text("weights: m.pt\nclasses: [a]\nstrid: 4\n")
    result = raymask("model", "show", str(card))
    assert_one_line_error(result, "MODEL.yaml: unknown key 'strid'")


def test_model_show_prints_the_card() -> None:
    result = raymask("model", "show", str(ROOT / "models" / "polyp" / "model.pt"))
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(None, 1) if not line.startswith("receptive") else ("receptive", line[16:].strip())
                 for line in result.stdout.splitlines())  # fmt: skip
    assert lines["classes"].strip() == "background #303030, polyp #ff3b30"
    assert lines["input"].strip() == "red, green, blue" and lines["stride"].strip() == "4"
    shown = json.loads(raymask("model", "show", str(ROOT / "models" / "polyp"), "--json").stdout)
    measured = shown["measured"]["receptive_radius"]  # by raymask model check, when raymask train wrote the card
    assert shown["receptive_radius"] == measured > 0 and shown["weights"] == "model.pt"


# -- raymask model check ----------------------------------------------------------------------------


def conv_stack(layers: int, dilation: int = 1) -> torch.nn.Module:
    """``layers`` 3x3 convolutions: receptive radius exactly ``layers * dilation``."""
    torch.manual_seed(1)
    parts: list[torch.nn.Module] = []
    for _ in range(layers):
        parts += [torch.nn.Conv2d(3, 3, 3, padding=dilation, dilation=dilation), torch.nn.Tanh()]
    return torch.nn.Sequential(*parts).eval()


class InstanceNormNet(torch.nn.Module):  # MONAI's default UNet and nnU-Net normalise per instance
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm, self.head = (
            torch.nn.Conv2d(3, 8, 3, padding=1),
            torch.nn.InstanceNorm2d(8),
            torch.nn.Conv2d(8, 2, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.norm(self.conv(x))))


class GlobalPoolNet(torch.nn.Module):  # DeepLabV3's ASPP image pooling
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(16, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = torch.relu(self.conv(x))
        pooled = features.mean(dim=(2, 3), keepdim=True).expand_as(features)
        return self.head(torch.cat([features, pooled], dim=1))


@pytest.mark.parametrize(("layers", "dilation"), [(1, 1), (3, 1), (4, 2), (6, 3)])
def test_check_measures_the_receptive_radius_of_known_networks(layers: int, dilation: int) -> None:
    from workers.models.check import check_network

    result = check_network(conv_stack(layers, dilation), bands=3)
    assert result.equivariant and result.stitch == "exact"
    assert result.receptive_radius == layers * dilation
    assert result.suggested_halo is not None and result.suggested_halo > layers * dilation


def test_check_finds_the_unet_exact_at_its_stride_and_within_its_halo() -> None:
    from workers.models.check import check_network

    result = check_network(tiny_unet(3, 3).eval(), bands=3, stride=4)
    assert result.equivariant and result.stitch == "exact"
    assert result.receptive_radius is not None and 4 <= result.receptive_radius <= 24  # the exactness tests' halo


@pytest.mark.parametrize("network", [InstanceNormNet, GlobalPoolNet], ids=["instance-norm", "global-pooling"])
def test_check_sends_instance_norm_and_global_pooling_to_blending(network: type[torch.nn.Module]) -> None:
    from workers.models.check import check_network

    result = check_network(network().eval(), bands=3)
    assert result.stitch == "blend" and result.suggested_halo is None
    assert not result.equivariant or result.receptive_radius is None
    assert "blend" in result.summary()


def test_model_check_writes_its_measurement_into_the_card(tmp_path: Path) -> None:
    weights = save(conv_stack(3), "torch-export", tmp_path / "net.pt2", torch.randn(1, 3, 32, 32))
    result = raymask("model", "check", str(weights), "--write")
    assert result.returncode == 0, result.stderr
    assert "receptive radius 3 px (measured); halo 4 makes tiles exact" in result.stdout
    card = yaml.safe_load((tmp_path / "MODEL.yaml").read_text())
    assert card["measured"]["receptive_radius"] == 3 and card["receptive_radius"] == 4 and card["stitch"] == "exact"
    shown = raymask("model", "show", str(tmp_path))
    assert shown.returncode == 0 and "stitching         exact" in shown.stdout, shown.stdout
    onnx = save(InstanceNormNet(), "onnx", tmp_path / "inorm.onnx", torch.randn(1, 3, 32, 32))
    verdict = json.loads(raymask("model", "check", str(onnx), "--json").stdout)
    assert verdict["stitch"] == "blend"


@pytest.mark.parametrize(
    ("card", "stated"),
    [({"stitch": "blend", "receptive_radius": 3}, {}),
     ({"receptive_radius": 6, "measured": {"receptive_radius": 6, "equivariant": True}}, {"receptive_radius": 3})],
    ids=["card-says-blend", "declared-below-measured"],
)  # fmt: skip
def test_no_exactness_is_claimed_against_the_card(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], card: dict, stated: dict
) -> None:
    save(conv_stack(3), "torch-export", tmp_path / "net.pt2", torch.randn(1, 3, 32, 32))
    (tmp_path / "MODEL.yaml").write_text(yaml.safe_dump({"weights": "net.pt2", "classes": ["a", "b", "c"], **card}))
    config = write_config(
        tmp_path / "job.yaml", source={"path": str(S2), "bands": [1, 2, 3]},
        model={"card": str(tmp_path), "scale": 0.01, **stated}, tiling={"chunk": 128, "halo": 8},
        output={"path": f"{tmp_path}/o.zarr", "preview": False}, runtime={"engine": "process"},
    )  # fmt: skip
    summary = run_json(capsys, str(config))
    assert summary["status"] == "complete" and summary["exact"] is False
    if card.get("stitch") == "blend":  # the card's stitching is the job's unless the job says otherwise
        assert summary["stitch"] == "blend" and "sliding-window inference" in summary["equals"], summary
    else:
        assert any(n.startswith("tiling not claimed exact:") and "model card" in n for n in summary["notes"]), summary
    # naming the weights directly, not the card, changes nothing: the card beside them is read
    direct = yaml.safe_load(config.read_text())
    direct["model"] = {"kind": "torch-export", "path": str(tmp_path / "net.pt2"), "classes": ["a", "b", "c"],
                       "receptive_radius": stated.get("receptive_radius", 3), "scale": 0.01}  # fmt: skip
    direct["output"]["path"] = f"{tmp_path}/direct.zarr"
    assert run_json(capsys, str(write_config(tmp_path / "direct.yaml", **direct)))["exact"] is False


# -- MONAI bundles --------------------------------------------------------------------------------


def make_bundle(folder: Path, *, scripted: bool = False, channel_def: dict | None = None, channels: int = 2) -> Path:
    """A MONAI bundle folder built here (nothing downloaded): a 2-D MONAI UNet with BatchNorm."""
    import json as _json

    from monai.bundle import ConfigParser

    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    network_def = {"_target_": "UNet", "spatial_dims": 2, "in_channels": channels, "out_channels": 3,
                   "channels": [8, 16, 32], "strides": [2, 2], "norm": "batch"}  # fmt: skip
    (folder / "configs" / "inference.json").write_text(_json.dumps({"network_def": network_def}))
    classes = {"0": "other", "1": "vegetation", "2": "water"} if channel_def is None else channel_def
    meta = {"network_data_format": {"inputs": {"image": {"num_channels": channels}},
                                    "outputs": {"pred": {"channel_def": classes}}}}  # fmt: skip
    (folder / "configs" / "metadata.json").write_text(_json.dumps(meta))
    parser = ConfigParser()
    parser.read_config(str(folder / "configs" / "inference.json"))
    torch.manual_seed(3)
    net = parser.get_parsed_content("network_def").eval()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    if scripted:
        torch.jit.save(torch.jit.script(net), str(folder / "models" / "model.ts"))
    else:
        torch.save(net.state_dict(), folder / "models" / "model.pt")
    return folder


def bundle_job(tmp_path: Path, name: str, path: Path, **model: object) -> Path:
    return write_config(
        tmp_path / f"{name}.yaml",
        source={"path": str(S2), "bands": [3, 8]},
        model={"kind": "monai-bundle", "path": str(path), "stride": 4,
               "normalize": {"mean": [66, 340], "std": [42, 172]}, **model},
        tiling={"chunk": 128, "halo": 32},
        output={"path": f"{tmp_path}/{name}.zarr", "preview": False},
        regions={"enabled": False},
        runtime={"engine": "process"},
    )  # fmt: skip


def test_a_monai_bundle_runs_with_classes_from_its_metadata(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    weights = make_bundle(tmp_path / "weights-bundle")
    scripted = make_bundle(tmp_path / "scripted-bundle", scripted=True)
    masks = {}
    for name, bundle in (("weights", weights), ("scripted", scripted)):
        summary = run_json(capsys, str(bundle_job(tmp_path, name, bundle)))
        assert summary["status"] == "complete"
        assert list(summary["classes"]) == ["other", "vegetation", "water"]  # from metadata.json's channel_def
        masks[name] = zarr.open_array(f"{tmp_path}/{name}.zarr/mask", mode="r")[:]
    assert np.array_equal(
        masks["weights"], masks["scripted"]
    )  # the network from its config + weights = its TorchScript
    assert len(np.unique(masks["weights"])) > 1


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: make_bundle(d / "b", channels=4), "the bundle's network takes 4 input channels, the job gives it 2"),
        (lambda d: (make_bundle(d / "b") / "models" / "model.pt").unlink() or d / "b",
         "the bundle has no weights (models/model.ts or models/model.pt); nothing is downloaded"),
        (lambda d: make_bundle(d / "b", channel_def={}), "the bundle's metadata names no output channels"),
    ],
    ids=["channels", "no-weights", "no-classes"],
)  # fmt: skip
def test_a_broken_bundle_is_one_line_before_any_store(
    tmp_path: Path, setup: Callable[[Path], Path], message: str
) -> None:
    result = raymask("run", str(bundle_job(tmp_path, "bad", setup(tmp_path))))
    assert_one_line_error(result, message)
    assert not (tmp_path / "bad.zarr").exists()
