"""pipeline.core.png, property-tested against Pillow's decoder: every pixel (and every palette entry
and its transparency) comes back as written, for every shape and colour type the viewer uses."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from pipeline.core.png import encode

shapes = st.tuples(st.integers(1, 70), st.integers(1, 70))


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@settings(max_examples=60)
@given(data=st.data(), shape=shapes, channels=st.sampled_from([0, 2, 3, 4]), photo=st.booleans())
def test_every_pixel_comes_back(data: st.DataObject, shape: tuple[int, int], channels: int, photo: bool) -> None:
    full = shape if channels == 0 else (*shape, channels)
    pixels = data.draw(arrays(np.uint8, full))
    image = decode(encode(pixels, photo=photo))
    assert image.mode == {0: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[channels]
    assert np.array_equal(np.asarray(image), pixels)


@settings(max_examples=40)
@given(data=st.data(), shape=shapes, entries=st.integers(1, 256), alpha=st.booleans())
def test_palette_images_keep_indices_colours_and_transparency(
    data: st.DataObject, shape: tuple[int, int], entries: int, alpha: bool
) -> None:
    palette = data.draw(arrays(np.uint8, (entries, 4 if alpha else 3)))
    indices = data.draw(arrays(np.uint8, shape, elements=st.integers(0, entries - 1)))
    image = decode(encode(indices, palette))
    assert image.mode == "P"
    assert np.array_equal(np.asarray(image), indices)
    colours = np.frombuffer(bytes(image.getpalette() or []), dtype=np.uint8).reshape(-1, 3)
    assert np.array_equal(colours[:entries], palette[:, :3])
    if alpha:
        rgba = np.asarray(image.convert("RGBA"))
        assert np.array_equal(rgba, palette[indices])


def test_smooth_images_and_flat_labels_compress() -> None:
    ramp = np.tile(np.arange(256, dtype=np.uint8), (256, 1))
    assert len(encode(np.dstack([ramp, ramp, ramp]))) < ramp.size // 10  # the Sub filter makes it runs
    assert len(encode(np.dstack([ramp, ramp, ramp]), photo=True)) < ramp.size * 3 // 4  # Huffman alone: ~1 bit a byte
    assert len(encode(np.full((256, 256), 3, np.uint8), np.zeros((4, 4), np.uint8))) < 1000  # one class: runs


@pytest.mark.parametrize(
    "pixels, palette",
    [
        (np.zeros((0, 4), np.uint8), None),
        (np.zeros((4, 4, 5), np.uint8), None),
        (np.zeros((4, 4, 3), np.uint8), np.zeros((4, 3), np.uint8)),
        (np.zeros((4, 4), np.uint8), np.zeros((300, 3), np.uint8)),
    ],
)
def test_what_png_cannot_hold_is_refused(pixels: np.ndarray, palette: np.ndarray | None) -> None:
    with pytest.raises(ValueError):
        encode(pixels, palette)
