"""Per-layer tests: config round trip, symbolic shapes, eager, training step, save/load, values."""

import inspect
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import dolg_tf.layers
from dolg_tf.errors import ConfigError, InputShapeError
from dolg_tf.layers import (
    ArcFace,
    CurricularFace,
    GeM,
    ImageNormalization,
    L2Normalize,
    LocalBranch,
    MultiAtrous,
    OrthogonalFusion,
    SubCenterArcFace,
    dynamic_margins,
)
from tests.layer_checks import check_config_round_trip, check_save_load, check_symbolic_shape, run_layer_test


def _uniform(rng, shape, low=0.0, high=1.0):
    return rng.uniform(low, high, size=shape).astype("float32")


# ---------------------------------------------------------------- the harness, for every layer
_LABELS = np.array([0, 3, 6, 3, 1], "int32")


def _cross_entropy(logits):
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=_LABELS, logits=logits))


def _head_inputs(rng):
    return [_uniform(rng, (5, 12), -1, 1), _LABELS]


_MARGINS = [float(m) for m in np.linspace(0.1, 0.4, 7)]
# (layer class, constructor arguments, inputs from an rng, eager output shape(s), extra run_layer_test arguments)
CONTRACT_CASES = {
    "gem": (GeM, dict(p=3.0), lambda r: _uniform(r, (2, 5, 7, 16), 0.1, 2.0), (2, 16), {}),
    "gem-frozen-p": (GeM, dict(p=2.5, trainable_p=False), lambda r: _uniform(r, (2, 5, 7, 16), 0.1, 2.0), (2, 16), {}),
    "multi_atrous": (
        MultiAtrous, dict(filters=8, dilation_rates=(1, 2, 3), out_filters=12),
        lambda r: _uniform(r, (2, 9, 7, 6), -1, 1), (2, 9, 7, 12), {},
    ),
    "local_branch": (
        LocalBranch, dict(filters=16, atrous_filters=4, dilation_rates=(1, 2)),
        lambda r: _uniform(r, (2, 5, 6, 8), -1, 1), (2, 5, 6, 16), {},
    ),
    "local_branch-attention-no_atrous": (
        LocalBranch, dict(filters=16, multi_atrous=False, return_attention=True),
        lambda r: _uniform(r, (2, 5, 6, 8), -1, 1), [(2, 5, 6, 16), (2, 5, 6, 1)], {},
    ),
    "orthogonal_fusion": (
        OrthogonalFusion, dict(epsilon=1e-6),
        lambda r: [_uniform(r, (2, 3, 5, 8), -1, 1), _uniform(r, (2, 8), -1, 1)], (2, 16), {},
    ),
    "image_normalization-bgr": (
        ImageNormalization, dict(mean=(0.406, 0.456, 0.485), std=(0.225, 0.224, 0.229), channel_order="bgr"),
        lambda r: _uniform(r, (2, 3, 4, 3), 0, 255), (2, 3, 4, 3), {},
    ),
    "l2_normalize": (L2Normalize, {}, lambda r: _uniform(r, (4, 10), -1, 1), (4, 10), dict(output_dtype="float32")),
    "arcface": (
        ArcFace, dict(num_classes=7, scale=30.0, margin=0.15), _head_inputs, (5, 7),
        dict(output_dtype="float32", loss_fn=_cross_entropy),
    ),
    "curricularface": (
        CurricularFace, dict(num_classes=7, scale=30.0, margin=0.15), _head_inputs, (5, 7),
        dict(output_dtype="float32", loss_fn=_cross_entropy),
    ),
    "subcenter_arcface": (
        SubCenterArcFace, dict(num_classes=7, k=3, margins=_MARGINS), _head_inputs, (5, 7),
        dict(output_dtype="float32", loss_fn=_cross_entropy),
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CONTRACT_CASES))
def test_layer_contract(case, rng, tmp_path):
    """Config round trip, symbolic and eager shapes, a training step, .keras save/load, each dtype policy."""
    cls, kwargs, make_inputs, shape, extra = CONTRACT_CASES[case]
    run_layer_test(cls, kwargs, make_inputs(rng), tmp_path=tmp_path, expected_output_shape=shape, **extra)


def test_every_layer_goes_through_the_harness():
    members = inspect.getmembers(dolg_tf.layers, inspect.isclass)
    layers = {obj for _, obj in members if issubclass(obj, keras.layers.Layer)}
    covered = {cls for cls, *_ in CONTRACT_CASES.values()}
    assert layers == covered, f"no contract case for {sorted(c.__name__ for c in layers - covered)}"


# ---------------------------------------------------------------- GeM
class TestGeM:
    def test_p1_is_mean_and_large_p_tends_to_max(self, rng):
        x = _uniform(rng, (3, 6, 5, 8), 0.5, 1.0)
        np.testing.assert_allclose(GeM(p=1.0)(x), x.mean(axis=(1, 2)), rtol=1e-5)
        near_max = np.asarray(GeM(p=400.0)(x))
        np.testing.assert_allclose(near_max, x.max(axis=(1, 2)), rtol=1e-2)
        mid = np.asarray(GeM(p=3.0)(x))
        assert np.all(mid >= x.mean(axis=(1, 2)) - 1e-6) and np.all(mid <= x.max(axis=(1, 2)) + 1e-6)
        expected = np.mean(np.maximum(x, 1e-6) ** 3, axis=(1, 2)) ** (1 / 3)
        np.testing.assert_allclose(mid, expected, rtol=1e-5)

    def test_p_is_trained_or_frozen(self):
        assert len(GeM().trainable_weights) == 0  # not built yet
        layer = GeM()
        layer.build((None, None, None, 4))
        assert [w.name for w in layer.trainable_weights] == ["p"]
        frozen = GeM(trainable_p=False)
        frozen.build((None, None, None, 4))
        assert frozen.trainable_weights == [] and len(frozen.non_trainable_weights) == 1

    def test_float16_policy_does_not_overflow(self):
        layer = GeM(p=3.0, dtype="mixed_float16")
        x = np.full((1, 4, 4, 2), 100.0, dtype="float32")  # 100^3 = 1e6 > float16 max
        out = layer(x)
        assert out.dtype == "float16"
        np.testing.assert_allclose(np.asarray(out, dtype="float32"), 100.0, rtol=1e-2)

    def test_rejects_wrong_rank(self):
        with pytest.raises(InputShapeError, match="4D"):
            GeM()(np.zeros((2, 8), "float32"))


# ---------------------------------------------------------------- MultiAtrous
class TestMultiAtrous:
    def _layer(self):
        return MultiAtrous(filters=8, dilation_rates=(1, 2, 3), out_filters=12)

    @pytest.mark.parametrize("hw", [(1, 1), (7, 5), (3, 11), (13, 13), (2, 40)])
    def test_keeps_any_spatial_size(self, rng, hw):
        layer = MultiAtrous(filters=4, dilation_rates=(6, 12, 18), out_filters=5)
        out = layer(_uniform(rng, (1, *hw, 3)))
        assert tuple(out.shape) == (1, *hw, 5)
        assert np.all(np.asarray(out) >= 0)  # ends with ReLU

    def test_value_on_1x1_input_matches_numpy_and_branch_order(self, rng):
        # On a 1x1 map a dilated 3x3 conv only sees its centre tap, so the whole
        # module reduces to dense maths we can write in numpy. This also pins the
        # official concatenation order [image pool, 1x1, d6, d12, d18].
        layer = MultiAtrous(filters=3, dilation_rates=(6, 12, 18), out_filters=4)
        x = _uniform(rng, (2, 1, 1, 5), -1, 1)
        layer(x)
        for w in layer.weights:
            w.assign(rng.normal(size=w.shape).astype("float32"))
        v = x[:, 0, 0, :]

        def dense(conv, inp, centre=False):
            kernel, bias = (np.asarray(t) for t in conv.weights)
            if centre:
                kernel = kernel[1:2, 1:2]
            return inp @ kernel[0, 0] + bias

        def relu(a):
            return np.maximum(a, 0)

        branches = [relu(dense(layer.pool_conv, v)), dense(layer.conv_1x1, v)]
        branches += [dense(c, v, centre=True) for c in layer.atrous_convs]
        expected = relu(dense(layer.project, np.concatenate(branches, axis=-1)))
        np.testing.assert_allclose(np.asarray(layer(x))[:, 0, 0, :], expected, rtol=1e-4, atol=1e-5)

    def test_image_pool_branch_follows_run_time_size(self, rng):
        layer = MultiAtrous(filters=2, dilation_rates=(1,), out_filters=3)

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 4], tf.float32)])
        def run(x):
            return layer(x)

        for hw in [(3, 4), (8, 2)]:
            assert tuple(run(_uniform(rng, (2, *hw, 4))).shape) == (2, *hw, 3)

    def test_bad_config(self):
        with pytest.raises(ConfigError, match="dilation_rates"):
            MultiAtrous(dilation_rates=(0, 6))
        with pytest.raises(ConfigError, match="positive"):
            MultiAtrous(filters=0)


# ---------------------------------------------------------------- LocalBranch
class TestLocalBranch:
    def _layer(self, **kw):
        kw.setdefault("filters", 16)
        kw.setdefault("atrous_filters", 4)
        kw.setdefault("dilation_rates", (1, 2))
        return LocalBranch(**kw)

    @pytest.mark.parametrize("multi_atrous", [True, False])
    def test_output_is_attention_times_unit_features(self, rng, multi_atrous):
        layer = self._layer(multi_atrous=multi_atrous, return_attention=True)
        local, attention = layer(_uniform(rng, (3, 4, 7, 8), -2, 2))
        local, attention = np.asarray(local), np.asarray(attention)
        assert attention.shape == (3, 4, 7, 1)
        assert np.all(attention >= 0)  # softplus
        np.testing.assert_allclose(np.linalg.norm(local, axis=-1), attention[..., 0], rtol=1e-4, atol=1e-6)

    def test_weights_without_multi_atrous(self):
        layer = self._layer(multi_atrous=False)
        layer.build((None, None, None, 8))
        paths = {w.path.split("/", 1)[1] for w in layer.weights}
        assert not any("multi_atrous" in p for p in paths)
        assert layer.attention_conv.kernel.shape == (1, 1, 16, 1)  # one attention map, not 16


# ---------------------------------------------------------------- OrthogonalFusion
class TestOrthogonalFusion:
    def test_gradients_reach_both_inputs(self, rng):
        local = tf.constant(_uniform(rng, (2, 3, 5, 8), -1, 1))
        glob = tf.constant(_uniform(rng, (2, 8), -1, 1))
        with tf.GradientTape() as tape:
            tape.watch([local, glob])
            loss = tf.reduce_sum(tf.square(OrthogonalFusion()([local, glob])[:, 8:]))
        g_local, g_glob = tape.gradient(loss, [local, glob])
        assert np.abs(g_local.numpy()).sum() > 0 and np.abs(g_glob.numpy()).sum() > 0

    def test_matches_per_position_projection_and_is_orthogonal(self, rng):
        local, glob = _uniform(rng, (3, 4, 6, 32), -1, 1), _uniform(rng, (3, 32), -3, 3)
        out = np.asarray(OrthogonalFusion()([local, glob]))
        np.testing.assert_allclose(out[:, :32], glob, rtol=1e-6)
        # The paper's definition: project every position, then pool.
        dot = np.einsum("bhwc,bc->bhw", local, glob)
        proj = dot[..., None] / (np.sum(glob**2, -1)[:, None, None, None] + 1e-6) * glob[:, None, None, :]
        expected = (local - proj).mean(axis=(1, 2))
        np.testing.assert_allclose(out[:, 32:], expected, rtol=1e-4, atol=1e-6)
        cos = np.sum(out[:, 32:] * glob, -1) / (np.linalg.norm(out[:, 32:], axis=-1) * np.linalg.norm(glob, axis=-1))
        assert np.all(np.abs(cos) < 1e-5)

    def test_zero_global_vector_is_finite(self, rng):
        local = _uniform(rng, (2, 3, 3, 8), -1, 1)
        out = np.asarray(OrthogonalFusion()([local, np.zeros((2, 8), "float32")]))
        assert np.all(np.isfinite(out))
        np.testing.assert_allclose(out[:, 8:], local.mean(axis=(1, 2)), rtol=1e-5, atol=1e-7)

    def test_channel_mismatch(self):
        with pytest.raises(InputShapeError, match="equal channels"):
            OrthogonalFusion()([np.zeros((1, 2, 2, 4), "float32"), np.zeros((1, 5), "float32")])


# ---------------------------------------------------------------- Normalisation layers
class TestNormalization:
    def test_image_normalization_rgb_and_bgr(self, rng, tmp_path):
        x = _uniform(rng, (2, 3, 4, 3), 0, 255)
        rgb = ImageNormalization()
        check_config_round_trip(rgb)
        check_symbolic_shape(ImageNormalization(), keras.Input((None, None, 3)))
        mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
        np.testing.assert_allclose(rgb(x), (x / 255 - mean) / std, rtol=1e-5, atol=1e-5)
        bgr = ImageNormalization(mean[::-1], std[::-1], channel_order="bgr")
        np.testing.assert_allclose(bgr(x), (x[..., ::-1] / 255 - mean[::-1]) / std[::-1], rtol=1e-5, atol=1e-5)
        check_save_load(bgr, [((None, None, None, 3), "float32")], [x], tmp_path)
        with pytest.raises(ConfigError, match="channel_order"):
            ImageNormalization(channel_order="hsv")

    def test_l2_normalize(self, rng):
        layer = L2Normalize()
        check_config_round_trip(layer)
        x = _uniform(rng, (4, 10), -1, 1)
        np.testing.assert_allclose(np.linalg.norm(layer(x), axis=-1), 1.0, rtol=1e-6)
        assert np.all(np.asarray(layer(np.zeros((1, 3), "float32"))) == 0)


# ---------------------------------------------------------------- Margin heads
def _numpy_cos(emb, kernel):
    e = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
    w = kernel / np.linalg.norm(kernel, axis=0, keepdims=True)
    return np.clip(e @ w, -1, 1)


HEADS = [
    lambda: ArcFace(7, scale=30.0, margin=0.15),
    lambda: CurricularFace(7, scale=30.0, margin=0.15),
    lambda: SubCenterArcFace(7, k=3, margins=list(np.linspace(0.1, 0.4, 7))),
]


class TestMarginHeads:
    def test_arcface_zero_margin_is_scaled_cosine_and_margin_lowers_target(self, rng):
        emb, labels = _uniform(rng, (6, 16), -1, 1), rng.integers(0, 9, 6).astype("int32")
        plain = ArcFace(9, scale=30.0, margin=0.0)
        out = np.asarray(plain([emb, labels]))
        cos = _numpy_cos(emb, plain.kernel.numpy())
        np.testing.assert_allclose(out, 30.0 * cos, rtol=1e-4, atol=1e-4)
        margined = ArcFace(9, scale=30.0, margin=0.3)
        margined([emb, labels])
        margined.kernel.assign(plain.kernel)
        out_m = np.asarray(margined([emb, labels]))
        rows = np.arange(6)
        assert np.all(out_m[rows, labels] < out[rows, labels])
        expected_target = 30.0 * np.cos(np.arccos(cos[rows, labels]) + 0.3)
        fallback = 30.0 * (cos[rows, labels] - 0.3 * np.sin(0.3))
        expected_target = np.where(cos[rows, labels] > np.cos(np.pi - 0.3), expected_target, fallback)
        np.testing.assert_allclose(out_m[rows, labels], expected_target, rtol=1e-4, atol=1e-4)
        mask = np.ones_like(out, bool)
        mask[rows, labels] = False
        np.testing.assert_allclose(out_m[mask], out[mask], rtol=1e-6)

    @pytest.mark.parametrize("make", HEADS)
    def test_no_nan_at_cos_plus_minus_one(self, make):
        head = make()
        head([np.ones((1, 12), "float32"), np.zeros((1,), "int32")])
        kernel = head.kernel.numpy()
        emb = np.stack([kernel[:, 0], -kernel[:, 0]]).astype("float32")  # cos = +1 and -1 with centre 0
        labels = np.zeros((2,), "int32")
        emb_t = tf.constant(emb)
        with tf.GradientTape() as tape:
            tape.watch(emb_t)
            logits = head([emb_t, labels], training=True)
            loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))
        grads = tape.gradient(loss, [emb_t, head.kernel])
        assert np.all(np.isfinite(logits.numpy()))
        assert all(np.all(np.isfinite(g.numpy())) for g in grads)

    @pytest.mark.parametrize("make", HEADS)
    def test_float32_under_mixed_precision(self, make, rng):
        keras.config.set_dtype_policy("mixed_float16")
        head = make()
        out = head([tf.constant(_uniform(rng, (3, 12), -1, 1), dtype="float16"), np.array([1, 2, 3])])
        assert out.dtype == "float32" and head.kernel.dtype == "float32"

    def test_curricularface_t_updates_in_training_only(self, rng):
        emb, labels = _uniform(rng, (8, 12), -1, 1), rng.integers(0, 7, 8).astype("int32")
        head = CurricularFace(7, momentum=0.5)
        head([emb, labels], training=False)
        assert float(head.t.numpy()) == 0.0
        head([emb, labels], training=True)
        cos = _numpy_cos(emb, head.kernel.numpy())
        expected_t = 0.5 * cos[np.arange(8), labels].mean()
        np.testing.assert_allclose(float(head.t.numpy()), expected_t, rtol=1e-5, atol=1e-7)

    def test_curricularface_modulates_hard_negatives(self, rng):
        emb, labels = _uniform(rng, (8, 12), -1, 1), rng.integers(0, 7, 8).astype("int32")
        head = CurricularFace(7, scale=1.0, margin=0.4)
        head([emb, labels])
        head.t.assign(0.3)
        out = np.asarray(head([emb, labels]))
        cos = _numpy_cos(emb, head.kernel.numpy())
        rows = np.arange(8)
        target = np.cos(np.arccos(cos[rows, labels]) + 0.4)
        target = np.where(cos[rows, labels] > np.cos(np.pi - 0.4), target, cos[rows, labels] - 0.4 * np.sin(0.4))
        expected = np.where(cos > target[:, None], cos * (0.3 + cos), cos)
        expected[rows, labels] = target
        np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)

    def test_subcenter_uses_best_centre_and_per_class_margin(self, rng):
        margins = np.array([0.0, 0.5, 0.1, 0.2], "float32")
        head = SubCenterArcFace(4, k=3, margins=list(margins), scale=1.0)
        emb = _uniform(rng, (4, 6), -1, 1)
        labels = np.array([0, 1, 2, 3], "int32")
        out = np.asarray(head([emb, labels]))
        cos_all = _numpy_cos(emb, head.kernel.numpy()).reshape(4, 4, 3).max(-1)
        rows = np.arange(4)
        c = cos_all[rows, labels]
        m = margins[labels]
        target = np.where(c > np.cos(np.pi - m), np.cos(np.arccos(c) + m), c - m * np.sin(m))
        expected = cos_all.copy()
        expected[rows, labels] = target
        np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)

    def test_dynamic_margins(self):
        m = dynamic_margins([1000, 10, 1, 100], low=0.05, high=0.5)
        assert m.dtype == np.float32
        np.testing.assert_allclose([m.min(), m.max()], [0.05, 0.5], rtol=1e-6)
        assert m[2] == m.max() and m[0] == m.min() and m[1] > m[3]
        np.testing.assert_allclose(dynamic_margins([5, 5]), [0.05, 0.05])
        with pytest.raises(ConfigError, match=">= 1"):
            dynamic_margins([0, 3])

    def test_bad_arguments(self):
        with pytest.raises(ConfigError, match="num_classes"):
            ArcFace(0)
        with pytest.raises(ConfigError, match="margin"):
            ArcFace(3, margin=math.pi)
        with pytest.raises(ConfigError, match="3 values"):
            SubCenterArcFace(3, margins=[0.1, 0.2])
