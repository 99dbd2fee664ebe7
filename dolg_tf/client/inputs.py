"""Turning the images a user hands to the client into checked, encoded bytes.

Every input becomes the encoded bytes that ``serving_default`` takes:

* a path (``str`` / ``os.PathLike``): the file's bytes, unchanged;
* ``bytes`` / ``bytearray`` / ``memoryview``: taken as an encoded image, unchanged;
* a numpy ``uint8`` array ``(H, W)``, ``(H, W, 1)`` or ``(H, W, 3)``, or a PIL
  image: encoded as PNG. PNG is lossless, so the server decodes exactly these
  pixels (``embed_pixels`` on the same array gives the same embedding), images of
  different sizes share one request, and the request is usually smaller than raw
  pixels would be.

Checks made before anything is sent (each failure is an
:class:`~dolg_tf.errors.InvalidImageError` naming the item's index): the file
exists and is a regular file; the bytes start like a JPEG, PNG, GIF, BMP or WebP (the
formats the export decodes); Pillow can read the header and the size is within
both Pillow's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``) and the
server's pixel limit; ``Image.verify()`` finds no corruption; the encoded size is
within the server's byte limit.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from dolg_tf.config import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS
from dolg_tf.errors import InvalidImageError

# DEFAULT_MAX_IMAGE_*: the export's defaults (one definition in dolg_tf.config, which
# imports nothing heavy). The server enforces its own values; these only let the client
# refuse an image before sending it.

# Magic numbers of the formats the export's graph decodes (as its header check reads them).
_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG", "PNG"),
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
)

ImageInput = str | os.PathLike | bytes | bytearray | memoryview | np.ndarray | Image.Image


@dataclass(frozen=True)
class Limits:
    """Bounds a single image must respect (the server's, when known).

    Attributes:
        max_image_bytes: largest encoded image.
        max_image_pixels: largest height x width.
    """

    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS


def sniff_format(data: bytes) -> str | None:
    """The image format named by ``data``'s magic number (JPEG, PNG, GIF, BMP, WebP), or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for magic, name in _MAGIC:
        if data[: len(magic)] == magic:
            return name
    return None


def check_encoded(data: bytes, index: int, limits: Limits) -> None:
    """Checks that ``data`` is an encoded image the server will accept.

    Raises:
        InvalidImageError: empty, too large, not JPEG/PNG/GIF/BMP/WebP, unreadable or
            corrupt header, or more pixels than allowed.
    """
    if not data:
        raise InvalidImageError("empty image bytes", index)
    if len(data) > limits.max_image_bytes:
        raise InvalidImageError(
            f"{len(data)} encoded bytes, over the server's limit of {limits.max_image_bytes}", index
        )
    fmt = sniff_format(data)
    if fmt is None:
        raise InvalidImageError(f"not a JPEG, PNG, GIF, BMP or WebP image (first bytes {bytes(data[:8])!r})", index)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size check below decides
            image = Image.open(io.BytesIO(data), formats=[fmt])
        with image:
            width, height = image.size
            _check_pixels(width, height, index, limits)
            image.verify()  # structural check (PNG chunk CRCs, truncated headers) without decoding
    except Image.DecompressionBombError as err:
        raise InvalidImageError(f"decompression bomb refused by Pillow: {err}", index) from err
    except InvalidImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as err:
        raise InvalidImageError(f"corrupt or unreadable {fmt} image: {err}", index) from err


def _check_pixels(width: int, height: int, index: int, limits: Limits) -> None:
    if width < 1 or height < 1:
        raise InvalidImageError(f"empty image size {width}x{height}", index)
    pixels = width * height
    if pixels > limits.max_image_pixels:
        raise InvalidImageError(
            f"{width}x{height} = {pixels} pixels, over the server's limit of {limits.max_image_pixels}", index
        )
    bomb = Image.MAX_IMAGE_PIXELS
    if bomb is not None and pixels > bomb:
        raise InvalidImageError(
            f"{width}x{height} = {pixels} pixels, over Pillow's decompression-bomb limit of {bomb}", index
        )


def encode_png(pixels: np.ndarray) -> bytes:
    """Lossless PNG bytes of a uint8 ``(H, W)`` or ``(H, W, 3)`` array.

    ``compress_level=1``: the cheapest zlib level; the bytes stay exact at any level.
    """
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _array_pixels(array: np.ndarray, index: int, limits: Limits) -> np.ndarray:
    if array.dtype != np.uint8:
        raise InvalidImageError(
            f"numpy images must be uint8 RGB or grayscale in [0, 255], got dtype {array.dtype}"
            " (convert with np.clip(x, 0, 255).astype(np.uint8))",
            index,
        )
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] == 3)):
        raise InvalidImageError(
            f"numpy images must have shape (H, W), (H, W, 1) or (H, W, 3), got {array.shape}", index
        )
    _check_pixels(array.shape[1], array.shape[0], index, limits)
    return array


def _check_pil(image: Image.Image, index: int, limits: Limits) -> None:
    width, height = image.size
    _check_pixels(width, height, index, limits)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # No single right way to map 16-bit or float values to 8 bits; the caller knows their data.
        raise InvalidImageError(f"PIL image mode {image.mode!r} is not 8-bit; convert it to 'RGB' or 'L' first", index)


def _pil_pixels(image: Image.Image, index: int, limits: Limits) -> np.ndarray:
    _check_pil(image, index, limits)
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")  # palette, RGBA (alpha dropped, as the server's decoder does), CMYK, 1-bit...
    try:
        return np.asarray(image)
    except (OSError, ValueError, SyntaxError) as err:  # a lazily opened file that fails to decode
        raise InvalidImageError(f"cannot read the PIL image's pixels: {err}", index) from err


def _stat_file(name: str, index: int, limits: Limits) -> None:
    try:
        st = os.stat(name)
    except FileNotFoundError as err:
        raise InvalidImageError(f"no such file: {name!r}", index) from err
    except OSError as err:
        raise InvalidImageError(f"cannot access {name!r}: {err.strerror or err}", index) from err
    if not os.path.isfile(name):
        raise InvalidImageError(f"{name!r} is not a regular file", index)
    if st.st_size > limits.max_image_bytes:
        raise InvalidImageError(
            f"{name!r} has {st.st_size} bytes, over the server's limit of {limits.max_image_bytes}", index
        )


def _read_file(path: str | os.PathLike, index: int, limits: Limits) -> bytes:
    name = os.fspath(path)
    _stat_file(name, index, limits)
    try:
        with open(name, "rb") as f:
            return f.read(limits.max_image_bytes + 1)  # bounded even if the file grows meanwhile
    except OSError as err:
        raise InvalidImageError(f"cannot read {name!r}: {err.strerror or err}", index) from err


def _unsupported(item: Any, index: int) -> InvalidImageError:
    return InvalidImageError(
        f"unsupported input type {type(item).__name__}; expected a path, encoded bytes,"
        " a uint8 numpy array or a PIL image",
        index,
    )


def precheck(item: Any, index: int, limits: Limits = Limits()) -> None:
    """The cheap checks of :func:`prepare` (type, file exists, sizes, dtype, shape), reading no image data.

    Run over a whole list before sending anything, so that a typo in the last
    path fails the call before the server does any work.

    Raises:
        InvalidImageError: as :func:`prepare`.
    """
    if isinstance(item, (str, os.PathLike)):
        _stat_file(os.fspath(item), index, limits)
    elif isinstance(item, (bytes, bytearray, memoryview)):
        if not len(item):
            raise InvalidImageError("empty image bytes", index)
        if len(item) > limits.max_image_bytes:
            raise InvalidImageError(
                f"{len(item)} encoded bytes, over the server's limit of {limits.max_image_bytes}", index
            )
    elif isinstance(item, np.ndarray):
        _array_pixels(item, index, limits)
    elif isinstance(item, Image.Image):
        _check_pil(item, index, limits)
    else:
        raise _unsupported(item, index)


def prepare(item: Any, index: int, limits: Limits = Limits()) -> bytes:
    """Checks one input image and returns the encoded bytes to send.

    Args:
        item: a path, encoded bytes, a uint8 numpy array or a PIL image.
        index: the item's position in the caller's list (named in errors).
        limits: the server's per-image bounds.

    Returns:
        Encoded image bytes (file bytes as they are; arrays and PIL images as PNG).

    Raises:
        InvalidImageError: the item is unusable; the message says why.
    """
    if isinstance(item, (str, os.PathLike)):
        data = _read_file(item, index, limits)
        where = f"{os.fspath(item)!r}: "
    elif isinstance(item, (bytes, bytearray, memoryview)):
        data, where = bytes(item), ""
    elif isinstance(item, np.ndarray):
        data, where = encode_png(np.ascontiguousarray(_array_pixels(item, index, limits))), "PNG of the array: "
    elif isinstance(item, Image.Image):
        data, where = encode_png(_pil_pixels(item, index, limits)), "PNG of the PIL image: "
    else:
        raise _unsupported(item, index)
    try:
        check_encoded(data, index, limits)
    except InvalidImageError as err:
        if not where:
            raise
        raise InvalidImageError(where + err.reason, index) from err
    return data


def as_item_list(images: Any) -> tuple[list[Any] | Any, bool]:
    """Normalises ``embed``'s argument: (iterable of items, whether it was one single image).

    A single path, bytes object, PIL image or 2-D / 3-D array is one image; a 4-D
    array is a batch of images; anything else iterable is a list of images.
    """
    if isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview, Image.Image)):
        return [images], True
    if isinstance(images, np.ndarray):
        if images.ndim in (2, 3):
            return [images], True
        if images.ndim == 4:
            return list(images), False
        raise InvalidImageError(f"a numpy batch must be (N, H, W, 3) or one (H, W[, C]) image, got {images.shape}")
    try:
        iter(images)
    except TypeError as err:
        raise InvalidImageError(
            f"images must be an image or an iterable of images, got {type(images).__name__}"
        ) from err
    return images, False
