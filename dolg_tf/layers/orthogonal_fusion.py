"""Orthogonal fusion of local and global features."""

from __future__ import annotations

import keras
from keras import ops

from dolg_tf.errors import InputShapeError


@keras.saving.register_keras_serializable(package="dolg_tf")
class OrthogonalFusion(keras.layers.Layer):
    """Keeps the part of the local features orthogonal to the global vector.

    For every position, ``orth = f_l - (f_l . f_g) / (|f_g|^2 + eps) * f_g``;
    ``orth`` is average-pooled over H x W and concatenated after ``f_g``:
    output ``concat([f_g, mean_hw(orth)])``.

    Projection is linear, so ``mean_hw(orth)`` equals the projection of
    ``mean_hw(f_l)``; the layer pools first and projects once, which gives the
    same result as the paper's per-position projection with O(B*C) memory
    instead of O(B*H*W*C), and never broadcasts ``f_g`` over the map (the
    memory waste of dongkyunk/DOLG-pytorch). The maths runs in float32
    (``|f_g|^2`` overflows float16) and ``eps`` keeps a zero global vector
    finite (the official code divides by zero there).

    Args:
        epsilon: float. Added to ``|f_g|^2``.

    Call arguments:
        inputs: list ``[local, global]``, ``local`` of shape
            ``(batch, height, width, C)``, ``global`` of shape ``(batch, C)``.

    Output shape:
        ``(batch, 2 * C)``: global first, pooled orthogonal local second.

    Examples:
        >>> fused = OrthogonalFusion()([keras.random.normal((2, 5, 5, 8)), keras.random.normal((2, 8))])
        >>> tuple(fused.shape)
        (2, 16)
    """

    def __init__(self, epsilon: float = 1e-6, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = float(epsilon)

    def build(self, input_shape):
        if not isinstance(input_shape, (list, tuple)) or len(input_shape) != 2:
            raise InputShapeError("OrthogonalFusion expects two inputs [local (B,H,W,C), global (B,C)]")
        local_shape, global_shape = input_shape
        if len(local_shape) != 4 or len(global_shape) != 2:
            raise InputShapeError(
                f"OrthogonalFusion expects local (B,H,W,C) and global (B,C), got {local_shape} and {global_shape}"
            )
        if local_shape[-1] is not None and global_shape[-1] is not None and local_shape[-1] != global_shape[-1]:
            raise InputShapeError(
                f"OrthogonalFusion needs equal channels, got local {local_shape[-1]} and global {global_shape[-1]}"
            )

    def call(self, inputs):
        local, glob = inputs
        local_mean = ops.mean(ops.cast(local, "float32"), axis=(1, 2))
        g = ops.cast(glob, "float32")
        dot = ops.sum(local_mean * g, axis=-1, keepdims=True)
        sq_norm = ops.sum(g * g, axis=-1, keepdims=True)
        orth = local_mean - (dot / (sq_norm + self.epsilon)) * g
        out = ops.concatenate([g, orth], axis=-1)
        return ops.cast(out, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        local_shape, global_shape = input_shape
        channels = global_shape[-1] if global_shape[-1] is not None else local_shape[-1]
        return (local_shape[0], None if channels is None else 2 * channels)

    def get_config(self):
        config = super().get_config()
        config.update({"epsilon": self.epsilon})
        return config
