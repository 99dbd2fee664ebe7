"""Graph-mode image checks, bounded decoding and stateless augmentation.

Everything here is a pure function of its inputs: the random ops are
``tf.random.stateless_*`` / ``tf.image.stateless_*`` driven by an explicit
per-element seed, so an element's pixels depend only on (seed, position).
"""

from __future__ import annotations

import tensorflow as tf

from dolg_tf.data.config import DataConfig

# Why an element was dropped. OK elements are kept; the others are counted by SkipCounter.
OK, EMPTY, NOT_AN_IMAGE, TOO_MANY_BYTES, TOO_MANY_PIXELS, UNREADABLE = range(6)
SKIP_REASONS: dict[int, str] = {
    EMPTY: "empty file",
    NOT_AN_IMAGE: "not a JPEG/PNG/GIF/BMP/WebP image",
    TOO_MANY_BYTES: "encoded size over max_image_bytes",
    TOO_MANY_PIXELS: "header announces more than max_image_pixels",
    UNREADABLE: "read or decode error (missing, truncated or corrupt)",
}

_HEADER = 32
_UNKNOWN, _JPEG, _PNG, _GIF, _BMP, _WEBP = range(6)


def _header(data: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """The first 32 bytes, zero-padded (so short files index safely), as a string and as int64s."""
    head = tf.strings.substr(tf.strings.join([tf.strings.substr(data, 0, _HEADER), "\0" * _HEADER]), 0, _HEADER)
    return head, tf.cast(tf.io.decode_raw(head, tf.uint8), tf.int64)


def _le(b: tf.Tensor, start: int, size: int) -> tf.Tensor:
    return tf.add_n([b[start + i] * (256**i) for i in range(size)])


def _be(b: tf.Tensor, start: int, size: int) -> tf.Tensor:
    return tf.add_n([b[start + i] * (256 ** (size - 1 - i)) for i in range(size)])


def _webp_dims(head: tf.Tensor, b: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    chunk = tf.strings.substr(head, 12, 4)
    lossless = _le(b, 21, 4)
    return tf.case(
        [
            (tf.equal(chunk, "VP8X"), lambda: (_le(b, 27, 3) + 1, _le(b, 24, 3) + 1)),
            (tf.equal(chunk, "VP8L"), lambda: ((lossless // 16384) % 16384 + 1, lossless % 16384 + 1)),
        ],
        default=lambda: (_le(b, 28, 2) % 16384, _le(b, 26, 2) % 16384),  # "VP8 " (lossy)
        exclusive=True,
    )


def _image_format(head: tf.Tensor) -> tf.Tensor:
    sub = tf.strings.substr
    fmt = tf.constant(_UNKNOWN, tf.int32)
    for code, test in (
        (_JPEG, tf.equal(sub(head, 0, 3), b"\xff\xd8\xff")),
        (_PNG, tf.equal(sub(head, 0, 8), b"\x89PNG\r\n\x1a\n")),
        (_GIF, tf.equal(sub(head, 0, 4), b"GIF8")),
        (_BMP, tf.equal(sub(head, 0, 2), b"BM")),
        (_WEBP, tf.logical_and(tf.equal(sub(head, 0, 4), b"RIFF"), tf.equal(sub(head, 8, 4), b"WEBP"))),
    ):
        fmt = tf.where(test, code, fmt)
    return fmt


def encoded_dims(data: tf.Tensor, head: tf.Tensor, b: tf.Tensor, fmt: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(height, width) read from the file header, without decoding the pixels."""

    def jpeg():
        shape = tf.io.extract_jpeg_shape(data, output_type=tf.int64)
        return shape[0], shape[1]

    def bmp():
        height = _le(b, 22, 4)
        height = tf.where(height >= 2**31, 2**32 - height, height)  # negative height: top-down rows
        return height, _le(b, 18, 4)

    return tf.switch_case(
        fmt,
        [
            lambda: (tf.constant(0, tf.int64), tf.constant(0, tf.int64)),
            jpeg,
            lambda: (_be(b, 20, 4), _be(b, 16, 4)),
            lambda: (_le(b, 8, 2), _le(b, 6, 2)),
            bmp,
            lambda: _webp_dims(head, b),
        ],
    )


def check_and_decode(data: tf.Tensor, max_bytes: int, max_pixels: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Decodes one encoded image if it passes the cheap checks.

    The size and pixel-count checks run on the header, so a decompression bomb
    is rejected without being decoded. A file that passes them but is
    truncated or corrupt makes the decoder raise; the pipeline drops that
    element with ``ignore_errors`` and counts it as UNREADABLE.

    Returns:
        ``(status, image)``: an int32 status code (``OK`` or a skip reason) and
        a uint8 ``(H, W, 3)`` image (a 1x1 placeholder when status is not OK).
    """
    size = tf.strings.length(data)
    head, b = _header(data)
    fmt = _image_format(head)
    status = tf.where(
        tf.equal(size, 0),
        EMPTY,
        tf.where(size > max_bytes, TOO_MANY_BYTES, tf.where(tf.equal(fmt, _UNKNOWN), NOT_AN_IMAGE, OK)),
    )

    def pixel_status():
        height, width = encoded_dims(data, head, b, fmt)
        ok = tf.logical_and(tf.logical_and(height > 0, width > 0), height * width <= max_pixels)
        return tf.where(ok, OK, TOO_MANY_PIXELS)

    status = tf.cond(tf.equal(status, OK), pixel_status, lambda: status)

    def decode():
        image = tf.io.decode_image(data, channels=3, expand_animations=False, dtype=tf.uint8)
        image.set_shape([None, None, 3])
        return image

    image = tf.cond(tf.equal(status, OK), decode, lambda: tf.zeros([1, 1, 3], tf.uint8))
    return tf.cast(status, tf.int32), image


def element_seeds(seed: int, position: tf.Tensor, count: int) -> tf.Tensor:
    """``count`` independent stateless seeds (shape ``(count, 2)``) for the element at ``position``."""
    base = tf.stack([tf.constant(seed, tf.int64), tf.cast(position, tf.int64)])
    return tf.random.experimental.stateless_split(base, count)


def crop_resize(image: tf.Tensor, size: int, min_area: float, seeds: tf.Tensor | None) -> tf.Tensor:
    """Aspect-preserving crop (square in pixels) resized to ``(size, size)``; float32 in [0, 255].

    With ``seeds`` (shape ``(3, 2)``) the crop covers a random fraction of the image area in
    ``[min_area, 1]`` (capped by the largest square) at a random place; without, it is the
    centred largest square.
    """
    shape = tf.shape(image, out_type=tf.int64)
    height, width = shape[0], shape[1]
    short = tf.minimum(height, width)
    if seeds is None:
        side = short
        top, left = (height - side) // 2, (width - side) // 2
    else:
        area = tf.random.stateless_uniform([], seeds[0], min_area, 1.0, tf.float64)
        side = tf.cast(tf.sqrt(area * tf.cast(height * width, tf.float64)), tf.int64)
        side = tf.clip_by_value(side, 1, short)
        top = tf.cast(tf.random.stateless_uniform([], seeds[1], 0.0, 1.0, tf.float64)
                      * tf.cast(height - side + 1, tf.float64), tf.int64)
        left = tf.cast(tf.random.stateless_uniform([], seeds[2], 0.0, 1.0, tf.float64)
                       * tf.cast(width - side + 1, tf.float64), tf.int64)
        top, left = tf.minimum(top, height - side), tf.minimum(left, width - side)
    crop = image[top : top + side, left : left + side]
    # Antialiasing matters when a large photo is shrunk to a small training crop.
    resized = tf.image.resize(crop, [size, size], method="bilinear", antialias=True)
    return tf.clip_by_value(resized, 0.0, 255.0)


def augment(image: tf.Tensor, position: tf.Tensor, config: DataConfig, size: int, seed: int,
            training: bool) -> tf.Tensor:
    """Crop, resize, flip and colour-jitter one uint8 image; float32 ``(size, size, 3)`` in [0, 255]."""
    if not training:
        return crop_resize(image, size, 1.0, None)
    seeds = element_seeds(seed, position, 8)
    out = crop_resize(image, size, config.min_crop_area, seeds[:3])
    if config.flip:
        out = tf.image.stateless_random_flip_left_right(out, seeds[3])
    if config.brightness or config.contrast or config.saturation or config.hue:
        # The colour ops (HSV conversions in particular) expect [0, 1].
        out = out / 255.0
        if config.brightness:
            out = tf.image.stateless_random_brightness(out, config.brightness, seeds[4])
        if config.contrast:
            out = tf.image.stateless_random_contrast(out, 1 - config.contrast, 1 + config.contrast, seeds[5])
        out = tf.clip_by_value(out, 0.0, 1.0)
        if config.saturation:
            out = tf.image.stateless_random_saturation(out, 1 - config.saturation, 1 + config.saturation, seeds[6])
        if config.hue:
            out = tf.image.stateless_random_hue(out, config.hue, seeds[7])
        out = tf.clip_by_value(out, 0.0, 1.0) * 255.0
    return tf.ensure_shape(out, [size, size, 3])
