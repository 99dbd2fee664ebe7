"""SavedModel export: layout, signatures, TF C API (TF Serving's loader) parity, op audit, warm-up, bounds, contract.

The parity tests hold the export against a reference computed without the
export's own helpers: images decoded by PIL, sizes rounded by Python's
``round``, the first resize by PIL's antialiasing bilinear filter, the scale
pyramid by scikit-image's plain bilinear resize (OpenCV's ``INTER_LINEAR``,
as in the authors' evaluation) and the Keras model called on those pixels.
"""

import contextlib
import io
import json
import math
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from skimage.transform import resize as skimage_resize

from dolg_tf import cli
from dolg_tf.demo.photos import demo_photos
from dolg_tf.errors import ConfigError, ExportError
from dolg_tf.export import (
    CApiRunError,
    ExportConfig,
    audit_saved_model,
    contract,
    export_saved_model,
    list_versions,
    op_types,
    read_export_metadata,
    run_with_c_api,
)
from dolg_tf.export.reader import read_meta_graph
from dolg_tf.model import build_dolg, load_dolg
from tests.images import encode, jpeg_claiming, png_claiming

# SavedModel exports and what runs them end to end: make test-fast leaves these out.
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("export")]

SIZE = 64
SCALES = (0.7071, 1.0, 1.4142)


def texture(height, width):
    """Sharp-edged stripes (antialiasing matters) that PNG stores in a few hundred bytes."""
    y, x = np.mgrid[:height, :width]
    return np.stack([(x * 37 + y * 11) % 256, (x * 5 + y * 23) % 256, (x * 13 + y * 3 + 80) % 256], -1).astype(np.uint8)


# --------------------------------------------------------------------------- the independent reference


def decode_pil(data):
    """uint8 (H, W, 3): PIL's decoder, first frame, as RGB."""
    with Image.open(io.BytesIO(data)) as image:
        image.seek(0)
        return np.asarray(image.convert("RGB"))


def decode_jpeg_fast_dct(data):
    """uint8 (H, W, 3): libjpeg with its fast integer DCT, which ``tf.io.decode_image`` uses for JPEG.

    PIL (and OpenCV) decode with the accurate integer DCT; the two differ by a
    few levels on some pixels, so a JPEG's reference is computed from both.
    """
    return tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_FAST").numpy()


def round_half_even(value):
    return round(value)  # Python's round: half to even


def round_half_up(value):
    return math.floor(value + 0.5)


def antialiased_bilinear(pixels, height, width):
    """PIL's bilinear filter, widened by the reduction factor on each shrinking axis, per channel in float."""
    planes = [Image.fromarray(np.ascontiguousarray(pixels[..., c]), mode="F") for c in range(pixels.shape[-1])]
    channels = [np.asarray(plane.resize((width, height), Image.BILINEAR)) for plane in planes]
    return np.stack(channels, -1)


def plain_bilinear(pixels, height, width):
    """Bilinear with half-pixel centres and no antialiasing (OpenCV's INTER_LINEAR), by scikit-image."""
    out = skimage_resize(pixels, (height, width, 3), order=1, mode="edge", anti_aliasing=False, preserve_range=True)
    return out.astype(np.float32)


def reference_embedding(model, pixels, config, rounding=round_half_even):
    """What the export should compute for one uint8 (H, W, 3) image, from the authors' rules."""
    pixels = pixels.astype(np.float32)
    h, w = pixels.shape[:2]
    if config["resize"] == "none":
        first = pixels
    else:
        if config["resize"] == "fixed":
            size = (config["image_size"], config["image_size"])
        else:
            ratio = config["image_size"] / max(h, w)
            size = (max(1, rounding(h * ratio)), max(1, rounding(w * ratio)))
        shrinking = size[0] < h or size[1] < w
        resize = antialiased_bilinear if config["antialias"] and shrinking else plain_bilinear
        first = np.clip(resize(pixels, *size), 0.0, 255.0)
    total = np.zeros(int(model.output_shape[-1]))
    for scale in config["scales"]:
        size = (max(1, rounding(first.shape[0] * scale)), max(1, rounding(first.shape[1] * scale)))
        scaled = first if size == first.shape[:2] else plain_bilinear(first, *size)
        descriptor = np.asarray(model(scaled[None], training=False), np.float64)[0]
        total += descriptor / np.linalg.norm(descriptor)
    return total / np.linalg.norm(total)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def photo():
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


@pytest.fixture(scope="module")
def loaded(exported):
    """The export loaded once by TF's Python loader."""
    return tf.saved_model.load(exported[2])


@pytest.fixture(scope="module")
def c_api_run(exported, photo):
    """Encoded images of each format, and the export's ``serving_default`` on them through the TF C API."""
    gray = np.asarray(Image.fromarray(photo).convert("L"))
    # 37 x 128 -> 18.5 x 64 at image size 64: the rounding rule decides the height (half to even: 18).
    tie = np.ascontiguousarray(demo_photos()["chelsea"][100:137, 100:228])
    images = {
        "jpeg": encode(photo, "JPEG", quality=92),
        "png": encode(photo, "PNG"),
        "gray png": encode(gray, "PNG"),
        "bmp": encode(np.ascontiguousarray(photo[:, :40]), "BMP"),
        "gif": encode(photo, "GIF"),
        "webp": encode(photo, "WEBP", quality=90),
        "tie png": encode(tie, "PNG"),
    }
    return list(images), list(images.values()), run_with_c_api(exported[2], images=list(images.values()))


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory):
    """Two exports into one base path, written under umask 022 into a 0755 folder.

    Version 1: the tiny model, fixed 48 x 48 resize, one scale, at most 2000
    encoded bytes and 2 images per request. Version 2: a ``.keras`` round trip of
    a model trained at 80 px, exported with the default options. The version,
    limit, fixed-resize, training-size and permission tests share them.
    """
    root = tmp_path_factory.mktemp("shared")
    os.chmod(root, 0o755)
    base = root / "dolg"
    keras.utils.set_random_seed(11)
    model = build_dolg("tiny")
    trained = build_dolg("tiny", train_image_size=80)
    trained.save(root / "m.keras")
    loaded = load_dolg(str(root / "m.keras"))
    previous = os.umask(0o022)
    try:
        first = export_saved_model(
            model,
            base,
            image_size=48,
            resize="fixed",
            scales=(1.0,),
            max_image_bytes=2000,
            max_batch_size=2,
            warmup_batch_sizes=(),
        )
        second = export_saved_model(loaded, base, scales=(1.0,))
    finally:
        os.umask(previous)
    return {"root": root, "base": base, "first": first, "second": second, "model": model, "loaded": loaded}


@pytest.fixture(scope="module")
def cli_export(tmp_path_factory):
    """One ``dolg export --verify`` run: its exit code, stdout and stderr."""
    out = tmp_path_factory.mktemp("cli") / "models"
    stdout, stderr = io.StringIO(), io.StringIO()
    args = ["export", "--preset", "tiny", "--out", str(out), "--image-size", "48", "--scales", "1", "--verify"]
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = cli.main(args)
    return out, code, stdout.getvalue(), stderr.getvalue()


# --------------------------------------------------------------------------- layout, versions, signatures


def test_layout_versions_and_metadata(exported):
    model, base, path = exported
    assert path == os.path.join(str(base), "1") and list_versions(base) == [1]
    assert os.path.isfile(os.path.join(path, "saved_model.pb"))
    assert not [n for n in os.listdir(base) if n.startswith(".tmp")]  # no half-written leftovers
    meta = read_export_metadata(path)
    assert meta["export_config"]["image_size"] == SIZE and meta["export_config"]["resize"] == "aspect"
    assert meta["model_config"]["backbone"] == "resnet_tiny" and meta["embedding_dim"] == 128
    assert meta["versions"]["tensorflow"] == tf.__version__
    assert meta["versions"]["keras"] == keras.__version__ and meta["format"] == "dolg_tf.export/1"


def test_versions_never_overwrite(two_versions):
    model, base = two_versions["model"], two_versions["base"]
    assert [os.path.basename(two_versions["first"]), os.path.basename(two_versions["second"])] == ["1", "2"]
    with pytest.raises(ExportError, match="already exists"):
        export_saved_model(model, base, version=1, image_size=32, warmup_batch_sizes=())
    with pytest.raises(ConfigError, match="resize"):
        export_saved_model(model, base, resize="stretch")
    with pytest.raises(ConfigError, match="unknown ExportConfig field"):
        export_saved_model(model, base, image_sise=32)
    assert list_versions(base) == [1, 2]  # the failed calls left nothing behind
    assert not [n for n in os.listdir(base) if n.startswith(".tmp")]


def test_version_directories_read_like_tf_serving(tmp_path):
    def make(name, with_graph=True):
        os.makedirs(tmp_path / name)
        if with_graph:
            (tmp_path / name / "saved_model.pb").write_bytes(b"")

    make("1")
    make("2", with_graph=False)  # half-written: not a version, but its number is taken
    make("03")
    make(".tmp-4-abc")  # the writer's temporary sibling
    make("\u0665")  # ARABIC-INDIC DIGIT FIVE: not an ASCII integer name
    (tmp_path / "7").write_text("a file, not a directory")
    assert contract.complete_versions(tmp_path) == [1, 3]
    assert contract.list_versions(tmp_path) == [1, 3] and contract.list_versions(tmp_path / "missing") == []
    assert contract.next_version(tmp_path) == 8
    assert contract.is_saved_model_dir(tmp_path / "1") and not contract.is_saved_model_dir(tmp_path / "2")
    with pytest.raises(OSError):
        contract.complete_versions(tmp_path / "missing")


@pytest.mark.integration
def test_signatures_as_tf_serving_sees_them(exported):
    _, _, path = exported
    out = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "saved_model_cli"), "show", "--dir", path, "--all"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    sections = {part.split("'", 1)[0]: part for part in out.split("signature_def['")[1:]}
    default = sections["serving_default"]
    assert "inputs['images'] tensor_info:" in default and "dtype: DT_STRING" in default and "shape: (-1)" in default
    assert "outputs['embedding'] tensor_info:" in default and "dtype: DT_FLOAT" in default
    assert "shape: (-1, 128)" in default
    pixels = sections["embed_pixels"]
    assert "dtype: DT_UINT8" in pixels and "shape: (-1, -1, -1, 3)" in pixels
    assert "MetaGraphDef with tag-set: 'serve'" in out


def test_contract_describes_the_graph(exported):
    """The contract's names and dtypes (what the server and the client check) are the graph's."""
    from tensorflow.core.framework import types_pb2

    _, _, path = exported
    meta = read_meta_graph(path)
    assert contract.SERVE_TAG in meta.meta_info_def.tags
    found = {
        name: {
            "inputs": {k: types_pb2.DataType.Name(v.dtype) for k, v in sig.inputs.items()},
            "outputs": {k: types_pb2.DataType.Name(v.dtype) for k, v in sig.outputs.items()},
        }
        for name, sig in meta.signature_def.items()
        if name != contract.INIT_OP_SIGNATURE
    }
    assert found == {
        contract.DEFAULT_SIGNATURE: {
            "inputs": {contract.IMAGES_KEY: contract.IMAGES_DTYPE},
            "outputs": {contract.EMBEDDING_KEY: contract.EMBEDDING_DTYPE},
        },
        contract.PIXELS_SIGNATURE: {
            "inputs": {contract.PIXELS_KEY: contract.PIXELS_DTYPE},
            "outputs": {contract.EMBEDDING_KEY: contract.EMBEDDING_DTYPE},
        },
    }
    with pytest.raises(ExportError, match="no MetaGraph tagged 'train'"):
        read_meta_graph(path, "train")


@pytest.mark.integration
def test_contract_imports_no_tensorflow():
    """The contract (and what the client and `dolg serve`'s checks import) loads without TensorFlow."""
    code = (
        "import sys, dolg_tf.export.contract, dolg_tf.export, dolg_tf.export.capi, dolg_tf.client, "
        "dolg_tf.server.preflight; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'tensorflow', 'keras'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_unreadable_files_are_named(tmp_path):
    bad = tmp_path / "bad"
    os.makedirs(bad / "assets.extra")
    (bad / "saved_model.pb").write_bytes(b"this is not a SavedModel")
    problems = audit_saved_model(bad)
    assert len(problems) == 1 and "saved_model.pb" in problems[0] and "not a SavedModel protobuf" in problems[0]
    assert audit_saved_model(tmp_path / "missing")[0].startswith("cannot read")
    with pytest.raises(ExportError, match="no readable dolg_export.json"):
        read_export_metadata(bad)
    (bad / "assets.extra" / "dolg_export.json").write_text("[1, 2]")
    with pytest.raises(ExportError, match="not an object"):
        read_export_metadata(bad)
    (bad / "assets.extra" / "dolg_export.json").write_text(" " * (contract.MAX_EXPORT_JSON_BYTES + 1) + "{}")
    with pytest.raises(ExportError, match="over the limit"):
        read_export_metadata(bad)


@pytest.mark.integration
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
                os.path.join(os.path.dirname(sys.executable), "saved_model_cli"),
                "run",
                "--dir",
                path,
                "--tag_set",
                "serve",
                "--signature_def",
                signature,
                *feed,
                "--outdir",
                str(outdir),
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        )
        assert out.returncode == 0, out.stderr[-2000:]
        emb = np.load(outdir / "embedding.npy")
        assert emb.shape == (2, 128)
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


# --------------------------------------------------------------------------- parity


@pytest.mark.integration
def test_c_api_serving_default_matches_keras(exported, c_api_run):
    """TF Serving's loader (C API, no TF Python in the process) on real JPEG/PNG bytes == the reference, <= 1e-5."""
    model, _, path = exported
    names, images, served = c_api_run
    assert names[0] == "jpeg" and names[-1] == "tie png"
    config = read_export_metadata(path)["export_config"]
    assert (config["image_size"], config["resize"], config["scales"]) == (SIZE, "aspect", list(SCALES))
    pixels = [decode_jpeg_fast_dct(images[0])] + [decode_pil(data) for data in images[1:]]
    expected = np.stack([reference_embedding(model, p, config) for p in pixels])
    assert served.shape == (len(images), 128)
    np.testing.assert_allclose(served, expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)
    # Different images must give different embeddings (guards against a constant output).
    assert np.abs(served[0] - served[3]).max() > 1e-3
    # The JPEG decoded by PIL (accurate DCT): off by what the decoders' few-level differences explain.
    accurate = reference_embedding(model, decode_pil(images[0]), config)
    assert 0 < np.abs(served[0] - accurate).max() < 2e-2
    # Rounding the tie half up (19 rows) gives a clearly different embedding, so the check above can tell.
    half_up = reference_embedding(model, pixels[-1], config, rounding=round_half_up)
    assert np.abs(served[-1] - half_up).max() > 1e-3


@pytest.mark.integration
def test_c_api_embed_pixels_agrees_with_bytes(exported, photo, c_api_run):
    model, _, path = exported
    names, _, served = c_api_run
    from_pixels = run_with_c_api(path, pixels=photo[None])
    from_bytes = served[names.index("png")][None]  # the same photo as PNG bytes
    np.testing.assert_allclose(from_pixels, from_bytes, rtol=0, atol=1e-6)
    expected = reference_embedding(model, photo, read_export_metadata(path)["export_config"])
    np.testing.assert_allclose(from_pixels[0], expected, rtol=0, atol=1e-5)


def test_fixed_resize_policy(two_versions):
    model, path = two_versions["model"], two_versions["first"]
    # Both sides shrink; one side shrinks while the other grows.
    arrays = [texture(100, 70), texture(60, 30)]
    images = [encode(a, "PNG") for a in arrays]
    assert max(map(len, images)) <= 2000  # within the export's byte limit
    got = tf.saved_model.load(path).signatures["serving_default"](images=tf.constant(images))["embedding"].numpy()
    config = read_export_metadata(path)["export_config"]
    assert (config["resize"], config["image_size"]) == ("fixed", 48)
    expected = np.stack([reference_embedding(model, a, config) for a in arrays])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- C API, audit, warm-up, bounds


@pytest.mark.integration
def test_c_api_refuses_bad_input_with_a_message(exported):
    _, _, path = exported
    with pytest.raises(CApiRunError, match=r"images\[1\]: not a JPEG, PNG, GIF, BMP or WebP image") as err:
        run_with_c_api(path, images=[encode(np.zeros((8, 8, 3), np.uint8)), b"just some text"])
    assert err.value.code == 3  # INVALID_ARGUMENT


@pytest.mark.integration
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


def test_warmup_records_parse_and_replay(exported, loaded):
    from tensorflow_serving.apis import prediction_log_pb2

    _, _, path = exported
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


def test_bounds_checked_in_graph(loaded, photo):
    fn = loaded.signatures["serving_default"]
    good = encode(photo)
    cases = {
        "empty image bytes": [good, b""],
        "30000x30000 = 900000000 pixels, over the limit": [jpeg_claiming(30000, 30000)],
        "over the limit of 40000000": [png_claiming(30000, 30000)],
        "the batch is empty": [],
    }
    for message, batch in cases.items():
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            fn(images=tf.constant(batch, tf.string))
    pixels_fn = loaded.signatures["embed_pixels"]
    with pytest.raises(tf.errors.InvalidArgumentError, match="the batch is empty"):
        pixels_fn(pixels=tf.zeros([0, 8, 8, 3], tf.uint8))
    assert fn(images=tf.constant([good]))["embedding"].shape == (1, 128)  # still fine afterwards


def test_byte_and_batch_limits(two_versions, photo):
    fn = tf.saved_model.load(two_versions["first"]).signatures["serving_default"]
    big = encode(photo, "PNG")
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"images\[0\]: \d+ encoded bytes, over the limit of 2000"):
        fn(images=tf.constant([big]))
    small = encode(np.full((8, 8, 3), 100, np.uint8))
    with pytest.raises(tf.errors.InvalidArgumentError, match="batch of 3 images is over the limit of 2"):
        fn(images=tf.constant([small] * 3))


# --------------------------------------------------------------------------- config and profiles


def test_export_config_validation():
    with pytest.raises(ConfigError, match="image_size"):
        ExportConfig(image_size=8)
    with pytest.raises(ConfigError, match="scales"):
        ExportConfig(scales=())
    with pytest.raises(ConfigError, match="warmup_batch_sizes"):
        ExportConfig(max_batch_size=4, warmup_batch_sizes=(8,))


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
    assert (official.resize, official.scales, official.max_image_pixels) == (
        "none",
        OFFICIAL_SCALES,
        OFFICIAL_MAX_IMAGE_PIXELS,
    )
    assert export_config_for(trained, "official", scales=(1.0,), max_image_pixels=10_000).scales == (1.0,)
    with pytest.raises(ConfigError, match="unknown export profile 'paper'"):
        export_config_for(trained, "paper")


def test_trained_size_travels_with_the_keras_file(two_versions):
    loaded = two_versions["loaded"]
    assert loaded.config.train_image_size == 80
    meta = read_export_metadata(two_versions["second"])
    assert meta["export_config"]["image_size"] == 80 and meta["profile"] == "default"
    with pytest.raises(ConfigError, match="train_image_size"):
        build_dolg("tiny", train_image_size=4)


@pytest.mark.integration
def test_export_is_readable_by_another_user(two_versions):
    path = two_versions["second"]  # written under umask 022, warm-up file included
    assert os.path.isfile(os.path.join(path, "assets.extra", "tf_serving_warmup_requests"))
    for folder, _dirs, files in os.walk(path):
        assert os.stat(folder).st_mode & 0o777 == 0o755, folder
        for name in files:
            assert os.stat(os.path.join(folder, name)).st_mode & 0o777 == 0o644, name
    if os.geteuid() == 0:  # as root (CI is), prove it: another user loads the whole export
        for parent in two_versions["root"].parents:  # pytest's base folder is 0700
            if str(parent) in ("/", "/tmp"):
                break
            os.chmod(parent, os.stat(parent).st_mode | 0o005)
        script = 'find "$1" -type f -exec cat {} + > /dev/null && id -u'
        nobody = {"user": 65534, "group": 65534, "extra_groups": []}
        out = subprocess.run(
            ["/bin/sh", "-c", script, "sh", path], **nobody, capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0 and out.stdout.strip() == "65534", out.stderr


# --------------------------------------------------------------------------- dolg export


@pytest.mark.integration
def test_cli_export_with_c_api_verify(cli_export, capsys):
    out, code, stdout, _ = cli_export
    assert code == 0
    summary = json.loads(stdout.splitlines()[0])
    assert summary["export_dir"] == str(out / "1") and summary["verify_max_abs_diff"] <= 1e-5
    assert cli.main(["export", "--preset", "tiny", "--out", str(out), "--version", "1"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_cli_export_shows_progress_and_names_wrong_model_kinds(cli_export, tmp_path, capsys):
    out, code, _, err = cli_export
    assert code == 0
    for stage in ("building the tiny model", "tracing the serving signatures", "writing the SavedModel", "done"):
        assert stage in err
    assert cli.main(["export", "--model", str(out / "1"), "--out", str(tmp_path / "x")]) == 2
    assert "is a SavedModel (an export), not a Keras model" in capsys.readouterr().err
    assert cli.main(["export", "--model", str(out), "--out", str(tmp_path / "x")]) == 2
    assert "is an export base path (SavedModel versions 1)" in capsys.readouterr().err


def test_each_weight_is_stored_once(tiny_export_factory):
    """The checkpoint of an export holds exactly the served model's parameters: Keras' ExportArchive writes a
    model's variables a second time when the model is also passed to ``track``, doubling disk and memory."""
    from dolg_tf.model.fold import inference_model
    from tests.conftest import TINY_SEED

    reader = tf.train.load_checkpoint(os.path.join(tiny_export_factory(), "variables", "variables"))
    shapes = reader.get_variable_to_shape_map()
    stored = sum(math.prod(shape) for key, shape in shapes.items() if key != "_CHECKPOINTABLE_OBJECT_GRAPH")
    keras.utils.set_random_seed(TINY_SEED)
    model = build_dolg("tiny")
    served = inference_model(model).count_params()
    assert served < model.count_params()  # the batch norms are folded away
    assert stored == served
