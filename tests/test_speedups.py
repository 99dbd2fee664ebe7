"""The inference and training shortcuts compute what the plain layers compute.

- MultiAtrous' dilated 3x3 convolutions as sliced per-tap products
  (``dolg_tf.layers.multi_atrous.dilated_conv3x3_same``), against a numpy
  convolution written out tap by tap over a zero-padded map, and against Keras'
  own ``Conv2D(dilation_rate=...)`` on the same weights (values and gradients,
  float32 and mixed precision, map sizes smaller and larger than the dilation,
  sizes known only at run time).
- Batch norms folded into convolutions (``dolg_tf.model.fold``), against the
  unfolded model, and in the exported SavedModel.
"""

import io

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from dolg_tf.errors import ConfigError
from dolg_tf.layers import MultiAtrous, multi_atrous
from dolg_tf.layers.multi_atrous import dilated_conv3x3_same
from dolg_tf.model import build_dolg
from dolg_tf.model.fold import FoldedBatchNorm, fold_batch_norms, foldable_pairs


def numpy_dilated_conv(x, kernel, bias, rate):
    """3x3 convolution, dilation ``rate``, "same" zero padding: pad by ``rate``, then sum the nine shifted products."""
    _, h, w, _ = x.shape
    padded = np.pad(x.astype(np.float64), ((0, 0), (rate, rate), (rate, rate), (0, 0)))
    out = np.zeros(x.shape[:3] + (kernel.shape[-1],))
    for i in range(3):
        for j in range(3):
            window = padded[:, i * rate : i * rate + h, j * rate : j * rate + w, :]
            out += window @ kernel[i, j].astype(np.float64)
    return out + bias


@pytest.fixture(autouse=True)
def _fast_path_restored():
    yield
    multi_atrous.set_fast_path(True)


# (height, width, rate): odd sizes, smaller than, equal to, and larger than the dilation
SIZES = [(1, 1, 6), (5, 7, 6), (6, 13, 6), (3, 19, 12), (11, 9, 4), (17, 21, 6), (25, 7, 18)]


@pytest.mark.parametrize("h, w, rate", SIZES)
def test_dilated_conv_matches_numpy(rng, h, w, rate):
    x = rng.normal(size=(2, h, w, 5)).astype("float32")
    kernel = rng.normal(size=(3, 3, 5, 4)).astype("float32")
    bias = rng.normal(size=(4,)).astype("float32")
    out = np.asarray(dilated_conv3x3_same(tf.constant(x), tf.constant(kernel), tf.constant(bias), rate))
    np.testing.assert_allclose(out, numpy_dilated_conv(x, kernel, bias, rate), atol=1e-5, rtol=1e-5)


def test_dilated_conv_with_run_time_sizes_matches_keras_conv(rng):
    conv = keras.layers.Conv2D(6, 3, padding="same", dilation_rate=5)
    conv.build((None, None, None, 3))
    fn = tf.function(
        lambda x: dilated_conv3x3_same(x, conv.kernel, conv.bias, 5),
        input_signature=[tf.TensorSpec((None, None, None, 3), tf.float32)],
    )
    for h, w in [(3, 4), (9, 5), (14, 23)]:
        x = rng.normal(size=(1, h, w, 3)).astype("float32")
        np.testing.assert_allclose(fn(x).numpy(), conv(x).numpy(), atol=1e-5, rtol=1e-5)


def _layer_pair(rng, rates=(2, 5, 7)):
    layer = MultiAtrous(filters=6, dilation_rates=rates, out_filters=7)
    layer.build((None, None, None, 4))
    for weight in layer.weights:
        weight.assign(rng.normal(0, 0.5, size=weight.shape).astype("float32"))
    return layer


def _both_ways(layer, x, training_fn):
    results = []
    for enabled in (True, False):
        multi_atrous.set_fast_path(enabled)
        results.append(training_fn(layer, x))
    return results


def test_multi_atrous_values_and_gradients_match_keras_conv_path(rng):
    layer = _layer_pair(rng)
    x = tf.constant(rng.normal(size=(2, 9, 6, 4)).astype("float32"))
    weights = tf.constant(rng.normal(size=(2, 9, 6, 7)).astype("float32"))

    def value_and_grads(layer, x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
            loss = tf.reduce_sum(y * weights)
        grads = tape.gradient(loss, [x] + [v.value for v in layer.trainable_variables])
        return [y.numpy()] + [g.numpy() for g in grads]

    taps, keras_path = _both_ways(layer, x, value_and_grads)
    assert len(taps) == 2 + 2 * 6  # output, input gradient, kernel + bias of six convs
    for name, a, b in zip(["output", "d/dx"] + [v.path for v in layer.trainable_variables], taps, keras_path):
        assert np.abs(b).max() > 0, name
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4, err_msg=name)


def test_multi_atrous_trains_to_the_same_weights_as_keras_conv_path(rng):
    """Ten SGD steps (momentum, Nesterov) through ``model.fit``: the per-tap path reads its convolutions' variables
    without calling those layers, so this checks that the optimizer updates them as it does through the layers."""
    x = rng.normal(size=(8, 9, 6, 4)).astype("float32")
    y = rng.normal(size=(8, 5)).astype("float32")
    start = [w.numpy() for w in _layer_pair(rng).weights]

    def train(enabled: bool) -> list[np.ndarray]:
        multi_atrous.set_fast_path(enabled)
        layer = MultiAtrous(filters=6, dilation_rates=(2, 5, 7), out_filters=7)
        model = keras.Sequential([keras.Input((None, None, 4)), layer, keras.layers.GlobalAveragePooling2D()])
        model.add(keras.layers.Dense(5, kernel_initializer="ones"))
        for weight, value in zip(layer.weights, start):
            weight.assign(value)
        model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9, nesterov=True), loss="mse")
        model.fit(x, y, batch_size=4, epochs=5, shuffle=False, verbose=0)
        return [w.numpy() for w in layer.weights]

    taps, keras_path = train(True), train(False)
    moved = [np.abs(a - s).max() for a, s in zip(taps, start)]
    assert min(moved) > 1e-4  # every variable of the layer was updated
    for a, b, s in zip(taps, keras_path, start):
        np.testing.assert_allclose(a - s, b - s, atol=1e-5, rtol=1e-3)


def test_multi_atrous_graph_has_no_space_to_batch(rng):
    layer = _layer_pair(rng)
    spec = tf.TensorSpec((None, None, None, 4), tf.float32)
    op_types = []
    for enabled in (True, False):
        multi_atrous.set_fast_path(enabled)
        graph = tf.function(layer.call).get_concrete_function(spec).graph
        op_types.append({op.type for op in graph.get_operations()})
    assert "SpaceToBatchND" not in op_types[0]
    assert "SpaceToBatchND" in op_types[1]


@pytest.mark.parametrize("policy, tol", [("mixed_float16", 2e-2), ("mixed_bfloat16", 1e-1)])
def test_multi_atrous_mixed_precision_matches_float32_numpy(rng, policy, tol):
    reference = _layer_pair(rng, rates=(3, 8, 2))
    x = rng.normal(size=(1, 7, 10, 4)).astype("float32")
    values = {w.path: np.asarray(w) for w in reference.weights}

    def branch(conv, rate=None):
        kernel, bias = values[conv.kernel.path], values[conv.bias.path]
        if rate is None:
            return lambda v: v.astype(np.float64) @ kernel[0, 0] + bias
        return lambda v: numpy_dilated_conv(v, kernel, bias, rate)

    pooled = np.maximum(branch(reference.pool_conv)(x.mean(axis=(1, 2), keepdims=True)), 0)
    parts = [np.broadcast_to(pooled, x.shape[:3] + (6,)), branch(reference.conv_1x1)(x)]
    parts += [branch(c, r)(x) for c, r in zip(reference.atrous_convs, reference.dilation_rates)]
    expected = np.maximum(branch(reference.project)(np.concatenate(parts, axis=-1)), 0)

    keras.config.set_dtype_policy(policy)
    layer = MultiAtrous(filters=6, dilation_rates=(3, 8, 2), out_filters=7)
    layer.build((None, None, None, 4))
    for weight in layer.weights:
        weight.assign(values[weight.path.replace(layer.name, reference.name, 1)])
    out = layer(x)
    assert out.dtype.name == policy.split("_")[1]
    scale = np.abs(expected).max()
    np.testing.assert_allclose(np.asarray(tf.cast(out, tf.float32)) / scale, expected / scale, atol=tol)


@pytest.fixture(scope="module")
def tiny_model():
    keras.utils.set_random_seed(7)
    model = build_dolg("tiny")
    rng = np.random.default_rng(3)
    for weight in model.weights:  # non-trivial batch-norm statistics, so folding has something to do
        if "moving_variance" in weight.path:
            weight.assign(rng.uniform(0.5, 2.0, weight.shape))
        elif "moving_mean" in weight.path or "beta" in weight.path:
            weight.assign(rng.normal(0.0, 0.2, weight.shape))
        elif "gamma" in weight.path:
            weight.assign(rng.uniform(0.5, 1.5, weight.shape))
    return model


def test_tiny_model_descriptors_match_keras_conv_path(tiny_model, rng):
    # 160x224 input -> a 10x14 res4 map: the dilations 2, 4, 6 all overlap it partly.
    x = rng.uniform(0, 255, (2, 160, 224, 3)).astype("float32")
    out = _both_ways(tiny_model, x, lambda m, v: m(v, training=False).numpy())
    np.testing.assert_allclose(out[0], out[1], atol=1e-5)


def numpy_batch_norm_of_conv(conv, bn, x):
    """``bn(conv(x))`` of a 1x1 convolution, in float64 numpy, from the unfolded layers' weights."""
    y = x.astype(np.float64) @ np.asarray(conv.kernel)[0, 0]
    if conv.use_bias:
        y = y + np.asarray(conv.bias)
    inv = np.asarray(bn.gamma) / np.sqrt(np.asarray(bn.moving_variance, dtype=np.float64) + bn.epsilon)
    return (y - np.asarray(bn.moving_mean)) * inv + np.asarray(bn.beta)


def test_fold_finds_every_backbone_batch_norm_and_matches_numpy(tiny_model, rng):
    pairs = foldable_pairs(tiny_model)
    backbone_bns = [layer for layer in tiny_model.backbone.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(backbone_bns) > 10
    assert {id(bn) for bn in pairs.values()} == {id(bn) for bn in backbone_bns}
    folded = fold_batch_norms(tiny_model)
    folded_backbone = folded.get_layer("backbone")
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in folded_backbone.layers)
    assert sum(isinstance(layer, FoldedBatchNorm) for layer in folded_backbone.layers) == len(backbone_bns)
    # one folded 1x1 conv checked against numpy maths on the original layers
    conv = next(
        layer
        for layer in tiny_model.backbone.layers
        if isinstance(layer, keras.layers.Conv2D) and layer.kernel.shape[:2] == (1, 1) and id(layer) in pairs
    )
    new = folded_backbone.get_layer(f"{conv.name}_folded")
    x = rng.normal(size=(1, 3, 3, conv.kernel.shape[2])).astype("float32")
    np.testing.assert_allclose(new(x).numpy(), numpy_batch_norm_of_conv(conv, pairs[id(conv)], x), atol=1e-5)


def test_folded_model_matches_unfolded(tiny_model, rng):
    folded = fold_batch_norms(tiny_model)
    x = rng.uniform(0, 255, (2, 96, 128, 3)).astype("float32")
    expected = tiny_model(x, training=False).numpy()
    np.testing.assert_allclose(folded(x, training=False).numpy(), expected, atol=1e-5)
    assert np.abs(expected).max() > 0.05


def test_fold_refuses_mixed_precision():
    keras.config.set_dtype_policy("mixed_float16")
    layer_in = keras.Input((None, None, 3))
    out = keras.layers.BatchNormalization()(keras.layers.Conv2D(2, 1)(layer_in))
    with pytest.raises(ConfigError, match="float32"):
        fold_batch_norms(keras.Model(layer_in, out))


@pytest.mark.integration
def test_export_is_folded_and_matches_unfolded_model(tiny_export_factory):
    # The session's tiny export (tests/conftest.py): build_dolg("tiny") after set_random_seed(TINY_SEED).
    from dolg_tf.export import embed_reference, read_export_metadata
    from dolg_tf.export.audit import op_types
    from dolg_tf.export.reader import read_meta_graph
    from tests.conftest import TINY_SEED

    path = tiny_export_factory()
    keras.utils.set_random_seed(TINY_SEED)
    model = build_dolg("tiny")
    loaded = tf.saved_model.load(path)
    graph = read_meta_graph(path).object_graph_def
    names = [node.variable.name for node in graph.nodes if node.WhichOneof("kind") == "variable"]
    # The backbone's batch norms are gone (folded); the local branch's BN, inside a layer, stays.
    assert sum("moving_mean" in n for n in names) == 1, names
    assert sum("_folded" in n for n in names) == 2 * len(foldable_pairs(model)), names
    assert "SpaceToBatchND" not in op_types(path)
    rng = np.random.default_rng(5)
    images = []
    for h, w in [(64, 80), (72, 64)]:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
        images.append(buf.getvalue())
    got = loaded.signatures["serving_default"](images=tf.constant(images))["embedding"].numpy()
    expected = embed_reference(model, images, read_export_metadata(path)["export_config"])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
