"""An in-process transport: the same client, with the SavedModel run by TensorFlow in this process.

Used by ``dolg embed --saved-model DIR`` and as a reference: the images go
through the same preparation and batching as over the wire, and the
``serving_default`` signature runs exactly as TF Serving would run it. Importing
this module does not import TensorFlow; opening a model does.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np

from dolg_tf.client import _protos as pb
from dolg_tf.client.transports import INPUT_KEY, OUTPUT_KEY, ModelSpec, Rejected, VersionStatus
from dolg_tf.errors import ClientError, ExportError, ModelNotFoundError
from dolg_tf.export.contract import SAVED_MODEL_FILE, SERVE_TAG, VERSION_NAME, complete_versions, is_saved_model_dir

log = logging.getLogger(__name__)


def resolve_version_dir(path: str | os.PathLike, version: int | None = None) -> tuple[str, int | None]:
    """A SavedModel directory: ``path`` itself, or ``path/<version>`` (default: the highest version).

    Raises:
        ModelNotFoundError: no SavedModel there, or no such version.
    """
    path = os.fspath(path)
    if is_saved_model_dir(path):
        if version is not None:
            raise ModelNotFoundError(f"{path!r} is a single SavedModel; it has no version {version}")
        name = os.path.basename(os.path.normpath(path))
        return path, int(name) if VERSION_NAME.fullmatch(name) else None
    if not os.path.isdir(path):
        raise ModelNotFoundError(f"no SavedModel directory at {path!r}")
    versions = complete_versions(path)
    if not versions:
        raise ModelNotFoundError(f"{path!r} holds no {SAVED_MODEL_FILE} and no integer version directories")
    if version is None:
        version = versions[-1]
    elif version not in versions:
        raise ModelNotFoundError(f"{path!r} has no version {version} (it has {versions})")
    return os.path.join(path, str(version)), version


class SavedModelTransport:
    """Runs a SavedModel's signature in-process with TensorFlow (loaded on construction)."""

    protocol = "saved_model"

    def __init__(self, path: str | os.PathLike, spec: ModelSpec):
        import tensorflow as tf

        self._tf = tf
        self.spec = spec
        self.directory, self._version = resolve_version_dir(path, spec.version)
        self.target = self.directory
        self.max_message_bytes = 2**62  # no wire: only the batch size and image limits apply
        try:
            self._loaded = tf.saved_model.load(self.directory, tags=[SERVE_TAG])
        except (OSError, ValueError, RuntimeError, tf.errors.OpError) as err:
            raise ModelNotFoundError(f"cannot load the SavedModel at {self.directory!r}: {err}") from err
        self._fn = self._loaded.signatures.get(spec.signature_name)

    def metadata(self, timeout: float):
        # TensorFlow is loaded already (the constructor loaded the model).
        from dolg_tf.export.reader import read_meta_graph

        try:
            meta = read_meta_graph(self.directory, SERVE_TAG)
        except ExportError as err:
            raise ModelNotFoundError(str(err)) from None
        signature_map = pb.get_model_metadata_pb2.SignatureDefMap()
        for name, sig in meta.signature_def.items():
            signature_map.signature_def[name].CopyFrom(sig)
        return signature_map, self._version

    def status(self, timeout: float) -> list[VersionStatus]:
        return [VersionStatus(self._version or 0, "AVAILABLE")]

    def predict(self, blobs: Sequence[bytes], timeout: float) -> np.ndarray:
        tf = self._tf
        if self._fn is None:
            raise ModelNotFoundError(
                f"the SavedModel at {self.directory!r} has no signature {self.spec.signature_name!r}"
            )
        try:
            out = self._fn(**{INPUT_KEY: tf.constant(list(blobs), dtype=tf.string)})
        except tf.errors.InvalidArgumentError as err:
            raise Rejected(err.message) from None
        except tf.errors.OpError as err:
            raise ClientError(f"the SavedModel failed: {type(err).__name__}: {err.message}") from None
        return np.asarray(out[OUTPUT_KEY].numpy(), dtype=np.float32)

    @staticmethod
    def item_cost(nbytes: int) -> int:
        return nbytes

    def fixed_cost(self) -> int:
        return 0

    def close(self) -> None:
        self._fn = None
        self._loaded = None
