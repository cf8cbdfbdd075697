"""The stitching contract: tiled inference equals whole-image inference for an equivariant CNN.

A random-weight U-Net-like TorchScript model (stride 4, receptive radius well under 24 px) runs
on a 203 x 157 image, whose sides are multiples of neither the chunk nor the stride. Labels from
the real pipeline (on Ray actors, and in process) must equal whole-image labels except at float
near-ties (top two logits within 2e-4, which the run counts), and logits stitched from the same read
windows must match within 1e-4, for two chunk sizes. With halo 0 they
must differ, which shows the test can fail.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.core.geometry import inside_image, pad_to_window
from pipeline.jobs.run import prepare
from tests.conftest import GeoTiffFactory, tiny_unet, write_config
from workers.models.network import NetworkModel
from workers.models.prediction import LOGIT_TOLERANCE, NEAR_TIE

ROWS, COLS, STRIDE = 203, 157, 4


@pytest.fixture
def scene(make_geotiff: GeoTiffFactory) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(7)
    smooth = rng.normal(size=(3, ROWS, COLS)).cumsum(axis=1).cumsum(axis=2)
    image = ((smooth - smooth.mean(axis=(1, 2), keepdims=True)) / smooth.std(axis=(1, 2), keepdims=True)).astype(
        np.float32
    )
    return make_geotiff(image), image


def whole_image_logits(model_path: Path, image: np.ndarray) -> np.ndarray:
    """The reference: pad once to a multiple of the stride (edge replicate), run, crop."""
    padded = np.pad(image, ((0, 0), (0, -ROWS % STRIDE), (0, -COLS % STRIDE)), mode="edge")
    module = torch.jit.load(str(model_path)).eval()
    with torch.inference_mode():
        logits = module(torch.from_numpy(padded[None])).numpy()[0]
    return logits[:, :ROWS, :COLS]


def job_config(tmp_path: Path, model: Path, image: Path, *, chunk: int, halo: int, per_unit: int = 1) -> Path:
    return write_config(
        tmp_path / f"job-{chunk}-{halo}.yaml",
        source={"path": str(image)},
        model={"kind": "torchscript", "path": str(model), "classes": ["a", "b", "c"], "stride": STRIDE,
               "receptive_radius": 20},
        tiling={"chunk": chunk, "halo": halo, "chunks_per_unit": per_unit},
        output={"path": f"{tmp_path}/tiled-{chunk}-{halo}.zarr", "preview": False},
    )  # fmt: skip


def stitched_logits(config: Path) -> np.ndarray:
    """Logits assembled from each work unit's read window, cropped to its core (no Ray)."""
    job = prepare(load_config(config))
    model = NetworkModel(job.config.model)  # type: ignore[arg-type]
    out = np.full((3, ROWS, COLS), np.nan, dtype=np.float32)
    for unit in job.grid.units():
        data, valid = job.source.read(inside_image(unit.read, job.grid.shape))
        image = pad_to_window(data, unit.read, job.grid.shape, edge="replicate")
        mask = pad_to_window(valid, unit.read, job.grid.shape, edge="replicate")
        logits = model.logits(image[None], mask[None])[0]
        out[(slice(None), *unit.core.slices())] = logits[(slice(None), *unit.core.within(unit.read))]
    return out


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize(
    ("chunk", "per_unit", "engine"),
    [(32, 1, "ray"), (64, 1, "process"), pytest.param(32, 3, "ray", marks=pytest.mark.slow)],
)
def test_tiled_equals_whole_image(
    chunk: int,
    per_unit: int,
    engine: str,
    scene: tuple[Path, np.ndarray],
    scripted_unet,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path, image = scene
    model = scripted_unet(3, 3)
    reference = whole_image_logits(model, image)
    config = job_config(tmp_path, model, path, chunk=chunk, halo=24, per_unit=per_unit)
    assert main(["run", str(config), "--json", "--set", f"runtime.engine={engine}"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["exact"] is True and summary["units_total"] > 4 and summary["engine"] == engine
    assert summary["chunks"] == -(-ROWS // chunk) * -(-COLS // chunk)
    assert summary["equals"].startswith("whole-image inference (labels identical except at float near-ties")
    labels = zarr.open_array(f"{tmp_path}/tiled-{chunk}-24.zarr/mask")[:]
    stitched = stitched_logits(config)
    np.testing.assert_allclose(stitched, reference, atol=LOGIT_TOLERANCE, rtol=0)
    # labels identical except at float near-ties, and the near-ties are counted, not hidden
    differ = labels != reference.argmax(axis=0)
    assert not (differ & ~near_ties(reference)).any()
    assert int(differ.sum()) <= summary["near_ties"]
    counted = int(near_ties(stitched).sum())  # the run's count, from the same windows' logits
    assert abs(summary["near_ties"] - counted) <= max(2, counted // 50)


def near_ties(logits: np.ndarray) -> np.ndarray:
    """Pixels whose two highest logits are within NEAR_TIE: the only labels float rounding may flip."""
    top2 = np.sort(logits, axis=0)[-2:]
    return (top2[1] - top2[0]) <= NEAR_TIE


@pytest.mark.usefixtures("ray_session")
def test_without_a_halo_tiles_show_seams(
    scene: tuple[Path, np.ndarray], scripted_unet, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, image = scene
    model = scripted_unet(3, 3)
    reference = whole_image_logits(model, image)
    config = job_config(tmp_path, model, path, chunk=32, halo=0)
    assert main(["run", str(config), "--json", "--set", "runtime.engine=process"]) == 0  # the maths, not the engine
    summary = json.loads(capsys.readouterr().out)
    assert summary["exact"] is False and any("not exact" in n for n in summary["notes"])
    labels = zarr.open_array(f"{tmp_path}/tiled-32-0.zarr/mask")[:]
    shares = np.bincount(reference.argmax(axis=0).ravel(), minlength=3) / reference[0].size
    assert (shares > 0.05).sum() >= 2, f"the reference labels are too uniform to show seams: {shares}"
    assert (labels != reference.argmax(axis=0)).sum() > 0
    assert np.abs(stitched_logits(config) - reference).max() > 1e-2


def test_the_test_model_is_not_trivially_constant() -> None:
    model = tiny_unet(3, 3)
    with torch.inference_mode():
        out = model(torch.randn(1, 3, 64, 64)).argmax(1)
    assert len(torch.unique(out)) > 1
