"""Plain image frames (JPEG, PNG) run as 2-D images without georeference; the demo polyp model."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import yaml
import zarr
from PIL import Image
from rasterio.errors import NotGeoreferencedWarning

from tests.conftest import DATA, ROOT
from tests.conftest import run_json as run

pytestmark = pytest.mark.usefixtures("ray_session")
FRAME = DATA / "polyp" / "images" / "cju0qoxqj9q6s0835b43399p4.jpg"
TRUTH = DATA / "polyp" / "masks" / "cju0qoxqj9q6s0835b43399p4.jpg"


def gdal_pixels(path: Path) -> np.ndarray:
    """``(3, H, W)`` uint8 as GDAL decodes the file (libjpeg builds differ by one level here and there)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path) as src:
            return src.read()


def test_a_jpeg_frame_is_a_plain_image(shipped_store) -> None:
    path, summary = shipped_store("polyp-frames.yaml")
    assert summary["exact"] is True
    assert "area_m2" not in summary["classes"]["polyp"]
    assert any("no CRS" in note for note in summary["notes"])
    store = zarr.open_group(path, mode="r")
    assert store.attrs["raymask"]["crs"] is None and "spatial_ref" not in store
    labels = store["mask"][:]
    # The whole frame through the network at once gives the same labels (exact tiling).
    image = gdal_pixels(FRAME).astype(np.float32)  # the pixels raymask reads (GDAL's JPEG decoder)
    card = yaml.safe_load((ROOT / "models" / "polyp" / "MODEL.yaml").read_text())
    mean, std = card["normalize"]["mean"], card["normalize"]["std"]
    x = ((image.transpose(1, 2, 0) - mean) / std).astype(np.float32).transpose(2, 0, 1)
    h, w = x.shape[1:]
    x = np.pad(x, ((0, 0), (0, -h % 4), (0, -w % 4)), mode="edge")
    net = torch.jit.load(str(ROOT / "models" / "polyp" / "model.pt")).eval()
    with torch.inference_mode():
        whole = net(torch.from_numpy(x[None]))[0].max(0).indices.numpy()[:h, :w]
    np.testing.assert_array_equal(labels, whole)
    assert summary["classes"]["polyp"]["pixels"] == int((whole == 1).sum())


def test_the_demo_model_finds_the_held_out_polyp(shipped_store) -> None:
    path, _ = shipped_store("polyp-frames.yaml")
    predicted = zarr.open_array(path / "mask", mode="r")[:] == 1
    truth = np.asarray(Image.open(TRUTH).convert("L")) > 127
    dice = 2 * (predicted & truth).sum() / (predicted.sum() + truth.sum())
    assert dice > 0.55, f"holdout Dice {dice:.3f}"  # 0.647 (raymask train configs/train-polyp.yaml)


@pytest.mark.slow  # end to end, several seconds: `make test` runs it, `make check` does not
def test_png_and_jpeg_of_the_same_pixels_give_the_same_mask(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, shipped_store
) -> None:
    png = tmp_path / "frame.png"
    Image.fromarray(gdal_pixels(FRAME).transpose(1, 2, 0)).save(png)  # lossless copy of the decoded pixels
    monkeypatch.chdir(ROOT)
    base = ["configs/polyp-frames.yaml", "--set", "output.preview=false"]
    run(capsys, *base, "--set", f"source.path={png}", "--set", f"output.path={tmp_path}/png.zarr")
    jpeg, _ = shipped_store("polyp-frames.yaml")
    np.testing.assert_array_equal(
        zarr.open_array(jpeg / "mask", mode="r")[:],
        zarr.open_array(f"{tmp_path}/png.zarr/mask", mode="r")[:],
    )
