"""Official PyTorch checkpoint -> Keras: key coverage, numerical parity, loud errors."""

import ast
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch  # the [dev] extra installs it: a missing torch must fail, not skip

from dolg_tf.config import OFFICIAL_SCALES
from dolg_tf.convert import (
    detect_architecture,
    from_official_pytorch,
    load_official_state_dict,
)
from dolg_tf.errors import WeightsError
from dolg_tf.model import multiscale_embed
from tests.torch_official import (
    OfficialDOLG,
    official_input,
    official_multiscale,
    official_scaled_size,
    randomise_,
)

DATA = Path(__file__).parent / "data"
NUM_CLASSES = 10


def _listing(name):
    rows = []
    for line in (DATA / f"official_dolg_{name}_state_dict.tsv").read_text().splitlines():
        key, shape, dtype = line.split("\t")
        rows.append((key, list(ast.literal_eval(shape)), dtype))
    return rows


@pytest.mark.parametrize(
    "depth,with_ma,name", [(50, True, "r50_with_ma"), (50, False, "r50_wo_ma"), (101, True, "r101_with_ma")]
)
def test_reference_module_matches_the_official_listing(depth, with_ma, name):
    with torch.device("meta"):
        module = OfficialDOLG(depth, with_ma)
    ours = [(k, list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in module.state_dict().items()]
    assert ours == _listing(name)


def _save_checkpoint(module, path, wrap=True):
    state = module.state_dict()
    torch.save(
        {"epoch": 3, "model_state": state, "optimizer_state": {}, "cfg": "MODEL:\n  DEPTH: 50\n"} if wrap else state,
        path,
    )
    return path


@pytest.fixture(scope="module")
def r50_pair(tmp_path_factory):
    """(torch module, converted Keras model) for R50 with and without MultiAtrous."""
    out = {}
    for with_ma in (True, False):
        module = randomise_(OfficialDOLG(50, with_ma, num_classes=NUM_CLASSES), seed=1 + with_ma)
        path = _save_checkpoint(module, tmp_path_factory.mktemp("ckpt") / f"r50_{with_ma}.pyth")
        out[with_ma] = (module, from_official_pytorch(path), path)
    return out


def _compare(module, model, images):
    with torch.no_grad():
        desc_t, res4_t, res5_t = module(official_input(images))
    feats = model.feature_model()(images)
    desc = np.asarray(feats["descriptor"])
    np.testing.assert_allclose(desc, desc_t.numpy(), rtol=0, atol=1e-4)
    for ours, theirs in ((feats["res4"], res4_t), (feats["res5"], res5_t)):
        theirs = theirs.permute(0, 2, 3, 1).numpy()
        rel = np.abs(np.asarray(ours) - theirs).max() / np.abs(theirs).max()
        assert rel <= 1e-4
    emb_t = desc_t.numpy() / np.linalg.norm(desc_t.numpy(), axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(feats["embedding"]), emb_t, rtol=0, atol=1e-4)


@pytest.mark.parametrize("with_ma", [True, False])
@pytest.mark.parametrize("batch,h,w", [(1, 96, 96), (3, 96, 96), (1, 64, 112), (3, 80, 128)])
def test_r50_parity(r50_pair, rng, with_ma, batch, h, w):
    module, model, _ = r50_pair[with_ma]
    assert model.config.multi_atrous is with_ma and model.config.channel_order == "bgr"
    _compare(module, model, rng.uniform(0, 255, (batch, h, w, 3)).astype("float32"))


def test_multiscale_parity_with_official_scales(r50_pair, rng):
    module, model, _ = r50_pair[True]
    images = rng.uniform(0, 255, (1, 96, 128, 3)).astype("float32")
    acc = 0
    for s in OFFICIAL_SCALES:
        size = (official_scaled_size(96, s), official_scaled_size(128, s))
        x = torch.nn.functional.interpolate(official_input(images), size=size, mode="bilinear", align_corners=False)
        with torch.no_grad():
            d = module(x)[0].numpy()
        acc = acc + d / np.linalg.norm(d, axis=1, keepdims=True)
    expected = acc / np.linalg.norm(acc, axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(multiscale_embed(model, images, OFFICIAL_SCALES)), expected, atol=1e-4)


@pytest.mark.parametrize("h,w", [(149, 97), (99, 225)])
def test_five_scale_parity_on_odd_sizes(r50_pair, rng, h, w):
    """Odd, non-square sides (every one of them a tie at some scale) against the authors' extractor."""
    module, model, _ = r50_pair[True]
    images = rng.uniform(0, 255, (1, h, w, 3)).astype("float32")
    expected = official_multiscale(module, images, OFFICIAL_SCALES)
    got = np.asarray(multiscale_embed(model, images, OFFICIAL_SCALES))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def official_export(r50_pair, tmp_path_factory):
    """The converted R50 + MultiAtrous, saved as .keras and exported by `dolg export --profile official`."""
    from dolg_tf import cli

    _, model, _ = r50_pair[True]
    root = tmp_path_factory.mktemp("official")
    model.save(root / "converted.keras")
    base = root / "saved_models" / "dolg"
    argv = ["export", "--model", str(root / "converted.keras"), "--out", str(base), "--profile", "official"]
    assert cli.main([*argv, "--max-batch-size", "4"]) == 0
    return base


@pytest.mark.xdist_group("convert-official")
@pytest.mark.integration
def test_official_profile_served_over_grpc_matches_the_authors_extractor(r50_pair, official_export, serve):
    """Converted checkpoint -> `dolg export --profile official` -> `dolg serve` -> a JPEG over gRPC."""
    import grpc
    import tensorflow as tf
    from PIL import Image
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    from dolg_tf.demo.photos import demo_photos

    module, _, _ = r50_pair[True]
    base = official_export
    photo = Image.fromarray(demo_photos()["chelsea"])
    photo.thumbnail((149, 149))  # 99 x 149: 149 x 0.5 = 74.5 is a tie
    buf = io.BytesIO()
    photo.save(buf, format="JPEG", quality=90)
    jpeg = buf.getvalue()
    # No warm-up: replaying a 640-pixel photo at five scales through R50 would only slow the start.
    server = serve(str(base), extra=["--no-warmup"])
    stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(server.grpc_target))
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "dolg"
    request.inputs["images"].CopyFrom(tf.make_tensor_proto([jpeg], dtype=tf.string))
    served = tf.make_ndarray(stub.Predict(request, timeout=300).outputs["embedding"])
    server.stop()
    # The same decoded pixels (the server's JPEG decoder), then the authors' pipeline in PyTorch.
    pixels = tf.io.decode_jpeg(jpeg, channels=3).numpy()[None].astype("float32")
    assert pixels.shape[1:3] == (99, 149)
    expected = official_multiscale(module, pixels, OFFICIAL_SCALES)
    assert np.abs(served - expected).max() <= 1e-4


def test_head_is_kept_on_request(r50_pair):
    module, _, path = r50_pair[True]
    model, head = from_official_pytorch(path, keep_head=True)
    np.testing.assert_array_equal(head.kernel.numpy(), module.desc_cls.weight.detach().numpy().T)
    assert head.num_classes == NUM_CLASSES and float(head.t.numpy()) == pytest.approx(0.25)


def test_r101_parity(tmp_path, rng):
    module = randomise_(OfficialDOLG(101, True, num_classes=NUM_CLASSES), seed=5)
    model = from_official_pytorch(_save_checkpoint(module, tmp_path / "r101.pyth"), preset="resnet101")
    assert model.config.backbone == "resnet101"
    _compare(module, model, rng.uniform(0, 255, (2, 96, 128, 3)).astype("float32"))


def _state(with_ma=False):
    return {k: v.clone() for k, v in OfficialDOLG(50, with_ma, num_classes=NUM_CLASSES).state_dict().items()}


def test_bare_state_dict_module_prefix_and_missing_p(tmp_path, rng):
    module = randomise_(OfficialDOLG(50, False, num_classes=NUM_CLASSES), seed=3)
    state = {f"module.{k}": v for k, v in module.state_dict().items() if k != "pool_g.p"}
    torch.save(state, tmp_path / "bare.pth")
    model = from_official_pytorch(tmp_path / "bare.pth")
    assert float(model.get_layer("gem").p_weight.numpy()[0]) == 3.0  # absent p means the fixed p = 3
    with torch.no_grad():
        module.pool_g.p.fill_(3.0)
    _compare(module, model, rng.uniform(0, 255, (1, 64, 64, 3)).astype("float32"))


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda s: s.pop("fc.bias"), r"missing keys \['fc.bias'\]"),
        (lambda s: s.pop("localmodel.conv1.bias"), "missing keys.*localmodel.conv1.bias"),
        (
            lambda s: s.__setitem__("localmodel.extra.weight", torch.zeros(3)),
            r"unexpected keys \['localmodel.extra.weight'\]",
        ),
        (
            lambda s: s.__setitem__("fc_t.bias", torch.zeros(1023)),
            r"shape mismatches \['fc_t.bias: checkpoint \(1023,\)",
        ),
        (
            lambda s: s.__setitem__("globalmodel.s2.b1.f.b.weight", torch.zeros(128, 128, 1, 1)),
            "globalmodel.s2.b1.f.b.weight",
        ),
    ],
)
def test_bad_checkpoints_name_the_key(tmp_path, edit, message):
    state = _state()
    edit(state)
    torch.save({"model_state": state}, tmp_path / "bad.pyth")
    with pytest.raises(WeightsError, match=message):
        from_official_pytorch(tmp_path / "bad.pyth")


class _NotAWeight:
    pass


def test_unsafe_or_foreign_files_are_refused(tmp_path):
    torch.save({"model_state": _NotAWeight()}, tmp_path / "pickle.pyth")
    with pytest.raises(WeightsError, match=r"weights-only.*holds a Python object \(.*_NotAWeight\)"):
        load_official_state_dict(tmp_path / "pickle.pyth")
    (tmp_path / "junk.pyth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="weights-only") as info:
        load_official_state_dict(tmp_path / "junk.pyth")
    # One line that says what the file is and what was expected, without torch's page of advice.
    message = str(info.value)
    assert "\n" not in message and "weights_only` set to `False" not in message and "operand" not in message
    assert "does not start like one (first bytes b'not a ch')" in message and "official DOLG weights" in message
    (tmp_path / "e.pyth").write_bytes(b"export PATH=1\n")  # the first byte is 101
    with pytest.raises(WeightsError) as info:
        load_official_state_dict(tmp_path / "e.pyth")
    assert not re.search(r": \d+$", str(info.value)) and "expected the official DOLG weights" in str(info.value)
    with pytest.raises(WeightsError, match="does not exist"):
        load_official_state_dict(tmp_path / "missing.pyth")
    torch.save({"model_state": {"fc.weight": torch.zeros(2, 2)}}, tmp_path / "other.pyth")
    with pytest.raises(WeightsError, match="not an official DOLG"):
        from_official_pytorch(tmp_path / "other.pyth")


def test_preset_mismatch_and_detection(tmp_path):
    state = _state(with_ma=True)
    assert detect_architecture({k: v.numpy() for k, v in state.items()}) == ("resnet50", True)
    torch.save({"model_state": state}, tmp_path / "r50.pyth")
    with pytest.raises(WeightsError, match="resnet50 DOLG but preset 'resnet101'"):
        from_official_pytorch(tmp_path / "r50.pyth", preset="resnet101")


@pytest.mark.integration
def test_cli_convert_writes_a_loadable_keras_model(r50_pair, tmp_path, rng, capsys):
    import keras

    from dolg_tf import cli

    module, model, path = r50_pair[False]
    out_dir = tmp_path / "converted"
    assert cli.main(["convert", "--from", "official-pytorch", "--checkpoint", str(path), "--out", str(out_dir)]) == 0
    loaded = keras.saving.load_model(out_dir / "dolg.keras", safe_mode=True)
    assert (out_dir / "dolg.config.json").is_file()
    x = rng.uniform(0, 255, (1, 64, 64, 3)).astype("float32")
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(model(x)))
    capsys.readouterr()
    assert cli.main(["convert", "--checkpoint", str(path), "--out", str(out_dir)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert (
        cli.main(["convert", "--checkpoint", str(tmp_path / "none.pyth"), "--out", str(tmp_path / "w.weights.h5")]) == 2
    )
    assert "does not exist" in capsys.readouterr().err
    # The converted model goes straight into the TF Serving export, checked through the C API.
    base = tmp_path / "saved_models" / "dolg"
    args = ["export", "--model", str(out_dir / "dolg.keras"), "--out", str(base), "--image-size", "64", "--scales", "1"]
    assert cli.main([*args, "--verify"]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[0])
    assert summary["export_dir"] == str(base / "1") and summary["verify_max_abs_diff"] <= 1e-5
    assert cli.main(["export", "--model", str(out_dir / "dolg.config.json"), "--out", str(base)]) == 2
    assert "could not load model file" in capsys.readouterr().err


@pytest.mark.xdist_group("convert-official")
@pytest.mark.integration
def test_converted_model_survives_savedmodel_round_trip(r50_pair, official_export, rng):
    import tensorflow as tf

    _, model, _ = r50_pair[True]
    # The official profile: no first resize, the five official scales.
    loaded = tf.saved_model.load(str(official_export / "1"))
    pixels = rng.integers(0, 256, (2, 80, 112, 3), dtype=np.uint8)
    got = loaded.signatures["embed_pixels"](pixels=tf.constant(pixels))["embedding"].numpy()
    expected = np.asarray(multiscale_embed(model, pixels.astype("float32"), OFFICIAL_SCALES))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
