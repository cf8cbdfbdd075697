"""Probabilities (``output.probabilities``): per-class softmax stored as uint8 beside the mask, written
by the unit that writes the labels; they feed the region table's ``mean_probability`` and export as
a multi-band COG. Test-time augmentation (``tta: flips``) keeps exact tiling exact. Near-ties are
counted and are the only labels that may differ from one whole-image pass."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import zarr

from pipeline.cli import main
from pipeline.core.stats import decode_probability
from pipeline.store import MaskStore
from tests.conftest import S2, run_json, tiny_unet, write_config
from tests.test_bad_input import assert_one_line_error, raymask
from workers.models.prediction import NEAR_TIE

MEAN, STD = np.array([66, 340], np.float32), np.array([42, 172], np.float32)


@pytest.fixture(scope="module")
def unet(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    net = tiny_unet(2, 3, seed=5)
    path = tmp_path_factory.mktemp("prob") / "unet.pt"
    torch.jit.save(torch.jit.script(net), str(path))
    return net, path


def job(tmp_path: Path, path: Path, name: str, *, tta: str = "none", **output: object) -> Path:
    return write_config(
        tmp_path / f"{name}.yaml",
        source={"path": str(S2), "bands": [3, 8]},
        model={"kind": "torchscript", "path": str(path), "classes": ["background", "b", "c"], "stride": 4,
               "receptive_radius": 20, "normalize": {"mean": MEAN.tolist(), "std": STD.tolist()}, "tta": tta},
        tiling={"chunk": 64, "halo": 24},
        output={"path": f"{tmp_path}/{name}.zarr", "preview": False, **output},
        runtime={"engine": "process"},
    )  # fmt: skip


def whole_image_logits(net: torch.nn.Module, *, tta: bool = False) -> np.ndarray:
    """One pass over the whole scene, padded at its high end to the stride as the job pads it (replicate)."""
    with rasterio.open(S2) as src:
        data = src.read([3, 8]).astype(np.float32)
    h, w = data.shape[1:]
    x = (data - MEAN[:, None, None]) / STD[:, None, None]
    x = np.pad(x, ((0, 0), (0, -h % 4), (0, -w % 4)), mode="edge")
    t = torch.from_numpy(x)[None]
    with torch.no_grad():
        if not tta:
            return net(t)[0, :, :h, :w].numpy()
        passes = [net(t.flip(a)).flip(a) if a else net(t) for a in ((), (2,), (3,), (2, 3))]
        return (sum(p.float() for p in passes) / 4)[0, :, :h, :w].numpy()


def check_against(labels: np.ndarray, logits: np.ndarray, near_ties: int) -> None:
    """Labels equal the whole-image argmax except at near-ties, whose count covers every difference."""
    top2 = np.sort(logits, axis=0)[-2:]
    tie = (top2[1] - top2[0]) <= NEAR_TIE
    differ = labels != logits.argmax(0)
    assert not (differ & ~tie).any()
    assert int(differ.sum()) <= near_ties


def test_probabilities_land_beside_the_mask_and_feed_the_region_table(
    unet: tuple[torch.nn.Module, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    net, path = unet
    summary = run_json(capsys, str(job(tmp_path, path, "p", probabilities=True)))
    assert summary["exact"] is True and summary["stitch"] == "exact"
    assert "labels identical except at float near-ties" in summary["equals"]
    store = MaskStore.open(tmp_path / "p.zarr")
    assert store.info.arrays.probability == "probability"
    stored = np.asarray(store.probability()[:])
    labels = np.asarray(store.mask[:])
    assert stored.dtype == np.uint8 and stored.shape == (3, *labels.shape)
    assert store.probability().chunks == (3, 64, 64)  # chunked like the mask: one unit writes both
    logits = whole_image_logits(net)
    expected = torch.softmax(torch.from_numpy(logits), 0).numpy()
    assert np.abs(decode_probability(stored) - expected).max() <= 0.5 / 254 + 1e-4
    # the label's class has the highest stored probability
    own = np.take_along_axis(stored, labels[None].astype(np.intp), 0)[0]
    assert (own >= stored.max(0)).all()
    check_against(labels, logits, summary["near_ties"])
    assert store.meta["stats"]["near_ties"] == summary["near_ties"]
    # mean_probability per region, against numpy over the regions array
    regions = np.asarray(store.regions()[:])
    table = {name: np.asarray(a[:]) for name, a in store.region_table().arrays()}
    assert len(table["id"]) > 10
    p_own = decode_probability(own)
    sums = np.bincount(regions.ravel(), weights=p_own.ravel().astype(np.float64), minlength=len(table["id"]) + 1)
    counts = np.bincount(regions.ravel(), minlength=len(table["id"]) + 1)
    assert np.allclose(table["mean_probability"], sums[table["id"]] / counts[table["id"]], atol=1e-9)
    assert ((table["mean_probability"] > 1 / 3) & (table["mean_probability"] <= 1)).all()
    # export as a multi-band COG of probabilities
    assert main(["export", str(tmp_path / "p.zarr"), str(tmp_path / "p.tif"), "--probabilities"]) == 0
    with rasterio.open(tmp_path / "p.tif") as cog:
        assert cog.count == 3 and cog.descriptions == ("background", "b", "c") and cog.nodata == 255
        assert np.array_equal(cog.read(), stored)
        assert cog.overviews(1) or max(cog.shape) <= 512
        with rasterio.open(S2) as src:
            assert cog.crs == src.crs and cog.transform == src.transform


def test_probabilities_without_a_network_or_a_store_that_has_none_are_one_line(
    unet: tuple[torch.nn.Module, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(
        tmp_path / "ndvi.yaml",
        source={"path": str(S2)},
        model={"kind": "ndvi", "red": 3, "nir": 8},
        output={"path": f"{tmp_path}/ndvi.zarr", "probabilities": True},
    )
    assert_one_line_error(raymask("run", str(config)), "output.probabilities: model.kind ndvi gives labels")
    assert not (tmp_path / "ndvi.zarr").exists()
    run_json(capsys, str(job(tmp_path, unet[1], "plain")))
    result = raymask("export", str(tmp_path / "plain.zarr"), str(tmp_path / "x.tif"), "--probabilities")
    assert_one_line_error(result, "the store keeps no probabilities")
    assert not (tmp_path / "x.tif").exists()


def test_flip_tta_averages_mirrored_passes_and_stays_exact(
    unet: tuple[torch.nn.Module, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    net, path = unet
    summary = run_json(capsys, str(job(tmp_path, path, "tta", tta="flips", probabilities=True)))
    assert summary["exact"] is True
    labels = np.asarray(zarr.open_array(str(tmp_path / "tta.zarr" / "mask"), mode="r")[:])
    tta = whole_image_logits(net, tta=True)
    check_against(labels, tta, summary["near_ties"])
    plain = whole_image_logits(net)
    assert (labels != plain.argmax(0)).sum() > 100  # the mirrored passes change the answer, not a no-op
    stored = np.asarray(zarr.open_array(str(tmp_path / "tta.zarr" / "probability"), mode="r")[:])
    assert (
        np.abs(decode_probability(stored) - torch.softmax(torch.from_numpy(tta), 0).numpy()).max() <= 0.5 / 254 + 1e-4
    )
