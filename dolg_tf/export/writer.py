"""Writing an export: ``export_saved_model`` -> ``<base_dir>/<next integer version>/``.

The version directory appears whole or not at all: everything is written into
a dot-named sibling (TF Serving only watches integer names), audited, and
renamed into place. Beside the SavedModel the writer puts
``assets.extra/tf_serving_warmup_requests`` (TF Serving's warm-up file:
``PredictionLog`` records built from real photos) and
``assets.extra/dolg_export.json`` (model config, export config, library versions).
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from PIL import Image
from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

import dolg_tf
from dolg_tf.demo.photos import demo_photos
from dolg_tf.errors import ExportError
from dolg_tf.export.audit import audit_saved_model
from dolg_tf.export.contract import (
    ASSETS_EXTRA,
    DEFAULT_SIGNATURE,
    EXPORT_FORMAT,
    EXPORT_JSON,
    IMAGES_KEY,
    SIGNATURES,
    WARMUP_FILE,
    export_config_for,
    next_version,
)
from dolg_tf.export.graph import ExportModule
from dolg_tf.model.fold import inference_model

log = logging.getLogger(__name__)


def _encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def default_warmup_images(count: int, longer_side: int = 640) -> list[bytes]:
    """JPEG bytes of ``count`` of the built-in demo photographs (real images, shipped with scikit-image)."""
    photos = list(demo_photos().values())
    out = []
    for i in range(count):
        image = Image.fromarray(photos[i % len(photos)])
        image.thumbnail((longer_side, longer_side))
        out.append(_encode_jpeg(np.asarray(image)))
    return out


def warmup_requests(images: Sequence[bytes], batch_sizes: Sequence[int], model_name: str = "dolg") -> list[bytes]:
    """Serialized ``PredictionLog`` records, one ``serving_default`` request per batch size."""
    records = []
    for batch in batch_sizes:
        chosen = [images[i % len(images)] for i in range(batch)]
        request = predict_pb2.PredictRequest(
            model_spec=model_pb2.ModelSpec(name=model_name, signature_name=DEFAULT_SIGNATURE)
        )
        request.inputs[IMAGES_KEY].CopyFrom(tf.make_tensor_proto(np.array(chosen, dtype=object), dtype=tf.string))
        log_record = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
        records.append(log_record.SerializeToString())
    return records


def library_versions() -> dict[str, str]:
    """The versions of TensorFlow, Keras and dolg_tf that write an export (recorded in ``dolg_export.json``)."""
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
        profile: a key of :data:`dolg_tf.export.EXPORT_PROFILES`; ``export_options`` go over it.
        progress: called with a short description as each stage starts
            (tracing the signatures takes most of the time).
        **export_options: :class:`dolg_tf.export.ExportConfig` fields (``None`` values are ignored).

    Returns:
        The version directory's path.

    Raises:
        ExportError: the version exists, or the base path is not a directory.
        ConfigError: an invalid export option.
    """
    config = export_config_for(model, profile, **export_options)
    say = progress or (lambda message: log.info("%s", message))
    base_dir = os.fspath(base_dir)
    if os.path.exists(base_dir) and not os.path.isdir(base_dir):
        raise ExportError(f"export base path {base_dir!r} exists and is not a directory")
    os.makedirs(base_dir, exist_ok=True)
    if version is None:
        version = next_version(base_dir)
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
        say(
            f"tracing the serving signatures and writing the SavedModel ({config.resize} resize, "
            f"scales {list(config.scales)})"
        )
        # Batch norms folded into the convolutions: fewer passes at inference, same outputs (within 1e-6).
        ExportModule(inference_model(model), config).archive().write_out(tmp, verbose=False)
        extra = os.path.join(tmp, ASSETS_EXTRA)
        os.makedirs(extra, exist_ok=True)
        if config.warmup_batch_sizes:
            say("writing the warm-up requests")
            images = list(warmup_images) if warmup_images else default_warmup_images(max(config.warmup_batch_sizes))
            with tf.io.TFRecordWriter(os.path.join(extra, WARMUP_FILE)) as writer:
                for record in warmup_requests(images, config.warmup_batch_sizes, model_name):
                    writer.write(record)
        model_cfg = model.get_config() if hasattr(model, "config") else {}
        metadata = {
            "format": EXPORT_FORMAT,
            "version": version,
            "model_class": type(model).__name__,
            "model_config": _jsonable(model_cfg),
            "export_config": config.to_dict(),
            "profile": profile,
            "embedding_dim": int(model.output_shape[-1]),
            "signatures": SIGNATURES,
            "versions": library_versions(),
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
