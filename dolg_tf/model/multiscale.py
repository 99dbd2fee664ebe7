"""Multi-scale descriptor extraction (TensorFlow graph compatible)."""

from __future__ import annotations

from collections.abc import Sequence

import keras
import tensorflow as tf

from dolg_tf.config import PAPER_SCALES
from dolg_tf.errors import ConfigError, InputShapeError
from dolg_tf.layers.normalization import l2_normalize


def scaled_size(size, scale) -> tf.Tensor:
    """The one size rule for every resize by a factor: ``max(1, int(round(float(size) * scale)))``.

    This is the authors' extractor's rule: the product is taken in float64
    and rounded half to even, as Python's ``round`` does (``round(74.5) ==
    74``, ``round(75.5) == 76``); ``tf.round`` rounds half to even too. A side
    that would round to 0 becomes 1. ``scale`` may be a Python number or a
    tensor (the export's pre-resize ratio is one).

    Args:
        size: int scalar (or tensor) side length.
        scale: the resize factor.

    Returns:
        int32 tensor, the scaled side.
    """
    # A Python float goes straight to float64: through a float32 tensor 0.3535 would
    # lose the bits that decide ties (3000 * 0.3535 must round to 1060, not 1061).
    scale = tf.cast(scale, tf.float64) if isinstance(scale, tf.Tensor) else tf.constant(float(scale), tf.float64)
    product = tf.cast(size, tf.float64) * scale
    return tf.maximum(tf.cast(tf.round(product), tf.int32), 1)


def multiscale_embed(
    model: keras.Model,
    images,
    scales: Sequence[float] = PAPER_SCALES,
) -> tf.Tensor:
    """Multi-scale DOLG descriptors.

    Each image batch is resized (bilinear, no antialiasing, like OpenCV's
    ``resize`` used by the official evaluation) by every factor in
    ``scales``, each side to :func:`scaled_size` (the authors' rounding); each
    scale's descriptor is L2-normalised, the descriptors are averaged and the
    average is L2-normalised again. Sizes are computed at run
    time, so this works inside a ``tf.function`` with unknown H and W (it is
    used inside the exported SavedModel).

    Args:
        model: a model mapping ``(B, H, W, 3)`` pixels in [0, 255] to
            ``(B, D)`` descriptors (a :class:`dolg_tf.model.DOLG`).
        images: float ``(B, H, W, 3)`` RGB pixels in [0, 255].
        scales: positive resize factors.

    Returns:
        float32 ``(B, D)`` unit-norm descriptors.
    """
    scales = tuple(float(s) for s in scales)
    if not scales or any(not s > 0 for s in scales):
        raise ConfigError(f"scales must be a non-empty sequence of positive numbers, got {scales}")
    images = tf.convert_to_tensor(images)
    if images.shape.rank is not None and (images.shape.rank != 4 or images.shape[-1] not in (None, 3)):
        raise InputShapeError(f"images must have shape (batch, height, width, 3), got {images.shape}")
    images = tf.cast(images, tf.float32)
    shape = tf.shape(images)
    total = None
    for scale in scales:
        if scale == 1.0:
            resized = images
        else:
            size = tf.stack([scaled_size(shape[1], scale), scaled_size(shape[2], scale)])
            resized = tf.image.resize(images, size, method="bilinear", antialias=False)
        descriptor = l2_normalize(tf.cast(model(resized, training=False), tf.float32))
        total = descriptor if total is None else total + descriptor
    return l2_normalize(total)
