"""Blended stitching (``tiling.stitch: blend``) equals MONAI's sliding-window inference on the whole
image: the window grid and weights are MONAI's (property-tested against MONAI itself), the per-unit
sums add up to the whole-image sum, and through ``raymask run`` an InstanceNorm U-Net's labels equal
``monai.inferers.sliding_window_inference``'s in 2-D and 3-D (except at counted near-ties), with
logits within 1e-4."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from monai.data.utils import compute_importance_map, dense_patch_slices
from monai.inferers import sliding_window_inference
from monai.inferers.utils import _get_scan_interval
from monai.networks.nets import UNet

from pipeline.core.blend import BlendGrid, accumulate, importance, window_starts
from pipeline.core.geometry import TileGrid
from tests.conftest import S2, run_json, write_config
from tests.test_volume import write_series
from workers.models.prediction import LOGIT_TOLERANCE, NEAR_TIE

OVERLAPS = st.sampled_from([0.0, 0.1, 0.25, 0.33, 0.5, 0.75, 0.9])


@settings(max_examples=300, deadline=None)
@given(size=st.integers(1, 400), window=st.integers(1, 400), overlap=OVERLAPS)
def test_window_starts_are_monais(size: int, window: int, overlap: float) -> None:
    window = min(window, size)
    interval = _get_scan_interval((size,), (window,), 1, (overlap,))
    expected = tuple(s[0].start for s in dense_patch_slices((size,), (window,), interval))
    assert window_starts(size, window, overlap) == expected


@pytest.mark.parametrize("window", [(64, 64), (7, 9), (16, 32, 8), (1, 48, 40)])
@pytest.mark.parametrize("mode", ["gaussian", "constant"])
def test_weights_are_monais(window: tuple[int, ...], mode: str) -> None:
    expected = compute_importance_map(window, mode=mode, sigma_scale=0.125).numpy()
    assert np.allclose(importance(window, mode, 0.125), expected, rtol=1e-6, atol=0)


@settings(max_examples=60, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 60), st.integers(1, 60)),
    window=st.tuples(st.integers(1, 24), st.integers(1, 24)),
    chunk=st.tuples(st.integers(1, 30), st.integers(1, 30)),
    overlap=OVERLAPS,
    seed=st.integers(0, 2**16),
)
def test_units_sum_to_the_whole_image_blend(
    shape: tuple[int, int], window: tuple[int, int], chunk: tuple[int, int], overlap: float, seed: int
) -> None:
    """Whatever the units, each pixel's blended value is the whole image's, to the last bit: the
    same windows, added in the same order (windows may be larger than the image: padded)."""
    grid = BlendGrid(shape, window, (overlap, overlap))
    rng = np.random.default_rng(seed)
    # one fixed set of logits per window of the grid, as a deterministic model would give
    windows = grid.windows(TileGrid.chunked(shape, shape).unit((0, 0)).core)
    logits = {w.start: rng.normal(size=(2, *window)).astype(np.float32) for w in windows}
    whole = grid.to_padded(TileGrid.chunked(shape, shape).unit((0, 0)).core)
    total, count = np.zeros((2, *whole.shape), np.float32), np.zeros(whole.shape, np.float32)
    for w in windows:
        accumulate(total, count, logits[w.start], w, whole, grid.weight_map)
    expected = total / count
    tiles = TileGrid.chunked(shape, chunk)
    for unit in tiles.units():
        core = grid.to_padded(unit.core)
        part, weight = np.zeros((2, *core.shape), np.float32), np.zeros(core.shape, np.float32)
        for w in grid.windows(unit.core):
            accumulate(part, weight, logits[w.start], w, core, grid.weight_map)
        assert np.array_equal(part / weight, expected[(slice(None), *core.within(whole))])
    assert grid.windows_computed([u.core for u in tiles.units()]) >= grid.n_windows


def instance_unet(dims: int, bands: int, classes: int, seed: int = 3) -> torch.nn.Module:
    """MONAI's U-Net with its default InstanceNorm: not translation-equivariant, the network
    blending is for."""
    torch.manual_seed(seed)
    return UNet(dims, bands, classes, channels=(8, 16, 32), strides=(2, 2), num_res_units=1).eval()


def compare(store_labels: np.ndarray, reference: torch.Tensor) -> int:
    """Labels equal the reference logits' argmax except at its near-ties; returns how many of those differ."""
    logits = reference[0].numpy()
    expected = logits.argmax(0)
    top2 = np.sort(logits, axis=0)[-2:]
    tie = (top2[1] - top2[0]) <= NEAR_TIE
    differ = store_labels != expected
    assert not (differ & ~tie).any(), f"{int((differ & ~tie).sum())} labels differ away from near-ties"
    return int(differ.sum())


@pytest.fixture(scope="module")
def unet2d(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    net = instance_unet(2, 2, 3)
    path = tmp_path_factory.mktemp("blend") / "instance-unet.pt"
    torch.jit.save(torch.jit.script(net), str(path))
    return net, path


def s2_image() -> torch.Tensor:
    """The bundled Sentinel-2 scene's red and NIR bands, normalised as the job normalises them."""
    import rasterio

    with rasterio.open(S2) as src:
        data = src.read([3, 8]).astype(np.float32)
    mean = np.array([66, 340], np.float32)[:, None, None]
    std = np.array([42, 172], np.float32)[:, None, None]
    return torch.from_numpy((data - mean) / std)[None]


@pytest.mark.parametrize(("window", "overlap", "weights", "chunks_per_unit"), [
    (96, 0.25, "gaussian", 1), (64, 0.5, "constant", 2),
])  # fmt: skip
def test_a_blended_run_equals_monai_sliding_window_inference_in_2d(
    unet2d: tuple[torch.nn.Module, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
    window: int, overlap: float, weights: str, chunks_per_unit: int,
) -> None:  # fmt: skip
    net, path = unet2d
    config = write_config(
        tmp_path / "blend.yaml",
        source={"path": str(S2), "bands": [3, 8]},
        model={"kind": "torchscript", "path": str(path), "classes": ["a", "b", "c"], "stride": 4,
               "normalize": {"mean": [66, 340], "std": [42, 172]}},
        tiling={"chunk": 80, "chunks_per_unit": chunks_per_unit, "stitch": "blend", "window": window,
                "overlap": overlap, "weights": weights},
        output={"path": f"{tmp_path}/blend.zarr", "preview": False, "probabilities": True},
        regions={"enabled": False},
        runtime={"engine": "process", "batch_size": 3},
    )  # fmt: skip
    summary = run_json(capsys, str(config))
    assert summary["stitch"] == "blend" and summary["exact"] is False
    assert "sliding-window inference" in summary["equals"] and "not whole-image" in summary["equals"]
    assert summary["windows"]["computed"] > summary["windows"]["grid"] > 1
    store = zarr.open_group(f"{tmp_path}/blend.zarr", mode="r")
    assert store.attrs["raymask"]["model"]["stitch"] == "blend"
    assert store.attrs["raymask"]["grid"]["window"] == [window, window]
    image = s2_image()
    with torch.no_grad():
        reference = sliding_window_inference(image, (window, window), 4, net, overlap=overlap, mode=weights)
    labels = np.asarray(store["mask"][:])
    assert len(np.unique(labels)) == 3
    differ = compare(labels, reference)
    assert differ <= summary["near_ties"] < labels.size // 1000
    # the stored probabilities are the softmax of the same logits, to the uint8 step
    probs = np.asarray(store["probability"][:]).astype(np.float32) / 254
    expected = torch.softmax(reference, 1)[0].numpy()
    assert np.abs(probs - expected).max() <= 0.5 / 254 + 1e-3


def test_blended_logits_are_within_tolerance_of_monai(unet2d: tuple[torch.nn.Module, Path]) -> None:
    """The worker's own blending code (``blend_logits``) over every unit gives MONAI's logits."""
    from workers.unit_worker import blend_logits

    net, _ = unet2d
    image = s2_image()[0].numpy()[:, :150, :170]
    shape = image.shape[1:]
    grid = BlendGrid(shape, (64, 64), (0.25, 0.25))
    units = TileGrid.chunked(shape, (48, 48))
    out = torch.zeros((3, *shape))
    weights = torch.from_numpy(grid.weight_map)

    def forward(images: list[np.ndarray], valid: list[np.ndarray]) -> torch.Tensor:
        with torch.no_grad():
            return net(torch.from_numpy(np.stack(images)))

    for unit in units.units():
        reach = grid.reach(unit.core)
        frame = grid.to_image(reach)
        crop = image[(slice(None), *frame.slices())]
        valid = np.ones(crop.shape[1:], bool)
        out[(slice(None), *unit.core.slices())] = blend_logits(
            forward, crop, valid, reach, grid, unit.core, 3, batch_size=2, weights=weights
        )
    with torch.no_grad():
        reference = sliding_window_inference(
            torch.from_numpy(image)[None], (64, 64), 2, net, overlap=0.25, mode="gaussian"
        )
    assert float((out - reference[0]).abs().max()) <= LOGIT_TOLERANCE


@pytest.mark.parametrize("window", [[8, 16, 16], [16, 24, 24]])  # the second is deeper than the volume: padded
def test_a_blended_run_equals_monai_sliding_window_inference_in_3d(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], window: list[int]
) -> None:
    rng = np.random.default_rng(2)
    volume = rng.normal(0, 200, size=(12, 40, 36)).cumsum(axis=0).round()
    write_series(tmp_path / "series", volume)
    net = instance_unet(3, 1, 3)
    path = tmp_path / "unet3d.pt"
    torch.jit.save(torch.jit.script(net), str(path))
    config = write_config(
        tmp_path / "blend3d.yaml",
        source={"path": str(tmp_path / "series")},
        model={"kind": "torchscript", "path": str(path), "dims": 3, "classes": ["a", "b", "c"], "stride": 4,
               "scale": 0.005},
        tiling={"chunk": [4, 16, 16], "stitch": "blend", "window": window, "overlap": 0.5},
        output={"path": f"{tmp_path}/ct.zarr", "preview": False},
        runtime={"engine": "process"},
    )  # fmt: skip
    summary = run_json(capsys, str(config))
    assert summary["stitch"] == "blend"
    labels = np.asarray(zarr.open_array(f"{tmp_path}/ct.zarr/labels/mask/0", mode="r")[:])
    # the files run head to feet; the store orders slices by position along the normal: feet first
    hu = torch.from_numpy((volume[::-1] * 0.005).astype(np.float32))[None, None]
    with torch.no_grad():
        reference = sliding_window_inference(hu, tuple(window), 2, net, overlap=0.5, mode="gaussian")
    assert len(np.unique(labels)) > 1
    assert compare(labels, reference) <= summary["near_ties"]


def test_the_blend_window_must_suit_the_network(tmp_path: Path) -> None:
    from tests.test_bad_input import assert_one_line_error, raymask

    net = instance_unet(2, 2, 3)
    path = tmp_path / "unet.pt"
    torch.jit.save(torch.jit.script(net), str(path))
    config = write_config(
        tmp_path / "bad.yaml",
        source={"path": str(S2), "bands": [3, 8]},
        model={"kind": "torchscript", "path": str(path), "classes": ["a", "b", "c"], "stride": 4},
        tiling={"chunk": 80, "stitch": "blend", "window": 90},
        output={"path": f"{tmp_path}/bad.zarr"},
    )
    result = raymask("run", str(config))
    assert_one_line_error(result, "tiling.window [90, 90] must be a multiple of the model stride (4)")
    assert not (tmp_path / "bad.zarr").exists()
    ndvi = write_config(
        tmp_path / "ndvi.yaml",
        source={"path": str(S2)},
        model={"kind": "ndvi", "red": 3, "nir": 8},
        tiling={"stitch": "blend"},
        output={"path": f"{tmp_path}/ndvi.zarr"},
    )
    assert_one_line_error(raymask("run", str(ndvi)), "tiling.stitch blend: model.kind ndvi works pixel by pixel")


def test_blending_memory_is_the_units_not_the_images() -> None:
    """A unit's accumulator and reads depend on the unit and the window, never on the image size."""
    small = BlendGrid((4096, 4096), (256, 256), (0.25, 0.25))
    large = BlendGrid((16384, 16384), (256, 256), (0.25, 0.25))
    for grid in (small, large):
        units = TileGrid.chunked(grid.shape, (1024, 1024))
        middle = units.unit((2, 2)).core
        assert grid.reach(middle).shape[0] <= 1024 + 2 * 256
    extra = large.windows_computed([u.core for u in TileGrid.chunked(large.shape, (2048, 2048)).units()])
    assert extra / large.n_windows < 1.3  # windows shared by units: computed twice, a small share with big units
    assert math.prod(large.window) * 4 < 2**20
