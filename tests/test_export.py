"""SavedModel export: layout, signatures, TF C API (TF Serving's loader) parity, op audit, warm-up, bounds."""

import io
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from dolg_tf import cli
from dolg_tf.errors import ConfigError, ExportError
from dolg_tf.export import (
    CApiRunError,
    ExportConfig,
    audit_saved_model,
    embed_reference,
    export_saved_model,
    list_versions,
    op_types,
    read_export_metadata,
    run_with_c_api,
)
from dolg_tf.model import build_dolg

SIZE = 64
SCALES = (0.7071, 1.0, 1.4142)


def encode(array, fmt="JPEG", **kwargs):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photo():
    from dolg_tf.demo.photos import demo_photos

    image = Image.fromarray(demo_photos()["chelsea"])  # a real photo, 300 x 451
    image.thumbnail((120, 120))
    return np.asarray(image)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    keras.utils.set_random_seed(7)
    model = build_dolg("tiny")
    base = tmp_path_factory.mktemp("exports") / "dolg"
    path = export_saved_model(model, base, image_size=SIZE, scales=SCALES, warmup_batch_sizes=(1, 2))
    return model, base, path


def test_layout_versions_and_metadata(exported):
    model, base, path = exported
    assert path == os.path.join(str(base), "1") and list_versions(base) == [1]
    assert os.path.isfile(os.path.join(path, "saved_model.pb"))
    assert not [n for n in os.listdir(base) if n.startswith(".tmp")]  # no half-written leftovers
    meta = read_export_metadata(path)
    assert meta["export_config"]["image_size"] == SIZE and meta["export_config"]["resize"] == "aspect"
    assert meta["model_config"]["backbone"] == "resnet_tiny" and meta["embedding_dim"] == 128
    assert meta["versions"]["tensorflow"] == tf.__version__


def test_versions_never_overwrite(tmp_path):
    model = build_dolg("tiny")
    base = tmp_path / "m"
    first = export_saved_model(model, base, image_size=32, scales=(1.0,), warmup_batch_sizes=())
    second = export_saved_model(model, base, image_size=32, scales=(1.0,), warmup_batch_sizes=())
    assert [os.path.basename(first), os.path.basename(second)] == ["1", "2"]
    with pytest.raises(ExportError, match="already exists"):
        export_saved_model(model, base, version=1, image_size=32, warmup_batch_sizes=())
    with pytest.raises(ConfigError, match="resize"):
        export_saved_model(model, base, resize="stretch")
    with pytest.raises(ConfigError, match="unknown ExportConfig field"):
        export_saved_model(model, base, image_sise=32)
    assert list_versions(base) == [1, 2]  # the failed calls left nothing behind
    assert not [n for n in os.listdir(base) if n.startswith(".tmp")]


def test_signatures_as_tf_serving_sees_them(exported):
    _, _, path = exported
    out = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "saved_model_cli"), "show", "--dir", path, "--all"],
        capture_output=True, text=True, check=True,
    ).stdout
    sections = {part.split("'", 1)[0]: part for part in out.split("signature_def['")[1:]}
    default = sections["serving_default"]
    assert "inputs['images'] tensor_info:" in default and "dtype: DT_STRING" in default and "shape: (-1)" in default
    assert "outputs['embedding'] tensor_info:" in default and "dtype: DT_FLOAT" in default and "shape: (-1, 128)" in default
    pixels = sections["embed_pixels"]
    assert "dtype: DT_UINT8" in pixels and "shape: (-1, -1, -1, 3)" in pixels
    assert "MetaGraphDef with tag-set: 'serve'" in out


def test_saved_model_cli_run(exported, tmp_path, photo):
    _, _, path = exported
    np.save(tmp_path / "pixels.npy", np.full((2, 40, 50, 3), 128, np.uint8))
    jpeg = encode(np.ascontiguousarray(photo[:24, :24]))
    # A fixed-width bytes array (not object): loads without pickle; JPEGs end in FFD9, so no NUL is lost.
    np.save(tmp_path / "images.npy", np.array([jpeg, jpeg]))
    runs = {
        "embed_pixels": ["--inputs", f"pixels={tmp_path / 'pixels.npy'}"],
        "serving_default": ["--inputs", f"images={tmp_path / 'images.npy'}"],
    }
    for signature, feed in runs.items():
        outdir = tmp_path / signature
        out = subprocess.run(
            [
                os.path.join(os.path.dirname(sys.executable), "saved_model_cli"), "run", "--dir", path,
                "--tag_set", "serve", "--signature_def", signature, *feed, "--outdir", str(outdir),
            ],
            capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        )
        assert out.returncode == 0, out.stderr[-2000:]
        emb = np.load(outdir / "embedding.npy")
        assert emb.shape == (2, 128)
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_c_api_serving_default_matches_keras(exported, photo):
    """TF Serving's loader (C API, no TF Python in the process) on real JPEG/PNG bytes == Keras, <= 1e-5."""
    model, _, path = exported
    gray = np.asarray(Image.fromarray(photo).convert("L"))
    images = [
        encode(photo, "JPEG", quality=92),
        encode(photo, "PNG"),
        encode(gray, "PNG"),
        encode(np.ascontiguousarray(photo[:, :40]), "BMP"),
        encode(photo, "GIF"),
        encode(photo, "WEBP", quality=90),
    ]
    served = run_with_c_api(path, images=images)
    expected = embed_reference(model, images, read_export_metadata(path)["export_config"])
    assert served.shape == (len(images), 128)
    np.testing.assert_allclose(served, expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)
    # Different images must give different embeddings (guards against a constant output).
    assert np.abs(served[0] - served[3]).max() > 1e-3


def test_c_api_embed_pixels_agrees_with_bytes(exported, photo):
    model, _, path = exported
    png = encode(photo, "PNG")
    from_pixels = run_with_c_api(path, pixels=photo[None])
    from_bytes = run_with_c_api(path, images=[png])
    np.testing.assert_allclose(from_pixels, from_bytes, rtol=0, atol=1e-6)


def test_c_api_refuses_bad_input_with_a_message(exported):
    _, _, path = exported
    with pytest.raises(CApiRunError, match=r"images\[1\]: not a JPEG, PNG, GIF, BMP or WebP image") as err:
        run_with_c_api(path, images=[encode(np.zeros((8, 8, 3), np.uint8)), b"just some text"])
    assert err.value.code == 3  # INVALID_ARGUMENT


def test_negative_control_py_function_fails_the_c_api_check(tmp_path):
    """A SavedModel with a Python op loads in TF Python but not in TF Serving's loader."""

    class Toy(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="images")])
        def serve(self, images):
            n = tf.py_function(lambda x: np.float32(len(x.numpy())), [images], tf.float32)
            return {"embedding": tf.reshape(n, [1, 1])}

    toy = Toy()
    path = str(tmp_path / "toy" / "1")
    tf.saved_model.save(toy, path, signatures={"serving_default": toy.serve})
    assert tf.saved_model.load(path).signatures["serving_default"](images=tf.constant([b"a"]))  # fine in Python
    problems = audit_saved_model(path)
    assert any("EagerPyFunc" in p for p in problems)
    with pytest.raises(CApiRunError) as err:
        run_with_c_api(path, images=[b"a"])
    assert "EagerPyFunc" in err.value.message


def test_op_audit_of_the_export(exported, tmp_path):
    _, _, path = exported
    assert audit_saved_model(path) == []
    ops = op_types(path)
    assert {"DecodeImage", "ExtractJpegShape", "Assert"} <= ops
    assert not ops & {"PyFunc", "EagerPyFunc", "PyFuncStateless", "XlaCallModule"}

    class Jit(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.float32)], jit_compile=True)
        def serve(self, x):
            return {"y": x * 2.0}

    jit = Jit()
    jit_path = str(tmp_path / "jit")
    tf.saved_model.save(jit, jit_path, signatures={"serving_default": jit.serve})
    assert any("_XlaMustCompile" in p for p in audit_saved_model(jit_path))


def test_warmup_records_parse_and_replay(exported):
    from tensorflow_serving.apis import prediction_log_pb2

    _, _, path = exported
    loaded = tf.saved_model.load(path)
    records = list(tf.data.TFRecordDataset(os.path.join(path, "assets.extra", "tf_serving_warmup_requests")))
    assert len(records) == 2
    for record, batch in zip(records, (1, 2)):
        log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
        request = log.predict_log.request
        assert request.model_spec.signature_name == "serving_default"
        images = tf.make_ndarray(request.inputs["images"])
        assert images.shape == (batch,) and images[0][:3] == b"\xff\xd8\xff"  # real JPEG photos
        out = loaded.signatures["serving_default"](images=tf.constant(images))["embedding"]
        assert out.shape == (batch, 128)


def _jpeg_claiming(height, width, photo):
    """A real JPEG whose SOF header is rewritten to claim ``height x width``."""
    data = bytearray(encode(photo[:16, :16]))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 7] = height.to_bytes(2, "big")
    data[sof + 7 : sof + 9] = width.to_bytes(2, "big")
    return bytes(data)


def test_bounds_checked_in_graph(exported, photo):
    _, _, path = exported
    fn = tf.saved_model.load(path).signatures["serving_default"]
    good = encode(photo)
    png = bytearray(encode(photo, "PNG"))
    png[16:24] = (30000).to_bytes(4, "big") + (30000).to_bytes(4, "big")
    cases = {
        "empty image bytes": [good, b""],
        "30000x30000 = 900000000 pixels, over the limit": [_jpeg_claiming(30000, 30000, photo)],
        "over the limit of 40000000": [bytes(png)],
        "the batch is empty": [],
    }
    for message, batch in cases.items():
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            fn(images=tf.constant(batch, tf.string))
    pixels_fn = tf.saved_model.load(path).signatures["embed_pixels"]
    with pytest.raises(tf.errors.InvalidArgumentError, match="the batch is empty"):
        pixels_fn(pixels=tf.zeros([0, 8, 8, 3], tf.uint8))
    assert fn(images=tf.constant([good]))["embedding"].shape == (1, 128)  # still fine afterwards


def test_byte_and_batch_limits(tmp_path, photo):
    model = build_dolg("tiny")
    path = export_saved_model(
        model, tmp_path / "m", image_size=32, scales=(1.0,), max_image_bytes=2000, max_batch_size=2,
        warmup_batch_sizes=(),
    )
    fn = tf.saved_model.load(path).signatures["serving_default"]
    big = encode(photo, "PNG")
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"images\[0\]: \d+ encoded bytes, over the limit of 2000"):
        fn(images=tf.constant([big]))
    small = encode(np.full((8, 8, 3), 100, np.uint8))
    with pytest.raises(tf.errors.InvalidArgumentError, match="batch of 3 images is over the limit of 2"):
        fn(images=tf.constant([small] * 3))


def test_fixed_resize_policy(tmp_path, photo):
    model = build_dolg("tiny")
    path = export_saved_model(model, tmp_path / "m", image_size=48, resize="fixed", scales=(1.0,), warmup_batch_sizes=())
    images = [encode(photo, "PNG"), encode(np.ascontiguousarray(photo[:50, :30]), "PNG")]
    got = tf.saved_model.load(path).signatures["serving_default"](images=tf.constant(images))["embedding"].numpy()
    expected = embed_reference(model, images, read_export_metadata(path)["export_config"])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_export_config_validation():
    with pytest.raises(ConfigError, match="image_size"):
        ExportConfig(image_size=8)
    with pytest.raises(ConfigError, match="scales"):
        ExportConfig(scales=())
    with pytest.raises(ConfigError, match="warmup_batch_sizes"):
        ExportConfig(max_batch_size=4, warmup_batch_sizes=(8,))


def test_cli_export_with_c_api_verify(tmp_path, capsys):
    out = tmp_path / "models"
    args = ["export", "--preset", "tiny", "--out", str(out), "--image-size", "48", "--scales", "1", "--verify"]
    assert cli.main(args) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[0])
    assert summary["export_dir"] == str(out / "1") and summary["verify_max_abs_diff"] <= 1e-5
    assert cli.main(["export", "--preset", "tiny", "--out", str(out), "--version", "1"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_export_defaults_follow_the_model(caplog):
    from dolg_tf.config import OFFICIAL_SCALES, PAPER_SCALES
    from dolg_tf.export import OFFICIAL_MAX_IMAGE_PIXELS, export_config_for

    trained = build_dolg("tiny", train_image_size=96)
    untrained = build_dolg("tiny")
    assert export_config_for(trained).image_size == 96
    assert export_config_for(untrained).image_size == 512
    assert export_config_for(trained).scales == PAPER_SCALES and export_config_for(trained).resize == "aspect"
    with caplog.at_level("WARNING", logger="dolg_tf.export"):
        assert export_config_for(trained, image_size=512).image_size == 512
    assert "trained at 96" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="dolg_tf.export"):
        export_config_for(trained, image_size=96)
        export_config_for(untrained, image_size=300)
    assert not caplog.text
    official = export_config_for(trained, "official")
    assert (official.resize, official.scales, official.max_image_pixels) == ("none", OFFICIAL_SCALES, OFFICIAL_MAX_IMAGE_PIXELS)
    assert export_config_for(trained, "official", scales=(1.0,), max_image_pixels=10_000).scales == (1.0,)
    with pytest.raises(ConfigError, match="unknown export profile 'paper'"):
        export_config_for(trained, "paper")


def test_trained_size_travels_with_the_keras_file(tmp_path):
    from dolg_tf.model import load_dolg

    model = build_dolg("tiny", train_image_size=80)
    model.save(tmp_path / "m.keras")
    loaded = load_dolg(str(tmp_path / "m.keras"))
    assert loaded.config.train_image_size == 80
    path = export_saved_model(loaded, tmp_path / "sm", scales=(1.0,), warmup_batch_sizes=())
    meta = read_export_metadata(path)
    assert meta["export_config"]["image_size"] == 80 and meta["profile"] == "default"
    with pytest.raises(ConfigError, match="train_image_size"):
        build_dolg("tiny", train_image_size=4)


def test_export_is_readable_by_another_user(tmp_path):
    root = tmp_path / "shared"
    root.mkdir()
    os.chmod(tmp_path, 0o755)
    os.chmod(root, 0o755)
    previous = os.umask(0o022)
    try:
        path = export_saved_model(build_dolg("tiny"), root / "dolg", image_size=32, scales=(1.0,))
    finally:
        os.umask(previous)
    for folder, dirs, files in os.walk(path):
        assert os.stat(folder).st_mode & 0o777 == 0o755, folder
        for name in files:
            assert os.stat(os.path.join(folder, name)).st_mode & 0o777 == 0o644, name
    if os.geteuid() == 0:  # as root (CI is), prove it: another user loads the whole export
        for parent in tmp_path.parents:  # pytest's base folder is 0700
            if str(parent) in ("/", "/tmp"):
                break
            os.chmod(parent, os.stat(parent).st_mode | 0o005)
        script = 'find "$1" -type f -exec cat {} + > /dev/null && id -u'
        nobody = {"user": 65534, "group": 65534, "extra_groups": []}
        out = subprocess.run(["/bin/sh", "-c", script, "sh", path], **nobody, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and out.stdout.strip() == "65534", out.stderr


def test_cli_export_shows_progress_and_names_wrong_model_kinds(tmp_path, capsys):
    out = tmp_path / "models"
    assert cli.main(["export", "--preset", "tiny", "--out", str(out), "--image-size", "32", "--scales", "1"]) == 0
    err = capsys.readouterr().err
    for stage in ("building the tiny model", "tracing the serving signatures", "writing the SavedModel", "done"):
        assert stage in err
    assert cli.main(["export", "--model", str(out / "1"), "--out", str(tmp_path / "x")]) == 2
    assert "is a SavedModel (an export), not a Keras model" in capsys.readouterr().err
    assert cli.main(["export", "--model", str(out), "--out", str(tmp_path / "x")]) == 2
    assert "is an export base path (SavedModel versions 1)" in capsys.readouterr().err
