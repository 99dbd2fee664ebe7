"""Synchronized batch norm with one all-reduce per layer and a gradient that traces in linear time.

keras-hub builds the backbone's ``BatchNormalization`` layers without ``synchronized``. Keras' synchronized
moments (TensorFlow backend) issue three ``ReplicaContext.all_reduce`` calls per layer: the sum, the sum of
squares and the count. The gradient of ``all_reduce`` is another ``all_reduce`` wrapped in
``tf.custom_gradient``, and in a traced step each such call walks the graph from its output back to its input,
which under ``MirroredStrategy`` crosses every replica's forward and backward graph: tracing time grows with the
number of BN layers times the size of the graph, and the first step of a two-replica ResNet-50 spends minutes
in it (``benchmarks/sync_bn.py``).

:func:`enable_sync_batch_norm` switches a model's BN layers to moments computed from a single sum over replicas
of ``[sum, sum of squares, count]`` (the same sums, so the same moments as Keras), whose gradient is a plain
merged sum of the incoming gradients over the replicas.
"""

from __future__ import annotations

import types

import keras
import tensorflow as tf


def synchronized_moments(layer: keras.layers.BatchNormalization, inputs, mask=None):
    """Mean and variance of ``inputs`` over the layer's reduction axes and over every replica in sync.

    One all-reduce of the per-channel sum, the per-channel sum of squares and the element count; the variance
    is ``E[x^2] - E[x]^2`` clipped at 0, as Keras computes it. Outside a replica context, with a mask or when
    the layer is not synchronized, Keras' own moments are used.
    """
    context = tf.distribute.get_replica_context()
    if mask is not None or not layer.synchronized or context is None:
        return type(layer)._moments(layer, inputs, mask)
    axes = layer._reduction_axes
    x = tf.cast(inputs, tf.float32)
    channels = x.shape[layer.axis]
    count = tf.cast(tf.reduce_prod(tf.gather(tf.shape(x), axes)), tf.float32)
    local = tf.concat([tf.reduce_sum(x, axes), tf.reduce_sum(tf.square(x), axes), count[None]], axis=0)
    total = _sum_over_replicas(context, local)
    mean = tf.math.divide_no_nan(total[:channels], total[-1])
    mean_of_squares = tf.math.divide_no_nan(total[channels : 2 * channels], total[-1])
    variance = tf.maximum(mean_of_squares - tf.square(mean), 0.0)
    return tf.cast(mean, inputs.dtype), tf.cast(variance, inputs.dtype)


def _merged_sum(context: tf.distribute.ReplicaContext, value: tf.Tensor) -> tf.Tensor:
    """The sum of ``value`` over the replicas, through ``merge_call`` and ``reduce_to`` (no gradient of its own)."""

    def merge(strategy, per_replica):
        return strategy.extended.reduce_to(tf.distribute.ReduceOp.SUM, per_replica, destinations=per_replica)

    return context.merge_call(merge, args=(value,))


def _sum_over_replicas(context: tf.distribute.ReplicaContext, value: tf.Tensor) -> tf.Tensor:
    """The sum of ``value`` over the replicas; its gradient is the sum of the incoming gradients over the replicas.

    ``ReplicaContext.all_reduce`` computes the same, but its gradient is a second ``all_reduce`` wrapped in
    ``tf.custom_gradient``, which, while the step is traced, walks the graph from its output back to its input:
    through every replica's backward and forward graph, once per BN layer. Here the gradient is a plain merged sum.
    """

    @tf.custom_gradient
    def all_sum(x):
        return _merged_sum(context, x), lambda dy: _merged_sum(context, dy)

    return all_sum(value)


def batch_norm_layers(model: keras.Model) -> list[keras.layers.BatchNormalization]:
    """Every ``BatchNormalization`` layer of ``model``, nested ones (the keras-hub backbone's) included."""
    layers = model._flatten_layers(include_self=False, recursive=True)
    return [layer for layer in layers if isinstance(layer, keras.layers.BatchNormalization)]


def enable_sync_batch_norm(model: keras.Model) -> int:
    """Makes every ``BatchNormalization`` layer of ``model`` all-reduce its batch statistics, once per call.

    The layers keep their class and weights; ``synchronized`` is set (so a saved config says so) and the
    layer's moments come from :func:`synchronized_moments`.

    Returns:
        The number of layers switched.
    """
    layers = batch_norm_layers(model)
    for layer in layers:
        layer.synchronized = True
        # An attribute of this instance only: Keras' tracking ignores plain functions.
        object.__setattr__(layer, "_moments", types.MethodType(synchronized_moments, layer))
    return len(layers)
