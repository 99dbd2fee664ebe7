"""The MultiAtrous (ASPP-like) module of DOLG's local branch."""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import ops

from dolg_tf.errors import ConfigError, InputShapeError

# Whether MultiAtrous takes its fast path (True) or calls its Keras Conv2D
# layers one by one (False). Read when a call is traced; benchmarks switch it
# off to compare with the plain computation.
_FAST_PATH = True


def set_fast_path(enabled: bool) -> None:
    """Chooses how MultiAtrous computes in calls traced from now on (the values are the same).

    Args:
        enabled: True (the default): each dilated 3x3 convolution runs as
            nine products, each over only the part of the map its tap overlaps
            (:func:`dilated_conv3x3_same`), and the image-pooling branch, which
            is constant over the map, goes through its share of the fusing
            1x1 conv once per image instead of once per position. False: the
            Keras ``Conv2D`` layers are called on the concatenated branches;
            TensorFlow lowers a dilated one to SpaceToBatchND -> Conv2D ->
            BatchToSpaceND over a zero-padded map.
    """
    global _FAST_PATH
    _FAST_PATH = bool(enabled)


def dilated_conv3x3_same(inputs, kernel, bias, rate: int):
    """A 3x3 convolution with dilation ``rate``, "same" zero padding, stride 1, as nine sliced 1x1 convolutions.

    Tap ``(i, j)`` of the kernel reads the input shifted by
    ``((i - 1) * rate, (j - 1) * rate)``; outside the map it reads zeros, so
    it only contributes where the shifted map overlaps the output. Each tap
    is therefore a matrix product over channels of the overlapping slice of
    the input (a matmul, not a 1x1 Conv2D: TensorFlow's CPU Conv2D returns a
    wrongly shaped result for an empty input, which a slice can be),
    zero-padded back to the output's size and added. On a map of side ``n``
    a tap that is off-centre along an axis covers ``max(n - rate, 0)`` rows
    or columns instead of ``n`` (none when the map is not larger than the
    dilation), which is the work the convolution actually needs. The map size
    may be unknown until run time.

    Args:
        inputs: ``(batch, height, width, channels)``.
        kernel: ``(3, 3, channels, filters)``.
        bias: ``(filters,)`` or None.
        rate: the dilation (>= 1).

    Returns:
        ``(batch, height, width, filters)``, equal to
        ``keras.layers.Conv2D(filters, 3, padding="same", dilation_rate=rate)``
        with the same weights.
    """
    shape = ops.shape(inputs)
    height, width = shape[1], shape[2]

    def overlap(size, offset):
        # input slice [start, stop) feeding output rows shifted by -offset; `pad` zero rows before/after
        if offset > 0:
            return slice(offset, None), (0, ops.minimum(size, offset))
        if offset < 0:
            return slice(0, ops.maximum(size + offset, 0)), (ops.minimum(size, -offset), 0)
        return slice(None), (0, 0)

    output = ops.matmul(inputs, kernel[1, 1])
    for i in range(3):
        row_slice, row_pad = overlap(height, (i - 1) * rate)
        rows = inputs[:, row_slice]
        band = None
        for j in range(3):
            if i == 1 and j == 1:
                continue
            col_slice, col_pad = overlap(width, (j - 1) * rate)
            tap = ops.matmul(rows[:, :, col_slice], kernel[i, j])
            if j != 1:
                tap = ops.pad(tap, [[0, 0], [0, 0], list(col_pad), [0, 0]])
            band = tap if band is None else band + tap
        if i != 1:
            band = ops.pad(band, [[0, 0], list(row_pad), [0, 0], [0, 0]])
        output = output + band
    if bias is not None:
        output = output + bias
    return output


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

    Examples:
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
        if not _FAST_PATH:
            # Broadcasting the 1x1 map is exactly bilinear upsampling of a 1x1 map,
            # and it follows the input's run-time H x W.
            pooled = ops.broadcast_to(pooled, ops.shape(branch_1x1))
            branches = [pooled, branch_1x1] + [conv(inputs) for conv in self.atrous_convs]
            return ops.relu(self.project(ops.concatenate(branches, axis=-1)))

        def weight(variable):
            return ops.cast(variable, self.compute_dtype)

        atrous = [
            dilated_conv3x3_same(inputs, weight(conv.kernel), weight(conv.bias), rate)
            for conv, rate in zip(self.atrous_convs, self.dilation_rates)
        ]
        # The fusing conv is linear: its image-pool rows act on a (B, 1, 1, filters)
        # vector, added to every position (what broadcasting the branch would give).
        kernel = weight(self.project.kernel)[0, 0]
        per_image = ops.matmul(pooled, kernel[: self.filters]) + weight(self.project.bias)
        spatial = ops.matmul(ops.concatenate([branch_1x1] + atrous, axis=-1), kernel[self.filters :])
        return ops.relu(spatial + per_image)

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
