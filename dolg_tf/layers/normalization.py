"""Input normalisation and L2 normalisation layers."""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import ops

from dolg_tf.errors import ConfigError


def l2_normalize(x, axis: int = -1, epsilon: float = 1e-12):
    """``x / sqrt(max(sum(x^2), epsilon))`` along ``axis`` (a zero vector stays zero)."""
    return x / ops.sqrt(ops.maximum(ops.sum(ops.square(x), axis=axis, keepdims=True), epsilon))


IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)


@keras.saving.register_keras_serializable(package="dolg_tf")
class ImageNormalization(keras.layers.Layer):
    """Maps RGB pixels in [0, 255] to the backbone's normalised input.

    ``y = (reorder(x) / 255 - mean) / std``, where ``reorder`` keeps RGB or
    flips to BGR. ``mean`` and ``std`` are given in the *output* channel order,
    so the official DOLG setting is ``channel_order="bgr",
    mean=(0.406, 0.456, 0.485), std=(0.225, 0.224, 0.229)``.

    Args:
        mean: three floats, in [0, 1] units.
        std: three positive floats.
        channel_order: ``"rgb"`` or ``"bgr"``.

    Input shape:
        ``(batch, height, width, 3)``, RGB values in [0, 255].

    Output shape:
        Same as the input.
    """

    def __init__(
        self,
        mean: Sequence[float] = IMAGENET_MEAN_RGB,
        std: Sequence[float] = IMAGENET_STD_RGB,
        channel_order: str = "rgb",
        **kwargs,
    ):
        super().__init__(**kwargs)
        mean = tuple(float(m) for m in mean)
        std = tuple(float(s) for s in std)
        if len(mean) != 3 or len(std) != 3:
            raise ConfigError(f"mean and std need 3 values each, got {mean} and {std}")
        if any(s <= 0 for s in std):
            raise ConfigError(f"std values must be positive, got {std}")
        if channel_order not in ("rgb", "bgr"):
            raise ConfigError(f"channel_order must be 'rgb' or 'bgr', got {channel_order!r}")
        self.mean = mean
        self.std = std
        self.channel_order = channel_order

    def call(self, inputs):
        x = ops.cast(inputs, self.compute_dtype)
        if self.channel_order == "bgr":
            x = ops.flip(x, axis=-1)
        mean = ops.convert_to_tensor([m * 255.0 for m in self.mean], dtype=self.compute_dtype)
        std = ops.convert_to_tensor([s * 255.0 for s in self.std], dtype=self.compute_dtype)
        return (x - mean) / std

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update({"mean": list(self.mean), "std": list(self.std), "channel_order": self.channel_order})
        return config


@keras.saving.register_keras_serializable(package="dolg_tf")
class L2Normalize(keras.layers.Layer):
    """L2-normalises the last axis in float32.

    Args:
        epsilon: float. Lower bound of the squared norm (a zero vector stays zero).

    Input shape:
        Any tensor ``(..., D)``.

    Output shape:
        Same as the input, float32.
    """

    def __init__(self, epsilon: float = 1e-12, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.epsilon = float(epsilon)

    def call(self, inputs):
        return l2_normalize(ops.cast(inputs, "float32"), epsilon=self.epsilon)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update({"epsilon": self.epsilon})
        return config
