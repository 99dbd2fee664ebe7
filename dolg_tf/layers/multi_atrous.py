"""The MultiAtrous (ASPP-like) module of DOLG's local branch."""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import ops

from dolg_tf.errors import ConfigError, InputShapeError


@keras.saving.register_keras_serializable(package="dolg_tf")
class MultiAtrous(keras.layers.Layer):
    """Multi-rate atrous convolutions with an image-pooling branch.

    Five parallel branches on the same input, concatenated along channels in
    the order of the official DOLG code (so released weights convert 1:1):
    ``[image pooling, 1x1 conv, 3x3 conv dilation r_1, ..., r_n]``, then a
    1x1 conv to ``out_filters`` and a ReLU. The image-pooling branch (global
    average pool -> 1x1 conv -> ReLU) is broadcast back to the input's own
    height and width at run time, which equals the official bilinear
    upsampling of a 1x1 map, so any input size works (dongkyunk/DOLG-pytorch
    fixed it at construction). No batch norm, and no activation on the conv
    branches, exactly as in the official module.

    Args:
        filters: int. Channels of each branch.
        dilation_rates: sequence of int. One 3x3 dilated conv per rate.
        out_filters: int. Channels after the fusing 1x1 conv.

    Input shape:
        4D tensor ``(batch, height, width, channels)``.

    Output shape:
        4D tensor ``(batch, height, width, out_filters)``.

    Example:
    >>> y = MultiAtrous(filters=8, out_filters=16)(keras.random.normal((1, 5, 7, 4)))
    >>> tuple(y.shape)
    (1, 5, 7, 16)

    Reference:
        Yang et al., "DOLG", ICCV 2021, Sec. 3.2; Chen et al., DeepLab v3.
    """

    def __init__(
        self,
        filters: int = 512,
        dilation_rates: Sequence[int] = (6, 12, 18),
        out_filters: int = 1024,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if int(filters) <= 0 or int(out_filters) <= 0:
            raise ConfigError(f"MultiAtrous filters and out_filters must be positive, got {filters} and {out_filters}")
        rates = tuple(int(r) for r in dilation_rates)
        if any(r < 1 for r in rates):
            raise ConfigError(f"MultiAtrous dilation_rates must be >= 1, got {tuple(dilation_rates)}")
        self.filters = int(filters)
        self.dilation_rates = rates
        self.out_filters = int(out_filters)
        self.pool_conv = keras.layers.Conv2D(self.filters, 1, name="pool_conv", dtype=self.dtype_policy)
        self.conv_1x1 = keras.layers.Conv2D(self.filters, 1, name="conv_1x1", dtype=self.dtype_policy)
        self.atrous_convs = [
            keras.layers.Conv2D(
                self.filters, 3, padding="same", dilation_rate=r, name=f"conv_d{r}", dtype=self.dtype_policy
            )
            for r in rates
        ]
        self.project = keras.layers.Conv2D(self.out_filters, 1, name="project", dtype=self.dtype_policy)

    def build(self, input_shape):
        if len(input_shape) != 4:
            raise InputShapeError(f"MultiAtrous expects a 4D input, got shape {input_shape}")
        channels = input_shape[-1]
        self.pool_conv.build((None, 1, 1, channels))
        self.conv_1x1.build(input_shape)
        for conv in self.atrous_convs:
            conv.build(input_shape)
        concat = (None, None, None, self.filters * (2 + len(self.atrous_convs)))
        self.project.build(concat)

    def call(self, inputs):
        pooled = ops.mean(inputs, axis=(1, 2), keepdims=True)
        pooled = ops.relu(self.pool_conv(pooled))
        branch_1x1 = self.conv_1x1(inputs)
        # Broadcasting the 1x1 map is exactly bilinear upsampling of a 1x1 map,
        # and it follows the input's run-time H x W.
        pooled = ops.broadcast_to(pooled, ops.shape(branch_1x1))
        branches = [pooled, branch_1x1] + [conv(inputs) for conv in self.atrous_convs]
        return ops.relu(self.project(ops.concatenate(branches, axis=-1)))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:3]) + (self.out_filters,)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "filters": self.filters,
                "dilation_rates": list(self.dilation_rates),
                "out_filters": self.out_filters,
            }
        )
        return config
