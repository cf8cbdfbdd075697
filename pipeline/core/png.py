"""PNG encoding for the viewer's tiles and slices, about four times faster than Pillow's at equal size.

Pillow tries every PNG row filter on every row and then deflates; a tile is drawn once and thrown
away, so that search is most of its cost. Here each row uses the *Sub* filter (each byte minus the one
a pixel to its left: smooth imagery and flat label areas become runs of zeros), computed for the whole
image in one numpy subtraction, and deflate at level 1 compresses it: run-length matching for labels
(whole tiles of one class shrink to a few bytes), Huffman coding alone for imagery (as small, faster).
zlib-ng's deflate is used where installed (twice zlib's speed, the same format). The output is a plain
8-bit PNG any decoder reads: grey, grey+alpha, RGB, RGBA, or palette with per-entry transparency.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

try:
    from zlib_ng import zlib_ng as deflate
except ImportError:  # pragma: no cover - zlib-ng is a dependency; plain zlib writes the same format
    deflate = zlib  # type: ignore[assignment,misc]

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOUR_TYPE = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG colour type (grey, grey+alpha, RGB, RGBA)
_PALETTE = 3


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(tag)))


def _sub_filtered(pixels: np.ndarray, channels: int) -> bytes:
    """The image's rows, each prefixed by filter type 1 (Sub) and holding byte minus left neighbour."""
    rows, width = pixels.shape[0], pixels.shape[1] * channels
    flat = pixels.reshape(rows, width)
    out = np.empty((rows, width + 1), dtype=np.uint8)
    out[:, 0] = 1
    out[:, 1 : 1 + channels] = flat[:, :channels]
    np.subtract(flat[:, channels:], flat[:, :-channels], out=out[:, 1 + channels :])  # wraps modulo 256
    return out.tobytes()


def encode(pixels: np.ndarray, palette: np.ndarray | None = None, *, photo: bool = False) -> bytes:
    """``pixels`` as PNG bytes: (rows, cols) uint8 grey, or (rows, cols, 2|3|4) grey+alpha, RGB or RGBA;
    with ``palette`` ((n <= 256, 3) RGB or (n, 4) RGBA), ``pixels`` are indices into it and the alpha
    column, when given, becomes the transparency of each entry. ``photo``: imagery rather than labels
    (Huffman coding only: faster, and as small once filtered)."""
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    if pixels.ndim not in (2, 3) or pixels.shape[0] < 1 or pixels.shape[1] < 1:
        raise ValueError(f"cannot encode an array of shape {pixels.shape} as PNG")
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    if palette is not None:
        if channels != 1:
            raise ValueError("a palette image has one index per pixel")
        table = np.asarray(palette, dtype=np.uint8)
        if table.ndim != 2 or table.shape[1] not in (3, 4) or not 1 <= len(table) <= 256:
            raise ValueError(f"a palette is (n <= 256, 3 or 4) entries, not {table.shape}")
        colour = _PALETTE
    elif channels in _COLOUR_TYPE:
        colour = _COLOUR_TYPE[channels]
    else:
        raise ValueError(f"cannot encode {channels} channels as PNG")
    rows, cols = pixels.shape[:2]
    header = struct.pack(">IIBBBBB", cols, rows, 8, colour, 0, 0, 0)
    strategy = zlib.Z_HUFFMAN_ONLY if photo else zlib.Z_RLE
    compressor = deflate.compressobj(1, zlib.DEFLATED, 15, 9, strategy)
    data = compressor.compress(_sub_filtered(pixels, channels)) + compressor.flush()
    parts = [_SIGNATURE, _chunk(b"IHDR", header)]
    if palette is not None:
        parts.append(_chunk(b"PLTE", table[:, :3].tobytes()))
        if table.shape[1] == 4:
            parts.append(_chunk(b"tRNS", table[:, 3].tobytes()))
    parts += [_chunk(b"IDAT", data), _chunk(b"IEND", b"")]
    return b"".join(parts)
