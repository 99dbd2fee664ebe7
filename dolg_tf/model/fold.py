"""Batch normalisation folded into the preceding convolution, for inference graphs.

Keras 3's ``BatchNormalization`` on TensorFlow computes inference as separate
multiply and add passes over the activation (it does not use
``FusedBatchNormV3``), so Grappler cannot fuse it into the convolution before
it. With the statistics frozen, ``BN(conv(x))`` is itself a convolution with
kernel ``w * s`` and bias ``(b - mean) * s + beta``, ``s = gamma / sqrt(var +
eps)`` per output channel: one pass fewer per layer pair, and the bias (and a
following ReLU) fuse into the convolution. Used by the export; training keeps
the batch norms.
"""

from __future__ import annotations

import keras
import numpy as np

from dolg_tf.errors import ConfigError


class FoldedBatchNorm(keras.layers.Layer):
    """What a folded BatchNormalization becomes: its input, unchanged (accepts BN's call arguments)."""

    def call(self, inputs, training=None, mask=None):
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape


def _layers(model: keras.Model):
    """Every layer of ``model`` and of the functional models nested in it."""
    stack = [model]
    while stack:
        for layer in stack.pop().layers:
            if isinstance(layer, keras.Model):
                stack.append(layer)
            else:
                yield layer


def foldable_pairs(model: keras.Model) -> dict[int, keras.layers.Layer]:
    """Maps ``id(conv)`` to its BatchNormalization for every Conv2D -> BN pair that can be folded.

    A pair qualifies when the BN normalises the last axis and its input is
    the output of a Conv2D without activation that no other layer (and no
    model output) reads. Nested functional models are searched too.
    """
    layers = list(_layers(model))
    readers: dict[int, int] = {}
    for layer in layers:
        for tensor in keras.tree.flatten(layer.input):
            readers[id(tensor)] = readers.get(id(tensor), 0) + 1
    stack = [model]
    while stack:
        current = stack.pop()
        stack += [layer for layer in current.layers if isinstance(layer, keras.Model)]
        for tensor in keras.tree.flatten(current.outputs):
            readers[id(tensor)] = readers.get(id(tensor), 0) + 1
    convs = {
        id(layer.output): layer
        for layer in layers
        if isinstance(layer, keras.layers.Conv2D) and layer.activation is keras.activations.linear
    }
    pairs: dict[int, keras.layers.Layer] = {}
    for layer in layers:
        if isinstance(layer, keras.layers.BatchNormalization) and layer.axis in (-1, 3):
            conv = convs.get(id(layer.input))
            if conv is not None and readers.get(id(layer.input)) == 1:
                pairs[id(conv)] = layer
    return pairs


def folded_conv_weights(conv: keras.layers.Conv2D, bn: keras.layers.BatchNormalization):
    """The kernel and bias of the convolution equal to ``bn(conv(x))`` at inference, computed in float64."""
    kernel = np.asarray(conv.kernel, dtype=np.float64)
    bias = np.asarray(conv.bias, dtype=np.float64) if conv.use_bias else np.zeros(kernel.shape[-1])
    mean = np.asarray(bn.moving_mean, dtype=np.float64)
    var = np.asarray(bn.moving_variance, dtype=np.float64)
    gamma = np.asarray(bn.gamma, dtype=np.float64) if bn.scale else np.ones_like(mean)
    beta = np.asarray(bn.beta, dtype=np.float64) if bn.center else np.zeros_like(mean)
    scale = gamma / np.sqrt(var + bn.epsilon)
    return (kernel * scale).astype(np.float32), ((bias - mean) * scale + beta).astype(np.float32)


def fold_batch_norms(model: keras.Model) -> keras.Model:
    """An inference-only copy of ``model`` with every foldable BatchNormalization merged into its Conv2D.

    The copy is a functional model with the same inputs and outputs; the
    layers that are not folded are shared with ``model`` (not copied), the
    folded convolutions are new ``Conv2D`` layers with a bias holding the
    merged weights (a snapshot: later changes to ``model``'s weights do not
    reach them), and each folded BN becomes a :class:`FoldedBatchNorm`
    (which passes its input through). Batch norms that follow something
    else (or live inside a subclassed layer) stay as they are.

    Args:
        model: a built functional Keras model (such as a DOLG model), in float32.

    Returns:
        A ``keras.Model`` to call with ``training=False`` only.

    Raises:
        ConfigError: the model does not compute in float32 (fold a float32
            copy; folded weights are rounded once, in float32).
    """
    if getattr(model, "compute_dtype", "float32") != "float32":
        raise ConfigError(f"fold_batch_norms expects a float32 model, got compute dtype {model.compute_dtype!r}")
    pairs = foldable_pairs(model)
    folded_bns = {id(bn) for bn in pairs.values()}

    def clone(layer):
        if id(layer) in pairs:
            config = layer.get_config()
            config.update(use_bias=True, name=f"{layer.name}_folded")
            conv = keras.layers.Conv2D.from_config(config)
            conv.build(layer.input.shape)
            conv.set_weights(list(folded_conv_weights(layer, pairs[id(layer)])))
            return conv
        if id(layer) in folded_bns:
            return FoldedBatchNorm(name=f"{layer.name}_folded", dtype=layer.dtype_policy)
        return layer

    wrapper = keras.Model(model.inputs, model.outputs, name=model.name)
    return keras.models.clone_model(wrapper, clone_function=clone, recursive=True)


_FOLD_FOR_EXPORT = True


def set_export_folding(enabled: bool) -> None:
    """Whether :func:`inference_model` folds (True, the default); benchmarks switch it off to compare."""
    global _FOLD_FOR_EXPORT
    _FOLD_FOR_EXPORT = bool(enabled)


def inference_model(model):
    """``model`` with its batch norms folded where that is exact and possible, else ``model`` itself.

    The export calls this: a float32 functional Keras model (a DOLG model)
    gets :func:`fold_batch_norms`; a mixed-precision or subclassed model is
    returned unchanged, and so is every model after
    ``set_export_folding(False)``.
    """
    if not _FOLD_FOR_EXPORT or not isinstance(model, keras.Model):
        return model
    if getattr(model, "compute_dtype", None) != "float32":
        return model
    try:
        inputs = model.inputs  # subclassed models have no symbolic inputs
    except AttributeError:
        inputs = None
    if not inputs or not foldable_pairs(model):
        return model
    return fold_batch_norms(model)
