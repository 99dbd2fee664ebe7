"""The checks every DOLG layer passes, in the spirit of Keras' own ``run_layer_test``.

:func:`run_layer_test` takes a layer class, its constructor arguments and small eager inputs, and checks:

- config: ``get_config`` / ``from_config`` and Keras (de)serialisation through JSON give the same config;
- shapes: a symbolic call with unknown batch (and, for 4D inputs, unknown height and width) agrees with
  ``compute_output_shape``, and so does an eager call on the given inputs;
- training: one SGD step gives a finite gradient for every trainable weight and changes every one of them
  (a layer without weights must pass finite, non-zero gradients back to its float inputs);
- ``.keras`` save / load with ``safe_mode`` gives identical outputs;
- precision: under each policy of :data:`POLICIES` (passed as the layer's ``dtype``) the variables stay
  float32, the output has the expected dtype, is finite and close to the float32 output of the same weights,
  and a training step still gives finite gradients.

The value of what a layer computes is checked by its own tests, against numpy or an invariant.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

POLICIES = ("float32", "mixed_float16", "mixed_bfloat16")
# Largest |mixed - float32| allowed, relative to the float32 output's largest magnitude.
_TOLERANCE = {"float32": 1e-6, "mixed_float16": 1e-2, "mixed_bfloat16": 6e-2}


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _single_or_list(items: list):
    return items[0] if len(items) == 1 else items


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
    in_shapes = (
        [tuple(t.shape) for t in symbolic_inputs] if isinstance(symbolic_inputs, list) else tuple(symbolic_inputs.shape)
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
        loss = _loss(out, loss_fn)
    grads = tape.gradient(loss, layer.trainable_variables)
    for var, grad in zip(layer.trainable_variables, grads):
        assert grad is not None, f"no gradient for {var.path}"
        assert np.all(np.isfinite(grad.numpy())), f"non-finite gradient for {var.path}"
    optimizer.apply_gradients(zip(grads, layer.trainable_variables))
    for var, old in zip(layer.trainable_variables, before):
        assert not np.allclose(var.numpy(), old), f"{var.path} did not change after one step"


def check_input_gradients(layer: keras.layers.Layer, inputs, loss_fn=None) -> None:
    """A layer without weights passes finite, non-zero gradients back to each float input."""
    tensors = [tf.constant(x) for x in _as_list(inputs)]
    floats = [t for t in tensors if t.dtype.is_floating]
    assert floats, "no float input to differentiate"
    with tf.GradientTape() as tape:
        tape.watch(floats)
        loss = _loss(layer(_single_or_list(tensors), training=True), loss_fn)
    for i, grad in enumerate(tape.gradient(loss, floats)):
        assert grad is not None, f"no gradient for float input {i}"
        grad = np.asarray(grad, np.float32)
        assert np.all(np.isfinite(grad)) and np.abs(grad).sum() > 0, f"bad gradient for float input {i}"


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


def _loss(out, loss_fn):
    if loss_fn is not None:
        return tf.cast(loss_fn(out), tf.float32)
    return tf.add_n([tf.reduce_mean(tf.square(tf.cast(o, tf.float32))) for o in _as_list(out)])


def _symbolic_specs(inputs: list[np.ndarray]) -> list[tuple[tuple, str]]:
    """(shape with batch unknown, and height and width unknown for 4D inputs; dtype) of each input."""
    specs = []
    for x in inputs:
        shape = (None, None, None, x.shape[-1]) if x.ndim == 4 else (None, *x.shape[1:])
        specs.append((shape, str(x.dtype)))
    return specs


def _shapes(out) -> list[tuple]:
    return [tuple(o.shape) for o in _as_list(out)]


def _shape_list(shapes) -> list[tuple]:
    """One shape or several (a list / tuple of shapes) as a list of tuples."""
    if isinstance(shapes, (list, tuple)) and shapes and all(isinstance(s, (list, tuple)) for s in shapes):
        return [tuple(s) for s in shapes]
    return [tuple(shapes)]


def run_layer_test(
    layer_cls: type[keras.layers.Layer],
    init_kwargs: dict[str, Any],
    input_data: np.ndarray | Sequence[np.ndarray],
    *,
    tmp_path,
    expected_output_shape: tuple | Sequence[tuple] | None = None,
    output_dtype: str | None = None,
    loss_fn: Callable | None = None,
    policies: Sequence[str] = POLICIES,
) -> None:
    """Runs every check of this module on ``layer_cls(**init_kwargs)``.

    Args:
        layer_cls: the layer class.
        init_kwargs: constructor arguments (without ``dtype``: the precision checks pass each policy).
        input_data: one array, or a list of arrays for a layer called on a list.
        tmp_path: a folder for the ``.keras`` file.
        expected_output_shape: the eager output's shape (a list of shapes for several outputs).
        output_dtype: the output dtype whatever the policy (e.g. ``"float32"`` for layers that compute and
            return float32); None means the policy's compute dtype.
        loss_fn: maps the output to a scalar loss; the mean square of every output by default.
        policies: the dtype policies to check.
    """
    inputs = [np.asarray(x) for x in _as_list(input_data)]
    feed = _single_or_list(inputs)
    specs = _symbolic_specs(inputs)

    check_config_round_trip(layer_cls(**init_kwargs))

    symbolic = [keras.Input(shape=s[1:], batch_size=None, dtype=d) for s, d in specs]
    check_symbolic_shape(layer_cls(**init_kwargs), _single_or_list(symbolic))

    layer = layer_cls(**init_kwargs)
    out = layer(feed)
    in_shapes = [tuple(x.shape) for x in inputs]
    assert _shapes(out) == _shape_list(layer.compute_output_shape(_single_or_list(in_shapes)))
    if expected_output_shape is not None:
        assert _shapes(out) == _shape_list(expected_output_shape)
    reference = [np.asarray(o, np.float32) for o in _as_list(out)]
    weights = layer.get_weights()

    if layer.trainable_weights:
        check_training_step(layer, feed, loss_fn)
    else:
        check_input_gradients(layer, feed, loss_fn)

    check_save_load(layer_cls(**init_kwargs), specs, inputs, tmp_path)

    for policy in policies:
        mixed = layer_cls(**init_kwargs, dtype=policy)
        mixed.build(_single_or_list(in_shapes))
        mixed.set_weights(weights)  # the float32 layer's weights: same function, other precision
        got = _as_list(mixed(feed))
        for var in mixed.weights:
            assert var.dtype == "float32", f"{policy}: {var.path} is {var.dtype}"
        want_dtype = output_dtype or keras.DTypePolicy(policy).compute_dtype
        for i, (o, ref) in enumerate(zip(got, reference)):
            assert o.dtype == want_dtype, f"{policy}: output {i} is {o.dtype}, expected {want_dtype}"
            o = np.asarray(tf.cast(o, tf.float32))
            assert np.all(np.isfinite(o)), f"{policy}: output {i} is not finite"
            scale = max(float(np.abs(ref).max()), 1e-3)
            error = float(np.abs(o - ref).max()) / scale
            assert error <= _TOLERANCE[policy], f"{policy}: output {i} differs from float32 by {error:.2e} (relative)"
        if mixed.trainable_weights:
            with tf.GradientTape() as tape:
                loss = _loss(mixed(feed, training=True), loss_fn)
            grads = tape.gradient(loss, mixed.trainable_weights)
            for var, grad in zip(mixed.trainable_weights, grads):
                assert grad is not None and np.all(np.isfinite(np.asarray(grad))), f"{policy}: gradient of {var.path}"
