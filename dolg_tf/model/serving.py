"""A ``tf.Module`` that embeds uint8 pixels in-graph: the core of the SavedModel export."""

from __future__ import annotations

import os
from collections.abc import Sequence

import keras
import tensorflow as tf

from dolg_tf.config import PAPER_SCALES
from dolg_tf.model.multiscale import multiscale_embed


class EmbeddingModule(tf.Module):
    """Wraps a DOLG model for export.

    ``embed_pixels(pixels)``: uint8 ``(B, H, W, 3)`` RGB -> ``{"embedding": float32 (B, D)}``,
    L2-normalised, multi-scale with the ``scales`` baked into the graph. The
    function is traced with ``autograph=False`` (no Python control flow on
    tensors) and without XLA, so TF Serving runs it as plain TF ops.

    Args:
        model: a :class:`dolg_tf.model.DOLG` (or any pixels -> descriptor model).
        scales: inference scales.
    """

    def __init__(self, model: keras.Model, scales: Sequence[float] = PAPER_SCALES):
        super().__init__(name="dolg_embedding")
        self.model = model
        self.scales = tuple(float(s) for s in scales)
        self.embed_pixels = tf.function(
            self._embed_pixels,
            input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="pixels")],
            autograph=False,
            jit_compile=False,
        )

    def _embed_pixels(self, pixels):
        embedding = multiscale_embed(self.model, tf.cast(pixels, tf.float32), self.scales)
        return {"embedding": tf.identity(embedding, name="embedding")}


def save_pixel_savedmodel(model: keras.Model, path: str | os.PathLike, scales: Sequence[float] = PAPER_SCALES) -> str:
    """Writes a SavedModel whose ``serving_default`` and ``embed_pixels`` take uint8 pixels."""
    module = EmbeddingModule(model, scales)
    path = os.fspath(path)
    tf.saved_model.save(
        module, path, signatures={"serving_default": module.embed_pixels, "embed_pixels": module.embed_pixels}
    )
    return path
