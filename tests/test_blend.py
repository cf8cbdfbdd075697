"""Blended stitching (``tiling.stitch: blend``) equals MONAI's sliding-window inference on the whole
image: the window grid and weights are MONAI's (property-tested against MONAI itself), the per-unit
sums add up to the whole-image sum, and through ``raymask run`` an InstanceNorm U-Net's labels equal
``monai.inferers.sliding_window_inference``'s in 2-D and 3-D (except at counted near-ties), with
logits within 1e-4."""

from __future__ import annotations

from collections.abc import Callable
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

from pipeline.core.blend import BlendGrid, accumulate, blend_bands, importance, window_starts
from pipeline.core.geometry import Box, TileGrid
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


def replay(starts: list[tuple[int, ...]], logits: dict) -> Callable[[list, list], list]:
    """A model that gives each window (in the order the windows come) its fixed logits."""
    queue = list(starts)
    return lambda images, valid: [logits[queue.pop(0)] for _ in images]


@settings(max_examples=60, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 60), st.integers(1, 60)),
    window=st.tuples(st.integers(1, 24), st.integers(1, 24)),
    chunk=st.tuples(st.integers(1, 30), st.integers(1, 30)),
    per_unit=st.integers(1, 3),
    overlap=OVERLAPS,
    seed=st.integers(0, 2**16),
)
def test_units_sum_to_the_whole_image_blend(
    shape: tuple[int, int], window: tuple[int, int], chunk: tuple[int, int], per_unit: int, overlap: float, seed: int
) -> None:
    """Whatever the strips and bands, each pixel's blended value is the whole image's, to the last
    bit: the same windows, added in the same order (windows may be larger than the image: padded)."""
    grid = BlendGrid(shape, window, (overlap, overlap))
    rng = np.random.default_rng(seed)
    everything = Box((0, 0), shape)
    # one fixed set of logits per window of the grid, as a deterministic model would give
    logits = {w.start: rng.normal(size=(2, *window)).astype(np.float32) for w in grid.windows(everything)}
    whole = grid.to_padded(everything)
    total, count = np.zeros((2, *whole.shape), np.float32), np.zeros(whole.shape, np.float32)
    for w in grid.windows(everything):
        accumulate(total, count, logits[w.start], w, whole, grid.weight_map)
    expected = total / count
    strips = TileGrid.create(
        shape, chunk=chunk, halo=(0, 0), stride=(1, 1), chunks_per_unit=(-(-shape[0] // chunk[0]), per_unit)
    )
    seen = np.zeros(shape, bool)
    for unit in strips.units():
        rows = [
            (box, wins, np.zeros((1, *box.shape)), np.ones(box.shape, bool))
            for box, wins in grid.window_rows(unit.core)
        ]

        forward = replay([w.start for _, ws in grid.window_rows(unit.core) for w in ws], logits)
        bands = list(blend_bands(rows, forward, grid, unit.core, chunk[0], zeros=lambda s: np.zeros(s, np.float32),
                                 weights=grid.weight_map, n_classes=2, batch_size=2))  # fmt: skip
        assert [b.start[0] for b, _, _ in bands] == list(
            range(grid.to_padded(unit.core).start[0], whole.stop[0], chunk[0])
        )
        for band, value, valid in bands:
            assert valid.all()
            assert np.array_equal(value, expected[(slice(None), *band.within(whole))])
            seen[grid.to_image(band).slices()] = True
    assert seen.all()
    assert grid.windows_computed([u.core for u in strips.units()]) >= grid.n_windows


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
    """The blending the workers run (``blend_bands`` with torch accumulators), strip by strip and
    band by band, gives MONAI's logits."""
    net, _ = unet2d
    image = s2_image()[0].numpy()[:, :150, :170]
    shape = image.shape[1:]
    grid = BlendGrid(shape, (64, 64), (0.25, 0.25))
    strips = TileGrid.create(shape, chunk=(48, 48), halo=(0, 0), stride=(1, 1), chunks_per_unit=(4, 2))
    out = torch.zeros((3, *shape))
    weights = torch.from_numpy(grid.weight_map)

    def forward(images: list[np.ndarray], valid: list[np.ndarray]) -> torch.Tensor:
        with torch.no_grad():
            return net(torch.from_numpy(np.stack(images)))

    for unit in strips.units():
        rows = [(box, wins, image[(slice(None), *box.slices())], np.ones(box.shape, bool))
                for box, wins in grid.window_rows(unit.core)]  # fmt: skip
        for band, logits, _ in blend_bands(rows, forward, grid, unit.core, 48, zeros=torch.zeros, weights=weights,
                                           n_classes=3, batch_size=2):  # fmt: skip
            out[(slice(None), *band.slices())] = logits
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


@pytest.mark.parametrize("height", [300, 3000])
def test_a_blended_unit_holds_a_few_bands_whatever_the_image_height(height: int) -> None:
    """A strip's accumulators at any moment: the bands its current row of windows reaches and the
    one before; the same for a 10 times taller image."""
    grid = BlendGrid((height, 64), (64, 64), (0.25, 0.25))
    core = Box((0, 0), (height, 64))
    live, peak = 0, 0

    def zeros(shape: tuple[int, ...]) -> np.ndarray:
        nonlocal live, peak
        live += len(shape) == 3  # one per band: its (classes, ...) sum
        peak = max(peak, live)
        return np.zeros(shape, np.float32)

    rows = ((box, wins, np.zeros((1, *box.shape)), np.ones(box.shape, bool)) for box, wins in grid.window_rows(core))
    for _ in blend_bands(rows, lambda images, valid: [np.zeros((2, 64, 64))] * len(images), grid, core, 32,
                         zeros=zeros, weights=grid.weight_map, n_classes=2):  # fmt: skip
        live -= 1
    assert peak <= 64 // 32 + 2


@pytest.mark.parametrize("size", [4096, 8192, 16384])
def test_default_strips_keep_the_recomputed_windows_few(size: int) -> None:
    from pipeline.jobs.run import blend_units

    grid = BlendGrid((size, size), (512, 512), (0.25, 0.25))
    per_unit = blend_units((size, size), (512, 512), 1, stated=False)
    strips = TileGrid.create((size, size), chunk=(512, 512), halo=(0, 0), stride=(1, 1), chunks_per_unit=per_unit)
    assert strips.n_units >= 2
    extra = grid.windows_computed([u.core for u in strips.units()]) / grid.n_windows - 1
    assert extra <= (0.25 if size == 4096 else 0.15)


@pytest.mark.usefixtures("ray_session")
def test_blending_on_ray_actors_and_a_resumed_run_write_the_same_bytes(
    unet2d: tuple[torch.nn.Module, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipeline.store import MaskStore
    from tests.conftest import chunk_bytes

    _, path = unet2d
    stores = {}
    for engine in ("process", "ray"):
        config = write_config(
            tmp_path / f"{engine}.yaml",
            source={"path": str(S2), "bands": [3, 8]},
            model={"kind": "torchscript", "path": str(path), "classes": ["a", "b", "c"], "stride": 4,
                   "normalize": {"mean": [66, 340], "std": [42, 172]}},
            tiling={"chunk": 64, "stitch": "blend", "window": 96},
            output={"path": f"{tmp_path}/{engine}.zarr", "preview": False, "probabilities": True},
            runtime={"engine": engine},
        )  # fmt: skip
        summary = run_json(capsys, str(config))
        assert summary["engine"] == engine and summary["units_total"] >= 2
        stores[engine] = (config, tmp_path / f"{engine}.zarr")
    config, store_path = stores["ray"]
    before = chunk_bytes(store_path)
    assert before == chunk_bytes(stores["process"][1])
    # a unit undone (as a run killed before its statistics row landed leaves it): the run resumes it
    store = MaskStore.open(store_path, mode="r+")
    pixels = zarr.open_array(str(store_path / "units" / "pixels"), mode="r+")
    pixels[0, 1] = -1
    store.update_meta(status="incomplete")
    summary = run_json(capsys, str(config))
    assert summary["units_run"] == 1 and summary["units_skipped"] == summary["units_total"] - 1
    assert chunk_bytes(store_path) == before
