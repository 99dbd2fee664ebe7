"""Generalized-mean (GeM) pooling."""

from __future__ import annotations

import keras
from keras import ops

from dolg_tf.errors import InputShapeError


@keras.saving.register_keras_serializable(package="dolg_tf")
class GeM(keras.layers.Layer):
    """Generalized-mean pooling over the spatial axes.

    ``GeM(x) = (mean_{h,w} max(x, eps)^p)^(1/p)`` per channel. ``p = 1`` is
    average pooling and ``p -> inf`` tends to max pooling. The exponent is a
    single trained scalar shared by all channels, as in the official DOLG code
    (dongkyunk/DOLG-pytorch froze it).

    The power is computed in float32 whatever the dtype policy: ``x^3`` of a
    ResNet activation overflows float16.

    Args:
        p: float. Initial value of the exponent.
        eps: float. Inputs are clamped to at least ``eps`` before the power.
        trainable_p: bool. Whether ``p`` is updated by training.

    Input shape:
        4D tensor ``(batch, height, width, channels)``.

    Output shape:
        2D tensor ``(batch, channels)``.

    Examples:
        >>> pooled = GeM(p=3.0)(keras.random.uniform((2, 7, 7, 2048)))

    Reference:
        Radenovic et al., "Fine-tuning CNN Image Retrieval with No Human
        Annotation", TPAMI 2018.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6, trainable_p: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.p = float(p)
        self.eps = float(eps)
        self.trainable_p = bool(trainable_p)

    def build(self, input_shape):
        if len(input_shape) != 4:
            raise InputShapeError(f"GeM expects a 4D (batch, height, width, channels) input, got shape {input_shape}")
        self.p_weight = self.add_weight(
            name="p",
            shape=(1,),
            initializer=keras.initializers.Constant(self.p),
            trainable=self.trainable_p,
            dtype="float32",
            autocast=False,
        )

    def call(self, inputs):
        x = ops.cast(inputs, "float32")
        p = ops.cast(self.p_weight, "float32")
        x = ops.power(ops.maximum(x, self.eps), p)
        x = ops.mean(x, axis=(1, 2))
        x = ops.power(x, 1.0 / p)
        return ops.cast(x, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])

    def get_config(self):
        config = super().get_config()
        config.update({"p": self.p, "eps": self.eps, "trainable_p": self.trainable_p})
        return config
