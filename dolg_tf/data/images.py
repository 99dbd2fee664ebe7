"""Graph-mode image checks, bounded decoding and stateless augmentation.

The header reader (`read_header`, `image_format`, `encoded_dims`) is shared with the
SavedModel export (`dolg_tf.export`), so training and serving accept the same files.

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
UNKNOWN_FORMAT, _JPEG, _PNG, _GIF, _BMP, _WEBP = range(6)


def read_header(data: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
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


def image_format(head: tf.Tensor) -> tf.Tensor:
    sub = tf.strings.substr
    fmt = tf.constant(UNKNOWN_FORMAT, tf.int32)
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


def check_encoded(
    data: tf.Tensor, max_bytes: int, max_pixels: int
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """Cheap checks of one encoded image, on its size and header only (nothing is decoded).

    Returns:
        ``(status, format code, height, width)``; status is ``OK`` or a skip reason. A
        decompression bomb (header announcing more than ``max_pixels``) is rejected here.
    """
    size = tf.strings.length(data)
    head, b = read_header(data)
    fmt = image_format(head)
    status = tf.where(
        tf.equal(size, 0),
        EMPTY,
        tf.where(size > max_bytes, TOO_MANY_BYTES, tf.where(tf.equal(fmt, UNKNOWN_FORMAT), NOT_AN_IMAGE, OK)),
    )

    def dims():
        height, width = encoded_dims(data, head, b, fmt)
        ok = tf.logical_and(tf.logical_and(height > 0, width > 0), height * width <= max_pixels)
        return tf.where(ok, OK, TOO_MANY_PIXELS), height, width

    zero = tf.constant(0, tf.int64)
    status, height, width = tf.cond(tf.equal(status, OK), dims, lambda: (status, zero, zero))
    return tf.cast(status, tf.int32), fmt, height, width


def _decode(data: tf.Tensor) -> tf.Tensor:
    image = tf.io.decode_image(data, channels=3, expand_animations=False, dtype=tf.uint8)
    image.set_shape([None, None, 3])
    return image


def check_and_decode(data: tf.Tensor, max_bytes: int, max_pixels: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Decodes one whole encoded image if it passes :func:`check_encoded`.

    Returns:
        ``(status, image)``: an int32 status code and a uint8 ``(H, W, 3)`` image (a 1x1
        placeholder when status is not OK). A truncated or corrupt file that passes the
        checks makes the decoder raise (the pipeline drops and counts it).
    """
    status = check_encoded(data, max_bytes, max_pixels)[0]
    image = tf.cond(tf.equal(status, OK), lambda: _decode(data), lambda: tf.zeros([1, 1, 3], tf.uint8))
    return status, image


def element_seeds(seed: int, position: tf.Tensor, count: int) -> tf.Tensor:
    """``count`` independent stateless seeds (shape ``(count, 2)``) for the element at ``position``."""
    base = tf.stack([tf.constant(seed, tf.int64), tf.cast(position, tf.int64)])
    return tf.random.experimental.stateless_split(base, count)


def crop_box(
    height: tf.Tensor, width: tf.Tensor, min_area: float, seeds: tf.Tensor | None
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """``(top, left, side)`` of an aspect-preserving (square in pixels) crop.

    With ``seeds`` (shape ``(3, 2)``) the crop covers a random fraction of the image area in
    ``[min_area, 1]`` (capped by the largest square) at a random place; without, it is the
    centred largest square.
    """
    height, width = tf.cast(height, tf.int64), tf.cast(width, tf.int64)
    short = tf.minimum(height, width)
    if seeds is None:
        return (height - short) // 2, (width - short) // 2, short
    area = tf.random.stateless_uniform([], seeds[0], min_area, 1.0, tf.float64)
    side = tf.clip_by_value(tf.cast(tf.sqrt(area * tf.cast(height * width, tf.float64)), tf.int64), 1, short)

    def offset(seed, room):
        u = tf.random.stateless_uniform([], seed, 0.0, 1.0, tf.float64)
        return tf.minimum(tf.cast(u * tf.cast(room + 1, tf.float64), tf.int64), room)

    return offset(seeds[1], height - side), offset(seeds[2], width - side), side


# JPEG DCT-domain downscaling factors; libjpeg decodes 1/r of the pixels, much faster.
_JPEG_RATIOS = (1, 2, 4, 8)


def _decode_jpeg_crop(data: tf.Tensor, top, left, side, size: int) -> tf.Tensor:
    """Decodes only the crop window, at the largest 1/r scale that keeps it >= ``size`` pixels."""
    ratio_index = tf.add_n([tf.cast(side // r >= size, tf.int32) for r in _JPEG_RATIOS[1:]])

    def branch(r):
        def run():
            # With ratio r, the window is in the coordinates of the 1/r-scaled image.
            scaled_side = tf.maximum(side // r, 1)
            window = tf.cast(tf.stack([top // r, left // r, scaled_side, scaled_side]), tf.int32)
            return tf.io.decode_and_crop_jpeg(data, window, channels=3, ratio=r)

        return run

    image = tf.switch_case(ratio_index, [branch(r) for r in _JPEG_RATIOS])
    image.set_shape([None, None, 3])
    return image


def _finish(crop: tf.Tensor, size: int, config: DataConfig, seeds: tf.Tensor | None) -> tf.Tensor:
    """Resize to ``(size, size)``, then (with seeds) flip and colour jitter; float32 in [0, 255]."""
    # Antialiasing matters when a crop shrinks more than 2x, but it costs several times a
    # plain bilinear resize; JPEG crops arrive DCT-downscaled to under 2x, so most skip it.
    out = tf.cond(
        tf.shape(crop)[0] > 2 * size,
        lambda: tf.image.resize(crop, [size, size], method="bilinear", antialias=True),
        lambda: tf.image.resize(crop, [size, size], method="bilinear"),
    )
    out = tf.clip_by_value(out, 0.0, 255.0)
    if seeds is None:
        return tf.ensure_shape(out, [size, size, 3])
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


def _seeds(seed: int, position: tf.Tensor, training: bool) -> tf.Tensor | None:
    return element_seeds(seed, position, 8) if training else None


def augment(
    image: tf.Tensor, position: tf.Tensor, config: DataConfig, size: int, seed: int, training: bool
) -> tf.Tensor:
    """Crop, resize, flip and colour-jitter one decoded uint8 image; float32 ``(size, size, 3)`` in [0, 255].

    ``training=False``: the centred largest square, resized, nothing random.
    """
    seeds = _seeds(seed, position, training)
    shape = tf.shape(image, out_type=tf.int64)
    top, left, side = crop_box(shape[0], shape[1], config.min_crop_area, seeds)
    return _finish(image[top : top + side, left : left + side], size, config, seeds)


def decode_augment(
    data: tf.Tensor, position: tf.Tensor, config: DataConfig, size: int, seed: int, training: bool
) -> tuple[tf.Tensor, tf.Tensor]:
    """:func:`check_encoded`, then decode only the crop and :func:`augment` it.

    JPEGs decode just the crop window, DCT-downscaled when it is at least twice ``size``;
    other formats decode whole and are cropped. The crop box is the same function of
    (seed, position, image size) either way.

    Returns:
        ``(status, image)``: float32 ``(size, size, 3)`` in [0, 255] (zeros when status is not OK).
    """
    status, fmt, height, width = check_encoded(data, config.max_image_bytes, config.max_image_pixels)
    seeds = _seeds(seed, position, training)

    def jpeg():
        top, left, side = crop_box(height, width, config.min_crop_area, seeds)
        return _finish(_decode_jpeg_crop(data, top, left, side, size), size, config, seeds)

    def other():
        image = _decode(data)
        shape = tf.shape(image, out_type=tf.int64)  # the decoded size rules (e.g. GIF frames)
        top, left, side = crop_box(shape[0], shape[1], config.min_crop_area, seeds)
        return _finish(image[top : top + side, left : left + side], size, config, seeds)

    out = tf.case(
        [(tf.not_equal(status, OK), lambda: tf.zeros([size, size, 3])), (tf.equal(fmt, _JPEG), jpeg)],
        default=other,
        exclusive=False,
    )
    return status, tf.ensure_shape(out, [size, size, 3])
