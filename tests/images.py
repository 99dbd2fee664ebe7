"""Test images: synthetic photos, their encodings, and the bad-image corpus of the server, client and export tests.

Every builder takes sizes in the same order as PIL and the PNG header: ``width`` first, then ``height``.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def photo(height: int = 48, width: int = 72, seed: int = 0, noise: float = 20.0) -> np.ndarray:
    """A ``(height, width, 3)`` uint8 gradient with Gaussian noise: photo-like, different for every seed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / width, yy * 255 / height, (xx + yy) * 127 / (height + width)], -1)
    return np.clip(base + rng.normal(0, noise, (height, width, 3)), 0, 255).astype(np.uint8)


def encode(image: np.ndarray | Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    """``image`` (an array or a PIL image) encoded as ``fmt`` by PIL."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A real 8x8 PNG whose IHDR (CRC fixed up) claims ``width x height``: a header check sees a huge image,
    a decoder finds far too little pixel data."""
    data = bytearray(encode(photo(8, 8), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def jpeg_claiming(width: int, height: int) -> bytes:
    """A real 16x16 baseline JPEG whose SOF0 frame header is rewritten to claim ``width x height``."""
    data = bytearray(encode(photo(16, 16), "JPEG", quality=90))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)  # SOF0 stores the height first
    return bytes(data)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png16_rgb(pixels: np.ndarray) -> bytes:
    """A 16-bit RGB PNG of ``pixels`` ((height, width, 3) uint16), written by hand: PIL cannot write one."""
    height, width, _ = pixels.shape
    rows = np.ascontiguousarray(pixels.astype(">u2")).reshape(height, width * 3)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)  # filter type 0 on every row
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    chunks = _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(raw)) + _png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def animated_gif(size: int = 40, frames: int = 3) -> bytes:
    images = [Image.fromarray(photo(size, size, seed=s)).convert("P") for s in range(frames)]
    return encode(images[0], "GIF", save_all=True, append_images=images[1:], duration=50, loop=0)


def image_corpus() -> dict[str, tuple[bytes, bool]]:
    """Name -> (encoded bytes, decodable). Decodable inputs must embed like any image; the others must be
    refused with a clear error (INVALID_ARGUMENT over gRPC, HTTP 400 over REST)."""
    good_jpeg = encode(photo(), "JPEG", quality=92)
    return {
        "empty bytes": (b"", False),
        "text": (b"this is not an image, just some text\n", False),
        "truncated jpeg": (good_jpeg[: len(good_jpeg) // 2], False),
        "png header claims 30000x30000": (png_claiming(30000, 30000), False),
        "jpeg header claims 30000x30000": (jpeg_claiming(30000, 30000), False),
        "cmyk jpeg": (encode(Image.fromarray(photo(seed=2)).convert("CMYK"), "JPEG"), True),
        "16-bit rgb png": (png16_rgb(photo(seed=3).astype(np.uint16) * 257), True),
        "grayscale png": (encode(Image.fromarray(photo(seed=4)).convert("L"), "PNG"), True),
        "grayscale jpeg": (encode(Image.fromarray(photo(seed=5)).convert("L"), "JPEG"), True),
        "rgba png": (encode(Image.fromarray(photo(seed=6)).convert("RGBA"), "PNG"), True),
        "animated gif": (animated_gif(), True),
        "1x1 png": (encode(photo(1, 1, seed=7), "PNG"), True),
        "bmp": (encode(photo(seed=8), "BMP"), True),
    }
