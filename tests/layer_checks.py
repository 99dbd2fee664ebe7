"""Checks every DOLG layer must pass (config, symbolic shape, eager, training, save/load)."""

from __future__ import annotations

import json

import keras
import numpy as np
import tensorflow as tf


def _as_list(x):
    return list(x) if isinstance(x, (list, tuple)) else [x]


def check_config_round_trip(layer: keras.layers.Layer) -> keras.layers.Layer:
    config = layer.get_config()
    restored = type(layer).from_config(json.loads(json.dumps(config)))
    assert restored.get_config() == config
    serialized = keras.saving.serialize_keras_object(layer)
    again = keras.saving.deserialize_keras_object(json.loads(json.dumps(serialized)))
    assert type(again) is type(layer)
    assert again.get_config() == config
    return restored


def check_symbolic_shape(layer: keras.layers.Layer, symbolic_inputs) -> None:
    out = layer(symbolic_inputs)
    in_shapes = [tuple(t.shape) for t in symbolic_inputs] if isinstance(symbolic_inputs, list) else tuple(
        symbolic_inputs.shape
    )
    expected = layer.compute_output_shape(in_shapes)
    if isinstance(out, (list, tuple)):
        assert [tuple(o.shape) for o in out] == [tuple(e) for e in expected]
    else:
        assert tuple(out.shape) == tuple(expected)


def check_training_step(layer: keras.layers.Layer, inputs, loss_fn=None) -> None:
    """One SGD step changes every trainable weight and gives finite values."""
    before = [v.numpy().copy() for v in layer.trainable_variables]
    assert before, "layer has no trainable weights"
    optimizer = keras.optimizers.SGD(learning_rate=0.1)
    with tf.GradientTape() as tape:
        out = layer(inputs, training=True)
        loss = loss_fn(out) if loss_fn else tf.add_n([tf.reduce_mean(tf.square(o)) for o in _as_list(out)])
    grads = tape.gradient(loss, layer.trainable_variables)
    for var, grad in zip(layer.trainable_variables, grads):
        assert grad is not None, f"no gradient for {var.path}"
        assert np.all(np.isfinite(grad.numpy())), f"non-finite gradient for {var.path}"
    optimizer.apply_gradients(zip(grads, layer.trainable_variables))
    for var, old in zip(layer.trainable_variables, before):
        assert not np.allclose(var.numpy(), old), f"{var.path} did not change after one step"


def check_save_load(layer: keras.layers.Layer, input_specs, eager_inputs, tmp_path) -> None:
    """A model holding the layer survives `.keras` save/load with safe_mode on."""
    symbolic = [keras.Input(shape=s[1:], batch_size=None, dtype=d) for s, d in input_specs]
    out = layer(symbolic if len(symbolic) > 1 else symbolic[0])
    model = keras.Model(symbolic if len(symbolic) > 1 else symbolic[0], out)
    path = tmp_path / f"{type(layer).__name__}.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    feed = eager_inputs if len(symbolic) > 1 else eager_inputs[0]
    for a, b in zip(_as_list(model(feed)), _as_list(loaded(feed))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=0)
