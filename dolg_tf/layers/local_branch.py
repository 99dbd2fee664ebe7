"""DOLG's local branch: MultiAtrous + spatial self-attention."""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import ops

from dolg_tf.errors import ConfigError, InputShapeError
from dolg_tf.layers.multi_atrous import MultiAtrous
from dolg_tf.layers.normalization import l2_normalize


@keras.saving.register_keras_serializable(package="dolg_tf")
class LocalBranch(keras.layers.Layer):
    """Local feature branch of DOLG.

    Optional :class:`MultiAtrous`, then the self-attention module:
    ``f = BN(conv1x1(x))``; the features are ``f`` L2-normalised over channels
    (taken before any ReLU); the attention map is
    ``softplus(conv1x1_to_1(relu(f)))``, one non-negative score per position
    (dongkyunk/DOLG-pytorch produced 1024 channels here); the output is
    attention * features.

    Args:
        filters: int. Channels of the local features (1024 in the paper).
        multi_atrous: bool. Whether to apply :class:`MultiAtrous` first.
        atrous_filters: int. Channels of each MultiAtrous branch.
        dilation_rates: sequence of int. MultiAtrous dilation rates.
        bn_epsilon: float. Batch-norm epsilon (1e-5 as in PyTorch / official).
        bn_momentum: float. Keras-style moving-average momentum (0.9 equals
            PyTorch's 0.1).
        return_attention: bool. If True, ``call`` returns
            ``(local_features, attention)``.

    Input shape:
        4D tensor ``(batch, height, width, channels)`` (res4 of the backbone).

    Output shape:
        ``(batch, height, width, filters)``, and with ``return_attention``
        also ``(batch, height, width, 1)``.

    Examples:
        >>> branch = LocalBranch(filters=32, atrous_filters=8)
        >>> tuple(branch(keras.random.normal((2, 6, 9, 16))).shape)
        (2, 6, 9, 32)
    """

    def __init__(
        self,
        filters: int = 1024,
        multi_atrous: bool = True,
        atrous_filters: int = 512,
        dilation_rates: Sequence[int] = (6, 12, 18),
        bn_epsilon: float = 1e-5,
        bn_momentum: float = 0.9,
        return_attention: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if int(filters) <= 0:
            raise ConfigError(f"LocalBranch filters must be positive, got {filters}")
        self.filters = int(filters)
        self.multi_atrous = bool(multi_atrous)
        self.atrous_filters = int(atrous_filters)
        self.dilation_rates = tuple(int(r) for r in dilation_rates)
        self.bn_epsilon = float(bn_epsilon)
        self.bn_momentum = float(bn_momentum)
        self.return_attention = bool(return_attention)
        policy = self.dtype_policy
        self.atrous = (
            MultiAtrous(self.atrous_filters, self.dilation_rates, self.filters, name="multi_atrous", dtype=policy)
            if self.multi_atrous
            else None
        )
        # No bias: a bias right before batch norm gets a zero gradient in training
        # and only shifts the moving mean at inference. The official conv1 has
        # one; the converter folds it into the moving mean, exactly.
        self.conv = keras.layers.Conv2D(self.filters, 1, use_bias=False, name="conv", dtype=policy)
        self.bn = keras.layers.BatchNormalization(
            epsilon=self.bn_epsilon, momentum=self.bn_momentum, name="bn", dtype=policy
        )
        self.attention_conv = keras.layers.Conv2D(1, 1, name="attention_conv", dtype=policy)

    def build(self, input_shape):
        if len(input_shape) != 4:
            raise InputShapeError(f"LocalBranch expects a 4D input, got shape {input_shape}")
        shape = tuple(input_shape)
        if self.atrous is not None:
            self.atrous.build(shape)
            shape = self.atrous.compute_output_shape(shape)
        self.conv.build(shape)
        shape = self.conv.compute_output_shape(shape)
        self.bn.build(shape)
        self.attention_conv.build(shape)

    def call(self, inputs, training=None):
        x = inputs
        if self.atrous is not None:
            x = self.atrous(x)
        f = self.bn(self.conv(x), training=training)
        # The channel norm of 1024 values can overflow float16: normalise in float32.
        features = ops.cast(l2_normalize(ops.cast(f, "float32")), self.compute_dtype)
        attention = ops.softplus(self.attention_conv(ops.relu(f)))
        local = attention * features
        if self.return_attention:
            return local, attention
        return local

    def compute_output_shape(self, input_shape):
        spatial = tuple(input_shape[:3])
        if self.return_attention:
            return spatial + (self.filters,), spatial + (1,)
        return spatial + (self.filters,)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "filters": self.filters,
                "multi_atrous": self.multi_atrous,
                "atrous_filters": self.atrous_filters,
                "dilation_rates": list(self.dilation_rates),
                "bn_epsilon": self.bn_epsilon,
                "bn_momentum": self.bn_momentum,
                "return_attention": self.return_attention,
            }
        )
        return config
