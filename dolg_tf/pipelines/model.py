"""The export as a Beam RunInference model: what it is (name, version, fingerprint, limits) and how to run it.

Beam's stock ``TFModelHandler*`` imports tensorflow-hub, which does not import on
TensorFlow 2.21, so :class:`SavedModelHandler` is a small ``ModelHandler`` of our own:
it loads the SavedModel with ``tf.saved_model.load`` and calls its ``serving_default``
signature on a batch of encoded images, exactly as TF Serving would.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import posixpath
from collections.abc import Iterable, Sequence
from typing import Any

from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from dolg_tf.errors import ExportError
from dolg_tf.export.contract import (
    DEFAULT_SIGNATURE,
    EMBEDDING_KEY,
    EXPORT_JSON,
    IMAGES_KEY,
    SAVED_MODEL_FILE,
    SERVE_TAG,
    VERSION_NAME,
    complete_versions,
    is_saved_model_dir,
    read_export_metadata,
)

log = logging.getLogger(__name__)


def _is_remote(path: str) -> bool:
    return "://" in path


@dataclasses.dataclass(frozen=True)
class ExportInfo:
    """What a batch run records about the export it used.

    Attributes:
        directory: the version directory (``.../<name>/<version>``).
        model_name: the base path's folder name (TF Serving's model name), or as given.
        version: the integer version (None for a lone SavedModel directory).
        fingerprint: TensorFlow's SavedModel fingerprint ``singleprint()``
            (``fingerprint.pb``): it changes whenever the graph or the weights change.
        embedding_dim: the descriptor size.
        max_batch_size, max_image_bytes, max_image_pixels: the export's input bounds.
        signature_name: the signature run (``serving_default``).
    """

    directory: str
    model_name: str
    version: int | None
    fingerprint: str
    embedding_dim: int
    max_batch_size: int
    max_image_bytes: int
    max_image_pixels: int
    signature_name: str = DEFAULT_SIGNATURE

    def parquet_metadata(self) -> dict[str, str]:
        """The key/value pairs written into every Parquet file's metadata."""
        return {
            "dolg.model_name": self.model_name,
            "dolg.model_version": "" if self.version is None else str(self.version),
            "dolg.fingerprint": self.fingerprint,
            "dolg.signature": self.signature_name,
            "dolg.embedding_dim": str(self.embedding_dim),
            "dolg.saved_model": self.directory,
        }


def _resolve_remote(path: str) -> tuple[str, int | None]:
    import tensorflow as tf

    path = path.rstrip("/")
    if is_saved_model_dir(path, isfile=tf.io.gfile.exists):
        name = posixpath.basename(path)
        return path, int(name) if VERSION_NAME.fullmatch(name) else None
    try:
        versions = complete_versions(path, listdir=tf.io.gfile.listdir, isfile=tf.io.gfile.exists)
    except tf.errors.OpError as err:
        raise ExportError(f"no SavedModel directory at {path!r}: {err.message}") from None
    if not versions:
        raise ExportError(f"{path!r} holds no {SAVED_MODEL_FILE} and no integer version directories")
    return posixpath.join(path, str(versions[-1])), versions[-1]


def describe_export(path: str, model_name: str | None = None, signature_name: str = DEFAULT_SIGNATURE) -> ExportInfo:
    """Resolves an export's base path (newest version) or version directory and reads its facts.

    Reads ``assets.extra/dolg_export.json`` and ``fingerprint.pb``; loads no graph.
    Local paths and any file system TensorFlow reads (``gs://``) work.

    Raises:
        ExportError: no SavedModel there, or it is not a dolg_tf export.
    """
    import tensorflow as tf

    path = os.fspath(path)
    if _is_remote(path):
        directory, version = _resolve_remote(path)
    else:
        from dolg_tf.client.local import resolve_version_dir
        from dolg_tf.errors import ModelNotFoundError

        try:
            directory, version = resolve_version_dir(path)
        except ModelNotFoundError as err:
            raise ExportError(f"saved_model: {err}") from None
        directory = os.path.abspath(directory)
    meta = read_export_metadata(directory, open_file=tf.io.gfile.GFile, file_errors=(tf.errors.OpError,))
    try:
        export_config = meta["export_config"]
        dim = int(meta["embedding_dim"])
    except (ValueError, KeyError, TypeError) as err:
        raise ExportError(f"{directory!r} is not a dolg_tf export ({EXPORT_JSON} lacks {err})") from None
    try:
        fingerprint = tf.saved_model.experimental.read_fingerprint(directory).singleprint()
    except (tf.errors.OpError, ValueError, FileNotFoundError) as err:
        raise ExportError(
            f"{directory!r} has no readable fingerprint.pb ({err}); re-export it with dolg export"
        ) from None
    if model_name is None:
        if version is not None:
            parent = posixpath.dirname(directory) if _is_remote(directory) else os.path.dirname(directory)
        else:
            parent = directory
        model_name = posixpath.basename(parent.rstrip("/")) if _is_remote(parent) else os.path.basename(parent)
    return ExportInfo(
        directory=directory,
        model_name=model_name,
        version=version,
        fingerprint=fingerprint,
        embedding_dim=dim,
        max_batch_size=int(export_config["max_batch_size"]),
        max_image_bytes=int(export_config["max_image_bytes"]),
        max_image_pixels=int(export_config["max_image_pixels"]),
        signature_name=signature_name,
    )


class ImageRejected(str):
    """The inference result of an image the model refused: the model's message (goes to the dead letters)."""


class _Loaded:
    """Keeps the loaded SavedModel alive beside its signature function."""

    def __init__(self, loaded, fn):
        self.loaded = loaded
        self.fn = fn


class SavedModelHandler(ModelHandler[bytes, PredictionResult, Any]):
    """Runs a SavedModel signature on batches of encoded images (for ``RunInference``).

    Wrap it in ``KeyedModelHandler`` to carry ids. A batch the model refuses as a whole
    (``InvalidArgumentError``; the pipeline validates images first, so this is rare) is
    retried image by image, and each refused image's result is an :class:`ImageRejected`
    message instead of a vector: one bad image never fails its batch.

    Args:
        directory: the SavedModel (version) directory.
        signature_name: the signature to call; it takes ``images`` (DT_STRING [-1]) and
            returns ``embedding`` (DT_FLOAT [-1, D]).
        batch_size: images per call; Beam's ``BatchElements`` gets it as both its min and
            max, so every batch but the last of a bundle is full.
    """

    def __init__(self, directory: str, signature_name: str = DEFAULT_SIGNATURE, batch_size: int = 32):
        super().__init__(min_batch_size=batch_size, max_batch_size=batch_size)
        self._directory = directory
        self._signature_name = signature_name

    def load_model(self) -> _Loaded:
        import tensorflow as tf

        loaded = tf.saved_model.load(self._directory, tags=[SERVE_TAG])
        fn = loaded.signatures.get(self._signature_name)
        if fn is None:
            raise ExportError(f"the SavedModel at {self._directory!r} has no signature {self._signature_name!r}")
        return _Loaded(loaded, fn)

    def _call(self, model: _Loaded, blobs: Sequence[bytes]):
        import tensorflow as tf

        return model.fn(**{IMAGES_KEY: tf.constant(list(blobs), dtype=tf.string)})[EMBEDDING_KEY].numpy()

    def run_inference(
        self, batch: Sequence[bytes], model: _Loaded, inference_args: dict[str, Any] | None = None
    ) -> Iterable[PredictionResult]:
        import tensorflow as tf

        from dolg_tf.pipelines.sources import tf_error_text

        try:
            out = self._call(model, batch)
            return [PredictionResult(None, row) for row in out]
        except tf.errors.InvalidArgumentError:
            log.warning("a batch of %d images was refused; retrying them one by one", len(batch))
        results = []
        for blob in batch:
            try:
                results.append(PredictionResult(None, self._call(model, [blob])[0]))
            except tf.errors.InvalidArgumentError as err:
                results.append(PredictionResult(None, ImageRejected(tf_error_text(err.message))))
        return results

    def get_num_bytes(self, batch: Sequence[bytes]) -> int:
        return sum(len(b) for b in batch)

    def get_metrics_namespace(self) -> str:
        return "dolg_tf"
