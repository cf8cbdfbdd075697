"""`raymask train` on rasters larger than `in_memory_pixels` (issue 16): patches and validation tiles
are read window by window through raymask's reader (nodata masks included), and training is the same
as with the files held whole: the same seed gives the same patches, so the same losses, and the tiled
validation counts the same pixels. Balanced patches drawn block by block find a rare class.

The rasters are the bundled RGB.byte.tif (with its nodata collar) at twice its resolution (nearest),
1436 x 1582 pixels: 3 x 4 blocks of 512 and 2 x 2 validation tiles; the labels are bright pixels.
"""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml

from pipeline.cli import main

ROOT = Path(__file__).resolve().parent.parent
RGB = ROOT / "data" / "rgb" / "RGB.byte.tif"


def cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with redirect_stdout(out):
        code = main(list(argv))
    return code, out.getvalue()


@pytest.fixture(scope="module")
def large_pairs(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, str]]:
    folder = tmp_path_factory.mktemp("large")
    with rasterio.open(RGB) as src:
        image = src.read().repeat(2, axis=1).repeat(2, axis=2)
        profile = src.profile | {"height": image.shape[1], "width": image.shape[2],
                                 "transform": src.transform * rasterio.Affine.scale(0.5)}  # fmt: skip
    pairs = []
    for name, pixels in (("a", image), ("b", image[:, :, ::-1])):
        labels = (pixels.mean(0) > 120).astype(np.uint8)  # about 11 % of the pixels
        labels[pixels.max(0) == 0] = 0  # the collar: nodata in the image, so ignored whatever it says
        with rasterio.open(folder / f"{name}.tif", "w", **profile) as dst:
            dst.write(np.ascontiguousarray(pixels))
        with rasterio.open(folder / f"{name}-labels.tif", "w", **(profile | {"count": 1, "nodata": None})) as dst:
            dst.write(labels[None])
        pairs.append({"image": str(folder / f"{name}.tif"), "labels": str(folder / f"{name}-labels.tif")})
    return pairs


def test_windowed_training_equals_training_on_whole_files(ray_session, large_pairs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    reports = []
    for held, limit in (("whole", 4096 * 4096), ("windows", 0)):
        config = tmp_path / f"{held}.yaml"
        config.write_text(yaml.safe_dump({
            "pairs": large_pairs, "classes": ["dark", "bright"], "network": {"channels": [4, 8]}, "patch": 64,
            "batch": 2, "epochs": 1, "steps": 3, "validation": {"files": ["b.tif"]}, "workers": 1,
            "in_memory_pixels": limit, "output": str(tmp_path / held),
        }))  # fmt: skip
        code, out = cli("train", str(config), "--json", "--no-progress")
        assert code == 0, out
        reports.append(json.loads(out))
    whole, windows = reports
    for key in ("mean", "std"):  # block sums = whole sums
        assert windows["normalize"][key] == pytest.approx(whole["normalize"][key], rel=1e-9)
    assert windows["history"][0]["loss"] == pytest.approx(whole["history"][0]["loss"], rel=1e-5)  # same patches
    a, b = np.array(whole["classes"]["confusion"]), np.array(windows["classes"]["confusion"])
    with rasterio.open(large_pairs[1]["image"]) as src:
        valid = int((src.read_masks() > 0).all(0).sum())
    assert a.sum() == b.sum() == valid  # every pixel with data in every band, once; the collar ignored
    assert np.abs(a - b).sum() <= 8  # tiles with 64 px of context = the whole image, near-ties aside


def test_balanced_windowed_patches_find_the_rare_class(large_pairs) -> None:  # type: ignore[no-untyped-def]
    from pipeline.config import TrainConfig
    from pipeline.jobs.train import BLOCK, Pair, RasterPair, Scan, WindowedSample

    config = TrainConfig.model_validate({"pairs": large_pairs, "classes": ["dark", "bright"], "output": "x"})
    raster = RasterPair(Pair(large_pairs[0]["image"], large_pairs[0]["labels"], "a.tif"), config)
    scan = Scan(2)
    counts = [scan.add(*raster.read(box), training=True) for box in raster.blocks(BLOCK)]
    assert len(counts) == 3 * 4
    _, whole = raster.read(raster.blocks(10**6)[0])
    assert np.sum(counts, 0).tolist() == np.bincount(whole[whole != 255].ravel(), minlength=2).tolist()
    share = float((whole == 1).sum() / (whole != 255).sum())
    sample = WindowedSample(raster, counts, {"mean": [0.0] * 3, "std": [1.0] * 3})
    rng = np.random.default_rng(0)
    drawn = [sample.patch((64, 64), 4, rng, True, 2)[1] for _ in range(60)]
    assert all(x.shape == (64, 64) for x in drawn)
    bright = np.mean([float((y == 1).sum() / max(1, (y != 255).sum())) for y in drawn])
    assert share < 0.15 and bright > 2 * share, (share, bright)  # patches pulled toward the rare class
