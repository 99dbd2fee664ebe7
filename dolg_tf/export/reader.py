"""The one reader of ``saved_model.pb``: the SavedModel protobuf, and its MetaGraph tagged ``serve``.

Used by the op audit, ``dolg serve`` (signature definitions) and the client's
in-process transport (model metadata). Parsing needs TensorFlow's generated
protobuf classes, so this module imports TensorFlow; the TF-free part of the
contract (file names, version directories) is :mod:`dolg_tf.export.contract`.
"""

from __future__ import annotations

import os

from google.protobuf.message import DecodeError
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2

from dolg_tf.errors import ExportError
from dolg_tf.export.contract import SAVED_MODEL_FILE, SERVE_TAG

# The graph of a large export (R101, five scales) is a few MB; protobuf itself refuses messages over 2 GB.
MAX_SAVED_MODEL_BYTES = (2 << 30) - 1


def read_saved_model(export_dir: str | os.PathLike) -> saved_model_pb2.SavedModel:
    """Parses ``<export_dir>/saved_model.pb``.

    Raises:
        ExportError: the file is missing, unreadable, too large for protobuf,
            or not a SavedModel.
    """
    path = os.path.join(os.fspath(export_dir), SAVED_MODEL_FILE)
    saved = saved_model_pb2.SavedModel()
    try:
        size = os.path.getsize(path)
        if size > MAX_SAVED_MODEL_BYTES:
            raise ExportError(f"cannot read {path}: {size} bytes, over protobuf's limit of {MAX_SAVED_MODEL_BYTES}")
        with open(path, "rb") as f:
            saved.ParseFromString(f.read())
    except OSError as err:
        raise ExportError(f"cannot read {path}: {err.strerror or err}") from err
    except DecodeError as err:
        raise ExportError(f"cannot read {path}: not a SavedModel protobuf ({err})") from err
    return saved


def read_meta_graph(export_dir: str | os.PathLike, tag: str = SERVE_TAG) -> meta_graph_pb2.MetaGraphDef:
    """The MetaGraphDef tagged ``tag`` (TF Serving loads the one tagged ``serve``).

    Raises:
        ExportError: ``saved_model.pb`` cannot be read or has no MetaGraph with that tag.
    """
    for meta_graph in read_saved_model(export_dir).meta_graphs:
        if tag in meta_graph.meta_info_def.tags:
            return meta_graph
    raise ExportError(f"{os.fspath(export_dir)}: no MetaGraph tagged {tag!r} in {SAVED_MODEL_FILE}")
