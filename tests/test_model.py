"""DOLG model tests: shapes, norms, gradients, save/load, presets, multi-scale."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

import dolg_tf
from dolg_tf.config import MODEL_PRESETS, ModelConfig, model_config
from dolg_tf.errors import ConfigError, WeightsError
from dolg_tf.layers import ArcFace
from dolg_tf.model import DOLG, build_backbone, build_dolg, multiscale_embed


def _images(rng, b, h, w):
    return rng.uniform(0, 255, size=(b, h, w, 3)).astype("float32")


@pytest.fixture(scope="module")
def tiny():
    keras.utils.set_random_seed(7)
    return build_dolg("tiny")


@pytest.mark.parametrize("b,h,w", [(1, 64, 64), (2, 64, 64), (1, 48, 96), (2, 80, 33)])
def test_tiny_shapes_and_unit_norm(tiny, rng, b, h, w):
    out = np.asarray(tiny(_images(rng, b, h, w)))
    assert out.shape == (b, 128) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), 1.0, rtol=1e-5)


def test_batch_of_one_equals_row_of_batch(tiny, rng):
    # dongkyunk/DOLG-pytorch's `.squeeze()` dropped the batch axis for one image.
    x = _images(rng, 3, 64, 64)
    np.testing.assert_allclose(tiny(x[1:2]), np.asarray(tiny(x))[1:2], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("preset,h,w", [("resnet50", 64, 64), ("resnet101", 64, 96)])
def test_resnet_presets_taps_and_outputs(preset, h, w, rng):
    model = build_dolg(preset)
    feats = model.feature_model()(_images(rng, 2, h, w))
    assert feats["res4"].shape == (2, h // 16, w // 16, 1024)
    assert feats["res5"].shape == (2, h // 32, w // 32, 2048)
    assert feats["local_features"].shape == (2, h // 16, w // 16, 1024)
    assert feats["attention"].shape == (2, h // 16, w // 16, 1)
    assert feats["global_features"].shape == (2, 1024)
    assert feats["embedding"].shape == (2, 512)
    assert np.all(np.asarray(feats["attention"]) >= 0)
    np.testing.assert_allclose(np.linalg.norm(feats["embedding"], axis=-1), 1.0, rtol=1e-5)


# Parameter counts of the official DOLG model without its margin head, from the
# official state-dict listings (tests/data/official_dolg_*_state_dict.tsv hold
# three of the four). Our local conv has no bias (folded into
# BN on conversion), hence "+ 1024".
OFFICIAL_PARAMS = {
    ("resnet50", True): 45537346,
    ("resnet50", False): 27707970,
    ("resnet101", True): 64529474,
    ("resnet101", False): 46700098,
}


@pytest.mark.parametrize("preset,multi_atrous", sorted(OFFICIAL_PARAMS))
def test_parameter_count_matches_official_architecture(preset, multi_atrous):
    model = build_dolg(preset, multi_atrous=multi_atrous)
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    assert trainable + 1024 == OFFICIAL_PARAMS[(preset, multi_atrous)]


@pytest.mark.parametrize("preset,size", [("tiny", 64), ("resnet50", 64)])
def test_every_trainable_variable_gets_a_gradient(preset, size, rng):
    model = build_dolg(preset)
    head = ArcFace(5, scale=30.0, margin=0.15)
    x = _images(rng, 2, size, size + 32)
    labels = np.array([1, 3], "int32")
    with tf.GradientTape() as tape:
        emb = model(x, training=True)
        logits = head([emb, labels])
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))
    variables = model.trainable_variables + head.trainable_variables
    grads = tape.gradient(loss, variables)
    missing = [v.path for v, g in zip(variables, grads) if g is None or not np.any(np.asarray(g) != 0)]
    assert missing == []
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)
    assert "gem/p" in {v.path for v in model.trainable_variables}


def test_keras_save_load_safe_mode_identical(tiny, rng, tmp_path):
    path = tmp_path / "tiny.keras"
    tiny.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert isinstance(loaded, DOLG)
    assert loaded.config == tiny.config
    x = _images(rng, 2, 64, 80)
    np.testing.assert_array_equal(np.asarray(tiny(x)), np.asarray(loaded(x)))
    # The top-level entry point loads the same file (a float32 model whatever the global policy then).
    keras.config.set_dtype_policy("mixed_float16")
    again = dolg_tf.load_dolg(str(path))
    keras.config.set_dtype_policy("float32")
    assert again.compute_dtype == "float32"
    np.testing.assert_array_equal(np.asarray(tiny(x)), np.asarray(again(x)))


def test_weights_file_round_trip_and_errors(tiny, rng, tmp_path):
    path = tmp_path / "tiny.weights.h5"
    tiny.save_weights(path)
    again = build_dolg("tiny", weights=str(path))
    x = _images(rng, 1, 64, 64)
    np.testing.assert_array_equal(np.asarray(tiny(x)), np.asarray(again(x)))
    with pytest.raises(WeightsError, match="could not read"):
        build_dolg("tiny", weights=str(tmp_path / "missing.weights.h5"))
    with pytest.raises(WeightsError):
        build_dolg("tiny", multi_atrous=False, weights=str(path))


def test_get_config_round_trips_model_config(tiny):
    config = tiny.get_config()
    fields = {k: v for k, v in config.items() if k not in ("name", "dtype")}
    assert ModelConfig.from_dict(fields) == MODEL_PRESETS["tiny"]
    clone = DOLG.from_config(json.loads(json.dumps(config)))
    assert clone.config == tiny.config
    assert clone.count_params() == tiny.count_params()


def test_dtype_argument_sets_every_layer_and_leaves_the_global_policy(rng):
    before = keras.config.dtype_policy().name
    model = build_dolg("tiny", dtype="mixed_float16")
    assert keras.config.dtype_policy().name == before == "float32"
    assert model.dtype_policy.name == "mixed_float16" and model.compute_dtype == "float16"
    computing = {layer.name: layer.compute_dtype for layer in model.backbone.layers if layer.weights}
    computing.update(
        {
            name: model.get_layer(name).compute_dtype
            for name in ("local_branch", "gem", "global_fc", "fusion", "embedding_fc")
        }
    )
    assert set(computing.values()) == {"float16"}, computing
    assert model.get_layer("l2_normalize").compute_dtype == "float32"
    assert {v.dtype for v in model.weights} == {"float32"}
    # Reference: the float32 model with the same weights; the 16-bit forward pass is close to it.
    plain = build_dolg("tiny", dtype="float32")
    plain.set_weights(model.get_weights())
    x = _images(rng, 2, 64, 64)
    low, full = np.asarray(model(x)), np.asarray(plain(x))
    assert low.dtype == np.float32
    np.testing.assert_allclose(low, full, atol=5e-2)
    assert np.abs(low - full).max() > 0
    # The policy is part of the config: a round trip keeps it whatever the global policy is then.
    assert model.get_config()["dtype"] == "mixed_float16"
    assert DOLG.from_config(json.loads(json.dumps(model.get_config()))).compute_dtype == "float16"
    assert keras.config.dtype_policy().name == "float32"


def test_mixed_float16_forward_is_finite(rng):
    keras.config.set_dtype_policy("mixed_float16")
    model = build_dolg("tiny")
    out = model(_images(rng, 2, 64, 64))
    assert out.dtype == "float32"
    assert np.all(np.isfinite(np.asarray(out)))
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), 1.0, rtol=1e-3)


def test_symbolic_unknown_size_in_tf_function(tiny, rng):
    fn = tf.function(lambda x: tiny(x, training=False), input_signature=[tf.TensorSpec([None, None, None, 3])])
    for h, w in [(64, 64), (40, 72)]:
        x = _images(rng, 2, h, w)
        np.testing.assert_allclose(fn(x), tiny(x), rtol=1e-4, atol=1e-5)


def test_official_preprocessing_is_bgr(tiny, rng):
    bgr = build_dolg("tiny", channel_order="bgr", pixel_mean=(0.406, 0.456, 0.485), pixel_std=(0.225, 0.224, 0.229))
    bgr.set_weights(tiny.get_weights())
    # A BGR model whose stem conv sees its input channels in reverse order is the RGB model.
    stem = bgr.backbone.get_layer("conv1_conv")
    stem.kernel.assign(stem.kernel.numpy()[:, :, ::-1, :])
    x = _images(rng, 1, 64, 64)
    np.testing.assert_allclose(bgr(x), tiny(x), rtol=1e-4, atol=1e-5)


def test_backbone_weights_from_local_preset(tmp_path, rng):
    source = build_backbone("resnet_tiny")
    source(np.zeros((1, 32, 32, 3), "float32"))
    preset_dir = tmp_path / "resnet_tiny_preset"
    source.save_to_preset(str(preset_dir))
    model = build_dolg("tiny", backbone_weights=str(preset_dir))
    conv = source.get_layer("stack2_block0_2_conv").kernel.numpy()
    np.testing.assert_array_equal(model.backbone.get_layer("stack2_block0_2_conv").kernel.numpy(), conv)
    with pytest.raises(WeightsError, match="does not exist"):
        build_dolg("tiny", backbone_weights=str(tmp_path / "nope" / "preset"))
    with pytest.raises(WeightsError):  # R50 weights do not fit the tiny backbone
        build_dolg("resnet50", backbone_weights=str(preset_dir))


def test_config_errors():
    with pytest.raises(ConfigError, match="unknown model preset"):
        build_dolg("resnet34")
    with pytest.raises(ConfigError, match="unknown ModelConfig field"):
        model_config("tiny", embeding_dim=3)
    with pytest.raises(ConfigError, match="feature_dim"):
        model_config("tiny", feature_dim=0)
    with pytest.raises(ConfigError, match="channel_order"):
        model_config("tiny", channel_order="bgra")


class TestMultiscale:
    def test_matches_manual_average(self, tiny, rng):
        x = _images(rng, 2, 64, 96)
        scales = (0.5, 1.0, 1.5)
        got = np.asarray(multiscale_embed(tiny, x, scales))
        acc = 0
        for s in scales:
            size = (round(64 * s), round(96 * s))  # Python rounds half to even, as the authors do
            xs = tf.image.resize(x, size, method="bilinear") if s != 1.0 else x
            e = np.asarray(tiny(xs))
            acc = acc + e / np.linalg.norm(e, axis=-1, keepdims=True)
        expected = acc / np.linalg.norm(acc, axis=-1, keepdims=True)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, rtol=1e-5)

    def test_single_scale_is_model_output(self, tiny, rng):
        x = _images(rng, 2, 64, 64)
        np.testing.assert_allclose(multiscale_embed(tiny, x, (1.0,)), tiny(x), rtol=1e-5, atol=1e-6)

    def test_graph_mode_unknown_sizes(self, tiny, rng):
        fn = tf.function(
            lambda x: multiscale_embed(tiny, x, dolg_tf.config.PAPER_SCALES),
            input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)],
        )
        for h, w in [(64, 64), (57, 91)]:
            x = _images(rng, 1, h, w)
            np.testing.assert_allclose(fn(x), multiscale_embed(tiny, x), rtol=1e-4, atol=1e-5)

    def test_bad_arguments(self, tiny):
        with pytest.raises(ConfigError, match="scales"):
            multiscale_embed(tiny, np.zeros((1, 32, 32, 3), "float32"), ())
        with pytest.raises(dolg_tf.errors.InputShapeError, match="batch, height, width, 3"):
            multiscale_embed(tiny, np.zeros((32, 32, 3), "float32"))
