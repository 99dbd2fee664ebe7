"""SavedModel export for TF Serving.

``export_saved_model(model, "saved_models/dolg")`` writes
``saved_models/dolg/<next integer version>/`` with one MetaGraph tagged
``serve`` and two signatures:

* ``serving_default``: ``images`` DT_STRING ``[-1]`` (encoded JPEG / PNG / WebP /
  GIF (first frame) / BMP bytes) -> ``embedding`` float32 ``[-1, D]``.
* ``embed_pixels``: ``pixels`` uint8 ``[-1, -1, -1, 3]`` -> ``embedding``.

Everything runs in the graph: the bounds checks, decoding (grayscale, RGBA,
16-bit PNG and CMYK JPEG all become 3-channel uint8), the resize policy, the
model's normalisation and the multi-scale pyramid. There are no Python ops,
no XLA and no ``XlaCallModule``, so TF Serving's C++ loader runs the export
as it is (``tests/test_export.py`` proves that through the TF C API in a
process that never imports TensorFlow's Python package).

Bad input fails inside the graph with ``INVALID_ARGUMENT`` and a message
that names the item and the problem, e.g. ``images[2]: 30000x30000 =
900000000 pixels, over the limit of 40000000``. Image dimensions are read
from the header (``tf.image.extract_jpeg_shape`` for JPEG, the IHDR / screen
descriptor / DIB / VP8 header for PNG / GIF / BMP / WebP, with the same reader as the
training pipeline) *before* decoding, so a
decompression bomb is refused without allocating its pixels.

Resize policies:

* ``"aspect"`` (default, the paper's protocol): each image is resized so that
  its longer side is ``image_size``, aspect ratio kept, then run through the
  scale pyramid on its own (``tf.map_fn`` over the batch).
* ``"fixed"``: every image is resized to ``image_size x image_size`` (aspect
  ratio NOT kept) and the batch runs through the network at once: faster on
  accelerators, less faithful. ``benchmarks/export_resize.py`` measures both.
* ``"none"``: no first resize; the scale pyramid runs at the image's own
  resolution, bounded only by ``max_image_pixels`` (the authors' evaluation).

Profiles (:data:`EXPORT_PROFILES`, ``dolg export --profile``) name a set of
these options: ``"default"`` (``"aspect"`` to the image size the model was
trained at, or 512, with the paper's three scales) and ``"official"`` (the
authors' evaluation: no pre-resize and their five scales; the model's own
preprocessing, which a converted checkpoint carries, is part of the model).
Every scaled side, the first resize's included, is rounded by
:func:`dolg_tf.model.multiscale.scaled_size`.

The export also writes ``assets.extra/tf_serving_warmup_requests`` (TF
Serving's warm-up file: ``PredictionLog`` records built from real photos) and
``assets.extra/dolg_export.json`` (model config, export config, versions).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from dolg_tf.config import (
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_IMAGE_PIXELS,
    OFFICIAL_SCALES,
    PAPER_SCALES,
    FrozenConfig,
)
from dolg_tf.errors import ConfigError, ExportError
from dolg_tf.versions import VERSION_NAME, complete_versions

log = logging.getLogger(__name__)

RESIZE_POLICIES = ("aspect", "fixed", "none")
WARMUP_FILE = "tf_serving_warmup_requests"
EXPORT_JSON = "dolg_export.json"
# Op types that TF Serving's C++ runtime cannot run (Python callbacks) or
# that tie a graph to XLA. The audit also refuses functions marked for XLA.
FORBIDDEN_OPS = frozenset({"PyFunc", "PyFuncStateless", "EagerPyFunc", "XlaCallModule"})
_XLA_ATTRS = ("_XlaMustCompile", "_XlaCompile")


@dataclasses.dataclass(frozen=True)
class ExportConfig(FrozenConfig):
    """How an export preprocesses and bounds its input.

    Attributes:
        image_size: longer side (``"aspect"``) or side (``"fixed"``) the
            image is resized to before the scale pyramid (unused by ``"none"``).
        resize: ``"aspect"``, ``"fixed"`` or ``"none"`` (see the module docstring).
        scales: the inference scales baked into the graph.
        max_image_bytes: largest encoded image accepted.
        max_image_pixels: largest decoded image (height x width) accepted,
            checked from the header before decoding.
        max_batch_size: most images in one request.
        antialias: antialias the first resize when it shrinks an image
            (the scale pyramid itself is plain bilinear, as in the official
            evaluation).
        warmup_batch_sizes: batch sizes of the ``serving_default`` warm-up
            requests (empty: write no warm-up file).
    """

    image_size: int = 512
    resize: str = "aspect"
    scales: tuple[float, ...] = PAPER_SCALES
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_batch_size: int = 32
    antialias: bool = True
    warmup_batch_sizes: tuple[int, ...] = (1,)

    def __post_init__(self):
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))
        object.__setattr__(self, "warmup_batch_sizes", tuple(int(b) for b in self.warmup_batch_sizes))
        if not isinstance(self.image_size, int) or not 16 <= self.image_size <= 4096:
            raise ConfigError(f"image_size must be an int in [16, 4096], got {self.image_size!r}")
        if self.resize not in RESIZE_POLICIES:
            raise ConfigError(f"resize must be one of {RESIZE_POLICIES}, got {self.resize!r}")
        if not self.scales or any(not 0 < s <= 4 for s in self.scales):
            raise ConfigError(f"scales must be a non-empty list of numbers in (0, 4], got {self.scales}")
        for name in ("max_image_bytes", "max_image_pixels", "max_batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if any(not 1 <= b <= self.max_batch_size for b in self.warmup_batch_sizes):
            raise ConfigError(f"warmup_batch_sizes must lie in [1, max_batch_size], got {self.warmup_batch_sizes}")


DEFAULT_IMAGE_SIZE = 512
# At the image's own resolution the largest scale (1.4142) doubles the pixels the
# network sees; 2048 x 2048 keeps one R101 request within a few GB, and covers
# Revisited Oxford / Paris (1024 px on the longer side).
OFFICIAL_MAX_IMAGE_PIXELS = 2048 * 2048
EXPORT_PROFILES: dict[str, dict[str, Any]] = {
    "default": {},
    "official": {"resize": "none", "scales": OFFICIAL_SCALES, "max_image_pixels": OFFICIAL_MAX_IMAGE_PIXELS},
}


def export_config_for(model, profile: str = "default", **options: Any) -> ExportConfig:
    """The :class:`ExportConfig` of a profile for ``model``, with ``options`` over it.

    The image size defaults to the crop size the model was trained at
    (``model.config.train_image_size``), else 512. An explicit ``image_size``
    that differs from the training size is allowed, with a warning.

    Raises:
        ConfigError: an unknown profile or an invalid option.
    """
    if profile not in EXPORT_PROFILES:
        raise ConfigError(f"unknown export profile {profile!r}; expected one of {sorted(EXPORT_PROFILES)}")
    values: dict[str, Any] = {"image_size": DEFAULT_IMAGE_SIZE, **EXPORT_PROFILES[profile]}
    trained = getattr(getattr(model, "config", None), "train_image_size", None)
    if trained:
        values["image_size"] = trained
        asked = options.get("image_size")
        if asked is not None and asked != trained and options.get("resize", values.get("resize")) != "none":
            log.warning(
                "exporting at image size %d, but the model was trained at %d; descriptors and speed will differ "
                "from the training resolution's",
                asked,
                trained,
            )
    values.update({k: v for k, v in options.items() if v is not None})
    return ExportConfig.from_dict(values)


# --------------------------------------------------------------------------- graph pieces


def _check(condition, template: str, values=()):
    """An Assert op whose message is one formatted string (reads well in INVALID_ARGUMENT)."""
    import tensorflow as tf

    message = tf.strings.format(template, values, summarize=-1)
    return tf.debugging.Assert(condition, [message], name="check")


def resize_for_embedding(pixels, config: ExportConfig):
    """The export's first resize, applied to a ``(B, H, W, 3)`` batch of one size.

    ``"aspect"``: each side times ``image_size / longer side``, rounded by
    :func:`dolg_tf.model.multiscale.scaled_size` (the one size rule);
    ``"fixed"``: ``image_size x image_size``; ``"none"``: the pixels as they
    are. Returns float32 in [0, 255].
    """
    import tensorflow as tf

    from dolg_tf.model.multiscale import scaled_size

    pixels = tf.cast(pixels, tf.float32)
    if config.resize == "none":
        return pixels
    shape = tf.shape(pixels)
    h, w = shape[1], shape[2]
    if config.resize == "fixed":
        size = tf.constant([config.image_size, config.image_size])
    else:
        ratio = tf.constant(float(config.image_size), tf.float64) / tf.cast(tf.maximum(h, w), tf.float64)
        size = tf.stack([scaled_size(h, ratio), scaled_size(w, ratio)])
    shrinking = tf.logical_or(size[0] < h, size[1] < w)
    if config.antialias:
        resized = tf.cond(
            shrinking,
            lambda: tf.image.resize(pixels, size, method="bilinear", antialias=True),
            lambda: tf.image.resize(pixels, size, method="bilinear", antialias=False),
        )
    else:
        resized = tf.image.resize(pixels, size, method="bilinear", antialias=False)
    return tf.clip_by_value(resized, 0.0, 255.0)


def embed_reference(model, encoded_images: Sequence[bytes], config: ExportConfig | dict[str, Any]) -> np.ndarray:
    """What an export computes, run eagerly with the Keras model (the reference the export tests compare to).

    Decodes with ``tf.io.decode_image`` (3 channels, first frame), applies
    :func:`resize_for_embedding` and the scale pyramid, one image at a time.
    """
    import tensorflow as tf

    from dolg_tf.model.multiscale import multiscale_embed

    if isinstance(config, dict):
        config = ExportConfig.from_dict(config)
    out = []
    for data in encoded_images:
        pixels = tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False)[None]
        resized = resize_for_embedding(pixels, config)
        out.append(np.asarray(multiscale_embed(model, resized, config.scales))[0])
    return np.stack(out).astype(np.float32)


class _ExportModule:
    """The two signature functions around a model."""

    def __init__(self, model, config: ExportConfig):
        self.model = model
        self.config = config

    def archive(self):
        """A ``keras.export.ExportArchive`` with both endpoints.

        ExportArchive (not ``tf.saved_model.save`` on a ``tf.Module``) is what
        ties the graph's variable handles to the restored checkpoint values
        for Keras 3 variables: with a bare ``tf.Module`` the Python loader
        works but the C++ loader (TF Serving) finds the variables uninitialised.
        """
        import keras
        import tensorflow as tf

        archive = keras.export.ExportArchive()
        archive.track(self.model)
        # Endpoints are traced with autograph off and without XLA.
        archive.add_endpoint(
            "serving_default", self._embed_images, input_signature=[tf.TensorSpec([None], tf.string, name="images")]
        )
        archive.add_endpoint(
            "embed_pixels",
            self._embed_pixels,
            input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="pixels")],
        )
        return archive

    # -- shared pieces ---------------------------------------------------------
    def _check_batch(self, n, what: str):
        import tensorflow as tf

        n = tf.cast(n, tf.int64)
        return [
            _check(n > 0, f"{what}: the batch is empty; send at least one image"),
            _check(
                n <= self.config.max_batch_size,
                f"{what}: batch of {{}} images is over the limit of {self.config.max_batch_size}",
                [n],
            ),
        ]

    def _embed_same_size(self, pixels):
        import tensorflow as tf

        from dolg_tf.model.multiscale import multiscale_embed

        resized = resize_for_embedding(pixels, self.config)
        return tf.cast(multiscale_embed(self.model, resized, self.config.scales), tf.float32)

    def _decode_one(self, index, data):
        """Checks and decodes one encoded image -> uint8 (H, W, 3)."""
        import tensorflow as tf

        from dolg_tf.data import images as images_lib

        c = self.config
        size = tf.cast(tf.strings.length(data), tf.int64)
        checks = [
            _check(size > 0, "images[{}]: empty image bytes", [index]),
            _check(
                size <= c.max_image_bytes,
                f"images[{{}}]: {{}} encoded bytes, over the limit of {c.max_image_bytes}",
                [index, size],
            ),
        ]
        with tf.control_dependencies(checks):
            # The same header reader as the training pipeline (dolg_tf.data.images).
            head, head_bytes = images_lib.read_header(data)
            fmt = images_lib.image_format(head)
            h, w = images_lib.encoded_dims(data, head, head_bytes, fmt)
            known = tf.not_equal(fmt, images_lib.UNKNOWN_FORMAT)
        with tf.control_dependencies(
            [
                _check(known, "images[{}]: not a JPEG, PNG, GIF, BMP or WebP image", [index]),
                _check(
                    (h > 0) & (w > 0),
                    "images[{}]: the image header gives an empty size {}x{} (truncated or corrupt image)",
                    [index, h, w],
                ),
                _check(
                    h * w <= c.max_image_pixels,
                    f"images[{{}}]: {{}}x{{}} = {{}} pixels, over the limit of {c.max_image_pixels}",
                    [index, h, w, h * w],
                ),
            ]
        ):
            image = tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False)
        return tf.ensure_shape(image, [None, None, 3])

    # -- signatures ------------------------------------------------------------
    def _embed_images(self, images):
        import tensorflow as tf

        n = tf.shape(images, out_type=tf.int64)[0]
        with tf.control_dependencies(self._check_batch(n, "images")):
            indices = tf.range(n)
        dim = int(self.model.output_shape[-1])
        if self.config.resize == "fixed":
            size = self.config.image_size

            def decode_fixed(args):
                i, data = args
                return resize_for_embedding(self._decode_one(i, data)[None], self.config)[0]

            batch = tf.map_fn(
                decode_fixed,
                (indices, images),
                fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32),
            )
            from dolg_tf.model.multiscale import multiscale_embed

            embedding = tf.cast(multiscale_embed(self.model, batch, self.config.scales), tf.float32)
        else:

            def embed_one(args):
                i, data = args
                return self._embed_same_size(self._decode_one(i, data)[None])[0]

            embedding = tf.map_fn(
                embed_one,
                (indices, images),
                fn_output_signature=tf.TensorSpec([dim], tf.float32),
                parallel_iterations=2,
            )
        return {"embedding": tf.identity(embedding, name="embedding")}

    def _embed_pixels(self, pixels):
        import tensorflow as tf

        c = self.config
        shape = tf.shape(pixels, out_type=tf.int64)
        checks = self._check_batch(shape[0], "pixels") + [
            _check(
                (shape[1] > 0) & (shape[2] > 0),
                "pixels: images must be at least 1x1, got {}x{}",
                [shape[1], shape[2]],
            ),
            _check(
                shape[1] * shape[2] <= c.max_image_pixels,
                f"pixels: {{}}x{{}} = {{}} pixels, over the limit of {c.max_image_pixels}",
                [shape[1], shape[2], shape[1] * shape[2]],
            ),
        ]
        with tf.control_dependencies(checks):
            pixels = tf.identity(pixels)
        return {"embedding": tf.identity(self._embed_same_size(pixels), name="embedding")}


# --------------------------------------------------------------------------- versions and files


def list_versions(base_dir: str | os.PathLike) -> list[int]:
    """Complete integer versions under ``base_dir`` (``saved_model.pb`` present), ascending; [] if it is missing."""
    return complete_versions(base_dir) if os.path.isdir(base_dir) else []


def _next_version(base_dir: str) -> int:
    # Incomplete integer directories count as taken too: never write into one.
    taken = [int(n) for n in os.listdir(base_dir) if VERSION_NAME.fullmatch(n)] if os.path.isdir(base_dir) else []
    return max(taken, default=0) + 1


def _encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def default_warmup_images(count: int, longer_side: int = 640) -> list[bytes]:
    """JPEG bytes of ``count`` of the built-in demo photographs (real images, shipped with scikit-image)."""
    from PIL import Image

    from dolg_tf.demo_data import demo_photos

    photos = list(demo_photos().values())
    out = []
    for i in range(count):
        image = Image.fromarray(photos[i % len(photos)])
        image.thumbnail((longer_side, longer_side))
        out.append(_encode_jpeg(np.asarray(image)))
    return out


def warmup_requests(
    images: Sequence[bytes], batch_sizes: Sequence[int], model_name: str = "dolg"
) -> list[bytes]:
    """Serialized ``PredictionLog`` records, one ``serving_default`` request per batch size."""
    import tensorflow as tf
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    records = []
    for batch in batch_sizes:
        chosen = [images[i % len(images)] for i in range(batch)]
        request = predict_pb2.PredictRequest(
            model_spec=model_pb2.ModelSpec(name=model_name, signature_name="serving_default")
        )
        request.inputs["images"].CopyFrom(tf.make_tensor_proto(np.array(chosen, dtype=object), dtype=tf.string))
        log_record = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
        records.append(log_record.SerializeToString())
    return records


def _versions() -> dict[str, str]:
    import keras
    import tensorflow as tf

    import dolg_tf

    return {"tensorflow": tf.__version__, "keras": keras.__version__, "dolg_tf": dolg_tf.__version__}


def export_saved_model(
    model,
    base_dir: str | os.PathLike = "saved_models/dolg",
    version: int | None = None,
    *,
    warmup_images: Sequence[bytes] | None = None,
    model_name: str = "dolg",
    extra_metadata: dict[str, Any] | None = None,
    profile: str = "default",
    progress: Callable[[str], None] | None = None,
    **export_options: Any,
) -> str:
    """Exports a DOLG model as a TF Serving SavedModel version directory.

    Args:
        model: a :class:`dolg_tf.model.DOLG` (any float-pixels -> descriptor
            Keras model works).
        base_dir: the model's base path (TF Serving's ``base_path``).
        version: integer version; default: one more than the highest present.
            An existing version is never overwritten.
        warmup_images: encoded images for the warm-up requests (default: the
            built-in demo photographs).
        model_name: model name written into the warm-up requests.
        extra_metadata: more JSON-able facts to record (e.g. training run).
        profile: a key of :data:`EXPORT_PROFILES`; ``export_options`` go over it.
        progress: called with a short description as each stage starts
            (tracing the signatures takes most of the time).
        **export_options: :class:`ExportConfig` fields (``None`` values are ignored).

    Returns:
        The version directory's path.

    Raises:
        ExportError: the version exists, or the base path is not a directory.
        ConfigError: an invalid export option.
    """
    import tensorflow as tf

    config = export_config_for(model, profile, **export_options)
    say = progress or (lambda message: log.info("%s", message))
    base_dir = os.fspath(base_dir)
    if os.path.exists(base_dir) and not os.path.isdir(base_dir):
        raise ExportError(f"export base path {base_dir!r} exists and is not a directory")
    os.makedirs(base_dir, exist_ok=True)
    if version is None:
        version = _next_version(base_dir)
    if not isinstance(version, int) or version < 1:
        raise ExportError(f"version must be a positive integer, got {version!r}")
    final = os.path.join(base_dir, str(version))
    if os.path.exists(final):
        raise ExportError(f"version {version} already exists at {final!r}; exports are never overwritten")

    # A dot-prefixed sibling: TF Serving only watches integer directory names,
    # so a half-written export is never picked up; rename makes it appear whole.
    tmp = tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=base_dir)
    try:
        # ExportArchive traces the endpoints while it writes, so this one stage takes most of the time.
        say(f"tracing the serving signatures and writing the SavedModel ({config.resize} resize, "
            f"scales {list(config.scales)})")
        _ExportModule(model, config).archive().write_out(tmp, verbose=False)
        extra = os.path.join(tmp, "assets.extra")
        os.makedirs(extra, exist_ok=True)
        if config.warmup_batch_sizes:
            say("writing the warm-up requests")
            images = list(warmup_images) if warmup_images else default_warmup_images(max(config.warmup_batch_sizes))
            with tf.io.TFRecordWriter(os.path.join(extra, WARMUP_FILE)) as writer:
                for record in warmup_requests(images, config.warmup_batch_sizes, model_name):
                    writer.write(record)
        model_cfg = model.get_config() if hasattr(model, "config") else {}
        metadata = {
            "format": "dolg_tf.export/1",
            "version": version,
            "model_class": type(model).__name__,
            "model_config": _jsonable(model_cfg),
            "export_config": config.to_dict(),
            "profile": profile,
            "embedding_dim": int(model.output_shape[-1]),
            "signatures": {
                "serving_default": {"inputs": {"images": "DT_STRING [-1]"}, "outputs": {"embedding": "DT_FLOAT [-1, D]"}},
                "embed_pixels": {"inputs": {"pixels": "DT_UINT8 [-1, -1, -1, 3]"}, "outputs": {"embedding": "DT_FLOAT [-1, D]"}},
            },
            "versions": _versions(),
            **(extra_metadata or {}),
        }
        with open(os.path.join(extra, EXPORT_JSON), "w") as f:
            json.dump(metadata, f, indent=2, sort_keys=True)
        say("auditing the graph for ops TF Serving cannot run")
        problems = audit_saved_model(tmp)
        if problems:
            raise ExportError("the export contains ops TF Serving cannot run: " + "; ".join(problems))
        _apply_umask(tmp)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s (%s, image_size %d, scales %s)", final, config.resize, config.image_size, config.scales)
    return final


def _apply_umask(folder: str) -> None:
    """Gives a finished export the modes of ordinary files (``0o666 & ~umask``, folders ``0o777 & ~umask``).

    ``tempfile.mkdtemp`` makes the folder 0700, so without this a TF Serving
    that runs as another user (as containers do) could not read the export.
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


def _jsonable(value):
    return json.loads(json.dumps(value, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def read_export_metadata(export_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``dolg_export.json`` of an export directory."""
    path = os.path.join(os.fspath(export_dir), "assets.extra", EXPORT_JSON)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise ExportError(f"{export_dir!r} is not a dolg_tf export (no readable {EXPORT_JSON}): {err}") from err


# --------------------------------------------------------------------------- audit


def audit_saved_model(export_dir: str | os.PathLike) -> list[str]:
    """Problems that would stop TF Serving from running an export (empty list: none).

    Reads ``saved_model.pb`` and walks the graph and every function in its
    library: Python-callback ops (``PyFunc``, ``EagerPyFunc``...),
    ``XlaCallModule`` and functions marked for XLA compilation are reported.
    """
    from tensorflow.core.protobuf import saved_model_pb2

    path = os.path.join(os.fspath(export_dir), "saved_model.pb")
    saved = saved_model_pb2.SavedModel()
    try:
        with open(path, "rb") as f:
            saved.ParseFromString(f.read())
    except (OSError, Exception) as err:  # DecodeError is not an OSError
        return [f"cannot read {path}: {err}"]
    problems = []
    for meta in saved.meta_graphs:
        graph = meta.graph_def
        for node in graph.node:
            if node.op in FORBIDDEN_OPS:
                problems.append(f"graph node {node.name!r} is a {node.op}")
        for fn in graph.library.function:
            name = fn.signature.name
            for attr in _XLA_ATTRS:
                if attr in fn.attr and fn.attr[attr].b:
                    problems.append(f"function {name!r} is marked {attr}")
            for node in fn.node_def:
                if node.op in FORBIDDEN_OPS:
                    problems.append(f"function {name!r} node {node.name!r} is a {node.op}")
                for attr in _XLA_ATTRS:
                    if attr in node.attr and node.attr[attr].b:
                        problems.append(f"function {name!r} node {node.name!r} is marked {attr}")
    return problems


def op_types(export_dir: str | os.PathLike) -> set[str]:
    """Every op type used in an export's graph and functions (for audits and tests)."""
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel()
    with open(os.path.join(os.fspath(export_dir), "saved_model.pb"), "rb") as f:
        saved.ParseFromString(f.read())
    ops = set()
    for meta in saved.meta_graphs:
        ops.update(n.op for n in meta.graph_def.node)
        for fn in meta.graph_def.library.function:
            ops.update(n.op for n in fn.node_def)
    return ops


# --------------------------------------------------------------------------- C API proof


class CApiRunError(ExportError):
    """The TF C API could not load or run an export; ``stage`` is "load", "signature" or "run"."""

    def __init__(self, stage: str, code: int, message: str):
        super().__init__(f"TF C API {stage} failed (code {code}): {message}")
        self.stage, self.code, self.message = stage, code, message


def run_with_c_api(
    export_dir: str | os.PathLike,
    *,
    images: Sequence[bytes] | None = None,
    pixels: np.ndarray | None = None,
    signature: str | None = None,
    timeout: float = 300.0,
) -> np.ndarray:
    """Runs an export through TF's C API in a fresh process that never imports ``tensorflow``.

    This is TF Serving's loader path (``LoadSavedModel`` from
    ``libtensorflow_cc``): an export that runs here runs in TF Serving.
    Give either encoded ``images`` (``serving_default``) or uint8 ``pixels``
    (``embed_pixels``).

    Returns:
        The ``embedding`` output as float32.

    Raises:
        CApiRunError: load, signature lookup or run failed (e.g. an op TF
            Serving does not have, or INVALID_ARGUMENT from a bounds check).
        ExportError: the subprocess itself failed or imported TensorFlow.
    """
    import base64
    import subprocess
    import sys

    if (images is None) == (pixels is None):
        raise ConfigError("give exactly one of images= or pixels=")
    if images is not None:
        inputs = {"images": {"dtype": "string", "b64": [base64.b64encode(bytes(b)).decode() for b in images]}}
        signature = signature or "serving_default"
    else:
        pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
        inputs = {"pixels": {"dtype": "uint8", "shape": list(pixels.shape), "b64": base64.b64encode(pixels.tobytes()).decode()}}
        signature = signature or "embed_pixels"
    request = {"export_dir": os.path.abspath(os.fspath(export_dir)), "signature": signature, "inputs": inputs}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSTARTUP"}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    proc = subprocess.run(
        [sys.executable, "-m", "dolg_tf.capi"],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if proc.returncode != 0 or not proc.stdout.strip():
        raise ExportError(f"the C API subprocess failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    answer = json.loads(proc.stdout)
    if answer.get("tensorflow_imported"):
        raise ExportError("the C API subprocess imported tensorflow; the check would prove nothing")
    if not answer["ok"]:
        raise CApiRunError(answer["stage"], answer["code"], answer["message"])
    out = answer["outputs"]["embedding"]
    return np.asarray(out["data"], np.float32).reshape(out["shape"])
