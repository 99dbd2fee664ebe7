"""The exported graph: bounds checks, decoding, the first resize and the two signature functions.

Everything runs in the graph: the bounds checks, decoding (grayscale, RGBA,
16-bit PNG and CMYK JPEG all become 3-channel uint8), the resize policy, the
model's normalisation and the multi-scale pyramid. There are no Python ops,
no XLA and no ``XlaCallModule``, so TF Serving's C++ loader runs the export
as it is.

Bad input fails inside the graph with ``INVALID_ARGUMENT`` and a message
that names the item and the problem, e.g. ``images[2]: 30000x30000 =
900000000 pixels, over the limit of 40000000``. Image dimensions are read
from the header (``tf.image.extract_jpeg_shape`` for JPEG, the IHDR / screen
descriptor / DIB / VP8 header for PNG / GIF / BMP / WebP, with the same reader
as the training pipeline) *before* decoding, so a decompression bomb is
refused without allocating its pixels.

Every scaled side, the first resize's included, is rounded by
:func:`dolg_tf.model.multiscale.scaled_size`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from dolg_tf.data import images as images_lib
from dolg_tf.export.contract import (
    DEFAULT_SIGNATURE,
    EMBEDDING_KEY,
    IMAGES_KEY,
    PIXELS_KEY,
    PIXELS_SIGNATURE,
    ExportConfig,
)
from dolg_tf.model.multiscale import multiscale_embed, scaled_size


def _assert_op(condition, template: str, values=()):
    """An Assert op whose message is one formatted string (reads well in INVALID_ARGUMENT)."""
    message = tf.strings.format(template, values, summarize=-1)
    return tf.debugging.Assert(condition, [message], name="check")


def resize_for_embedding(pixels, config: ExportConfig):
    """The export's first resize, applied to a ``(B, H, W, 3)`` batch of one size.

    ``"aspect"``: each side times ``image_size / longer side``, rounded by
    :func:`dolg_tf.model.multiscale.scaled_size` (the one size rule);
    ``"fixed"``: ``image_size x image_size``; ``"none"``: the pixels as they
    are. Returns float32 in [0, 255].
    """
    pixels = tf.cast(pixels, tf.float32)
    if config.resize == "none":
        return pixels
    shape = tf.shape(pixels)
    h, w = shape[1], shape[2]
    if config.resize == "fixed":
        size = tf.constant([config.image_size, config.image_size])
    else:
        ratio = tf.constant(float(config.image_size), tf.float64) / tf.cast(tf.maximum(h, w), tf.float64)
        size = tf.stack([scaled_size(h, ratio), scaled_size(w, ratio)])
    shrinking = tf.logical_or(size[0] < h, size[1] < w)
    if config.antialias:
        resized = tf.cond(
            shrinking,
            lambda: tf.image.resize(pixels, size, method="bilinear", antialias=True),
            lambda: tf.image.resize(pixels, size, method="bilinear", antialias=False),
        )
    else:
        resized = tf.image.resize(pixels, size, method="bilinear", antialias=False)
    return tf.clip_by_value(resized, 0.0, 255.0)


def embed_reference(model, encoded_images: Sequence[bytes], config: ExportConfig | dict[str, Any]) -> np.ndarray:
    """What an export computes, run eagerly with the Keras model (``dolg export --verify`` compares to it).

    Decodes with ``tf.io.decode_image`` (3 channels, first frame), applies
    :func:`resize_for_embedding` and the scale pyramid, one image at a time.
    """
    if isinstance(config, dict):
        config = ExportConfig.from_dict(config)
    out = []
    for data in encoded_images:
        pixels = tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False)[None]
        resized = resize_for_embedding(pixels, config)
        out.append(np.asarray(multiscale_embed(model, resized, config.scales))[0])
    return np.stack(out).astype(np.float32)


class ExportModule:
    """The two signature functions around a model."""

    def __init__(self, model, config: ExportConfig):
        self.model = model
        self.config = config

    def archive(self) -> keras.export.ExportArchive:
        """A ``keras.export.ExportArchive`` with both endpoints.

        ExportArchive (not ``tf.saved_model.save`` on a ``tf.Module``) is what
        ties the graph's variable handles to the restored checkpoint values
        for Keras 3 variables: with a bare ``tf.Module`` the Python loader
        works but the C++ loader (TF Serving) finds the variables uninitialised.

        The model is not passed to ``archive.track``: the archive already keeps
        every variable the endpoints read (as ``tf.Variable``), and tracking
        the model adds its Keras variables as second objects, so each weight
        would be written, loaded and held in memory twice.
        """
        archive = keras.export.ExportArchive()
        # Endpoints are traced with autograph off and without XLA.
        archive.add_endpoint(
            DEFAULT_SIGNATURE,
            self._embed_images,
            input_signature=[tf.TensorSpec([None], tf.string, name=IMAGES_KEY)],
        )
        archive.add_endpoint(
            PIXELS_SIGNATURE,
            self._embed_pixels,
            input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name=PIXELS_KEY)],
        )
        return archive

    # -- shared pieces ---------------------------------------------------------
    def _batch_asserts(self, n, what: str):
        n = tf.cast(n, tf.int64)
        return [
            _assert_op(n > 0, f"{what}: the batch is empty; send at least one image"),
            _assert_op(
                n <= self.config.max_batch_size,
                f"{what}: batch of {{}} images is over the limit of {self.config.max_batch_size}",
                [n],
            ),
        ]

    def _embed_same_size(self, pixels):
        resized = resize_for_embedding(pixels, self.config)
        return tf.cast(multiscale_embed(self.model, resized, self.config.scales), tf.float32)

    def _decode_one(self, index, data):
        """Checks and decodes one encoded image -> uint8 (H, W, 3)."""
        c = self.config
        size = tf.cast(tf.strings.length(data), tf.int64)
        asserts = [
            _assert_op(size > 0, "images[{}]: empty image bytes", [index]),
            _assert_op(
                size <= c.max_image_bytes,
                f"images[{{}}]: {{}} encoded bytes, over the limit of {c.max_image_bytes}",
                [index, size],
            ),
        ]
        with tf.control_dependencies(asserts):
            # The same header reader as the training pipeline (dolg_tf.data.images).
            header, header_bytes = images_lib.read_header(data)
            fmt = images_lib.image_format(header)
            h, w = images_lib.encoded_dims(data, header, header_bytes, fmt)
            known = tf.not_equal(fmt, images_lib.UNKNOWN_FORMAT)
        with tf.control_dependencies(
            [
                _assert_op(known, "images[{}]: not a JPEG, PNG, GIF, BMP or WebP image", [index]),
                _assert_op(
                    (h > 0) & (w > 0),
                    "images[{}]: the image header gives an empty size {}x{} (truncated or corrupt image)",
                    [index, h, w],
                ),
                _assert_op(
                    h * w <= c.max_image_pixels,
                    f"images[{{}}]: {{}}x{{}} = {{}} pixels, over the limit of {c.max_image_pixels}",
                    [index, h, w, h * w],
                ),
            ]
        ):
            image = tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False)
        return tf.ensure_shape(image, [None, None, 3])

    # -- signatures ------------------------------------------------------------
    def _embed_images(self, images):
        n = tf.shape(images, out_type=tf.int64)[0]
        with tf.control_dependencies(self._batch_asserts(n, IMAGES_KEY)):
            indices = tf.range(n)
        dim = int(self.model.output_shape[-1])
        if self.config.resize == "fixed":
            size = self.config.image_size

            def decode_fixed(args):
                i, data = args
                return resize_for_embedding(self._decode_one(i, data)[None], self.config)[0]

            batch = tf.map_fn(
                decode_fixed,
                (indices, images),
                fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32),
            )
            embedding = tf.cast(multiscale_embed(self.model, batch, self.config.scales), tf.float32)
        else:

            def embed_one(args):
                i, data = args
                return self._embed_same_size(self._decode_one(i, data)[None])[0]

            embedding = tf.map_fn(
                embed_one,
                (indices, images),
                fn_output_signature=tf.TensorSpec([dim], tf.float32),
                parallel_iterations=2,
            )
        return {EMBEDDING_KEY: tf.identity(embedding, name=EMBEDDING_KEY)}

    def _embed_pixels(self, pixels):
        c = self.config
        shape = tf.shape(pixels, out_type=tf.int64)
        asserts = self._batch_asserts(shape[0], PIXELS_KEY) + [
            _assert_op(
                (shape[1] > 0) & (shape[2] > 0),
                "pixels: images must be at least 1x1, got {}x{}",
                [shape[1], shape[2]],
            ),
            _assert_op(
                shape[1] * shape[2] <= c.max_image_pixels,
                f"pixels: {{}}x{{}} = {{}} pixels, over the limit of {c.max_image_pixels}",
                [shape[1], shape[2], shape[1] * shape[2]],
            ),
        ]
        with tf.control_dependencies(asserts):
            pixels = tf.identity(pixels)
        return {EMBEDDING_KEY: tf.identity(self._embed_same_size(pixels), name=EMBEDDING_KEY)}
