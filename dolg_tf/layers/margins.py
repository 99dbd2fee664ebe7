"""Additive angular margin heads used to train DOLG descriptors.

All heads compute in float32 whatever the dtype policy (their own dtype
defaults to ``"float32"``), clip cosines to [-1, 1] and take
``sin = sqrt(max(1 - cos^2, eps))`` so neither the value nor the gradient is
NaN at ``cos = +-1`` (dongkyunk/DOLG-pytorch's ArcFace produced NaN there).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import keras
import numpy as np
from keras import ops

from dolg_tf.errors import ConfigError, InputShapeError
from dolg_tf.layers.normalization import l2_normalize

_SIN_EPS = 1e-7


def _add_angular_margin(cos, margin):
    """Returns cos(theta + m), falling back to ``cos - m sin(m)`` past pi - m.

    The fallback keeps the target logit monotonic in theta (insightface's
    ``easy_margin=False`` rule). ``margin`` may be a scalar or broadcastable.
    """
    cos_m = ops.cos(margin)
    sin_m = ops.sin(margin)
    sin = ops.sqrt(ops.maximum(1.0 - ops.square(cos), _SIN_EPS))
    phi = cos * cos_m - sin * sin_m
    threshold = ops.cos(math.pi - margin)
    return ops.where(cos > threshold, phi, cos - margin * sin_m)


class _MarginHead(keras.layers.Layer):
    """Shared weights and cosine logic of the margin heads."""

    def __init__(self, num_classes: int, scale: float = 30.0, num_centers: int = 1, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if int(num_classes) < 1:
            raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
        if float(scale) <= 0:
            raise ConfigError(f"scale must be positive, got {scale}")
        self.num_classes = int(num_classes)
        self.scale = float(scale)
        self._num_centers = int(num_centers)

    def build(self, input_shape):
        emb_shape = (
            input_shape[0]
            if isinstance(input_shape, (list, tuple)) and isinstance(input_shape[0], (list, tuple))
            else input_shape
        )
        dim = emb_shape[-1]
        if dim is None:
            raise InputShapeError(f"{type(self).__name__} needs a known embedding size, got shape {emb_shape}")
        self.kernel = self.add_weight(
            name="kernel",
            shape=(int(dim), self.num_classes * self._num_centers),
            initializer=keras.initializers.GlorotUniform(),
            dtype="float32",
        )

    def _cosine(self, embeddings):
        x = l2_normalize(ops.cast(embeddings, "float32"), axis=-1)
        w = l2_normalize(ops.cast(self.kernel, "float32"), axis=0)
        cos = ops.matmul(x, w)
        if self._num_centers > 1:
            cos = ops.reshape(cos, (-1, self.num_classes, self._num_centers))
            cos = ops.max(cos, axis=-1)
        return ops.clip(cos, -1.0, 1.0)

    def _split(self, inputs):
        if not isinstance(inputs, (list, tuple)) or len(inputs) != 2:
            raise InputShapeError(f"{type(self).__name__} is called on [embeddings, labels]")
        embeddings, labels = inputs
        labels = ops.reshape(ops.cast(labels, "int32"), (-1,))
        return embeddings, labels

    def compute_output_shape(self, input_shape):
        return (input_shape[0][0], self.num_classes)

    def get_config(self):
        config = super().get_config()
        config.update({"num_classes": self.num_classes, "scale": self.scale})
        return config


@keras.saving.register_keras_serializable(package="dolg_tf")
class ArcFace(_MarginHead):
    """ArcFace: additive angular margin on the target class.

    ``logits = s * cos(theta_j)`` for ``j != y`` and ``s * cos(theta_y + m)``
    for the target.

    Args:
        num_classes: int. Number of training classes.
        scale: float. ``s`` (30 in DOLG).
        margin: float. ``m`` in radians (0.15 in DOLG).

    Call arguments:
        inputs: ``[embeddings (B, D), labels (B,) int]``.

    Output shape:
        ``(B, num_classes)`` float32 logits, to feed a sparse softmax
        cross-entropy.

    Reference:
        Deng et al., "ArcFace: Additive Angular Margin Loss for Deep Face
        Recognition", CVPR 2019.
    """

    def __init__(self, num_classes: int, scale: float = 30.0, margin: float = 0.15, **kwargs):
        super().__init__(num_classes, scale, **kwargs)
        if not 0.0 <= float(margin) < math.pi / 2:
            raise ConfigError(f"margin must be in [0, pi/2), got {margin}")
        self.margin = float(margin)

    def call(self, inputs):
        embeddings, labels = self._split(inputs)
        cos = self._cosine(embeddings)
        onehot = ops.one_hot(labels, self.num_classes, dtype="float32")
        target = _add_angular_margin(ops.sum(cos * onehot, axis=-1, keepdims=True), self.margin)
        return self.scale * (cos + onehot * (target - cos))

    def get_config(self):
        config = super().get_config()
        config.update({"margin": self.margin})
        return config


@keras.saving.register_keras_serializable(package="dolg_tf")
class CurricularFace(_MarginHead):
    """CurricularFace, the head the official DOLG code trained with.

    Target: ``cos(theta_y + m)`` (with the monotonic fallback). Hard negatives
    (``cos_j > cos(theta_y + m)``) become ``cos_j * (t + cos_j)``, where ``t`` is
    an exponential moving average (factor ``momentum``) of the batch's mean
    target cosine, updated in training only (the official code also updates
    it at inference, which makes inference stateful; we do not copy that).
    ``t`` receives no gradient.

    Args:
        num_classes: int. Number of training classes.
        scale: float. ``s`` (30 in DOLG's yaml).
        margin: float. ``m`` (0.15 in DOLG's yaml).
        momentum: float. EMA factor of ``t`` (0.01 officially).

    Call arguments:
        inputs: ``[embeddings (B, D), labels (B,) int]``.
        training: bool. Whether to update ``t``.

    Output shape:
        ``(B, num_classes)`` float32 logits.

    Reference:
        Huang et al., "CurricularFace", CVPR 2020.
    """

    def __init__(self, num_classes: int, scale: float = 30.0, margin: float = 0.15, momentum: float = 0.01, **kwargs):
        super().__init__(num_classes, scale, **kwargs)
        if not 0.0 <= float(margin) < math.pi / 2:
            raise ConfigError(f"margin must be in [0, pi/2), got {margin}")
        if not 0.0 < float(momentum) <= 1.0:
            raise ConfigError(f"momentum must be in (0, 1], got {momentum}")
        self.margin = float(margin)
        self.momentum = float(momentum)

    def build(self, input_shape):
        super().build(input_shape)
        self.t = self.add_weight(
            name="t",
            shape=(),
            initializer="zeros",
            trainable=False,
            dtype="float32",
            aggregation="mean",
            autocast=False,  # read as float32 under a mixed policy too: it is updated with float32 cosines
        )

    def call(self, inputs, training=None):
        embeddings, labels = self._split(inputs)
        cos = self._cosine(embeddings)
        onehot = ops.one_hot(labels, self.num_classes, dtype="float32")
        target_cos = ops.sum(cos * onehot, axis=-1, keepdims=True)
        target = _add_angular_margin(target_cos, self.margin)
        t = self.t
        if training:
            t = ops.stop_gradient(self.momentum * ops.mean(target_cos) + (1.0 - self.momentum) * self.t)
            self.t.assign(t)
        t = ops.stop_gradient(ops.cast(t, "float32"))
        hard = cos > target
        adjusted = ops.where(hard, cos * (t + cos), cos)
        return self.scale * (adjusted + onehot * (target - adjusted))

    def get_config(self):
        config = super().get_config()
        config.update({"margin": self.margin, "momentum": self.momentum})
        return config


def dynamic_margins(class_counts: Sequence[int] | np.ndarray, low: float = 0.05, high: float = 0.5) -> np.ndarray:
    """Per-class margins from class frequency (2021 Landmark winner's recipe).

    ``m_c = (high - low) * normalised(n_c^-1/4) + low``, where ``normalised``
    maps the smallest value to 0 and the largest to 1: rare classes get the
    largest margin.

    Args:
        class_counts: training images per class, all >= 1.
        low: margin of the most frequent class.
        high: margin of the rarest class.

    Returns:
        float32 array of shape ``(num_classes,)``.
    """
    counts = np.asarray(class_counts, dtype=np.float64)
    if counts.ndim != 1 or counts.size == 0:
        raise ConfigError(f"class_counts must be a non-empty 1D sequence, got shape {counts.shape}")
    if np.any(counts < 1):
        raise ConfigError(f"class_counts must all be >= 1, smallest is {counts.min()}")
    if not 0.0 <= low <= high < math.pi / 2:
        raise ConfigError(f"need 0 <= low <= high < pi/2, got low={low}, high={high}")
    v = counts**-0.25
    span = v.max() - v.min()
    norm = (v - v.min()) / span if span > 0 else np.zeros_like(v)
    return (low + (high - low) * norm).astype(np.float32)


@keras.saving.register_keras_serializable(package="dolg_tf")
class SubCenterArcFace(_MarginHead):
    """Sub-center ArcFace with optional per-class (dynamic) margins.

    Each class has ``k`` centres; its cosine is the largest over them. The
    target margin is ``margins[y]`` (a scalar margin applies to every class).
    Use :func:`dynamic_margins` for the frequency-based margins of the 2021
    Google Landmark Recognition winner.

    Args:
        num_classes: int.
        k: int. Sub-centres per class (3 in the winning recipe).
        margins: float, or a sequence of ``num_classes`` floats.
        scale: float.

    Call arguments:
        inputs: ``[embeddings (B, D), labels (B,) int]``.

    Output shape:
        ``(B, num_classes)`` float32 logits.

    Reference:
        Deng et al., "Sub-center ArcFace", ECCV 2020; Henkel, "Efficient
        large-scale image retrieval with deep feature orthogonality and
        hybrid-swin-transformers", 2021.
    """

    def __init__(
        self, num_classes: int, k: int = 3, margins: float | Sequence[float] = 0.3, scale: float = 30.0, **kwargs
    ):
        if int(k) < 1:
            raise ConfigError(f"k must be >= 1, got {k}")
        super().__init__(num_classes, scale, num_centers=int(k), **kwargs)
        self.k = int(k)
        if isinstance(margins, (int, float)):
            values = np.full((self.num_classes,), float(margins), dtype=np.float32)
        else:
            values = np.asarray(margins, dtype=np.float32).reshape(-1)
            if values.shape != (self.num_classes,):
                raise ConfigError(f"margins needs {self.num_classes} values (one per class), got {values.size}")
        if np.any(values < 0) or np.any(values >= math.pi / 2) or not np.all(np.isfinite(values)):
            raise ConfigError("every margin must be finite and in [0, pi/2)")
        self.margins = margins if isinstance(margins, (int, float)) else [float(m) for m in values]
        self._margin_values = values

    def call(self, inputs):
        embeddings, labels = self._split(inputs)
        cos = self._cosine(embeddings)
        onehot = ops.one_hot(labels, self.num_classes, dtype="float32")
        m = ops.take(ops.convert_to_tensor(self._margin_values), labels)
        m = ops.expand_dims(m, -1)
        target = _add_angular_margin(ops.sum(cos * onehot, axis=-1, keepdims=True), m)
        return self.scale * (cos + onehot * (target - cos))

    def get_config(self):
        config = super().get_config()
        config.update({"k": self.k, "margins": self.margins})
        return config
