"""SavedModel export for TF Serving.

``export_saved_model(model, "saved_models/dolg")`` writes
``saved_models/dolg/<next integer version>/`` with one MetaGraph tagged
``serve`` and two signatures, ``serving_default`` (encoded image bytes ->
``embedding``) and ``embed_pixels`` (uint8 pixels -> ``embedding``).

The package's modules:

* :mod:`dolg_tf.export.contract`: what a server or a client needs to know about
  an export (signature names, keys, dtypes, :class:`ExportConfig` and its
  profiles, ``dolg_export.json``, version directories), with no TensorFlow import;
* :mod:`dolg_tf.export.graph`: the in-graph checks, decoding, resize and the
  signature functions;
* :mod:`dolg_tf.export.writer`: :func:`export_saved_model`, warm-up records and
  the atomic version directory;
* :mod:`dolg_tf.export.reader`: the one parser of ``saved_model.pb``;
* :mod:`dolg_tf.export.audit`: the op audit and the run through TF Serving's
  loader (TF C API, :mod:`dolg_tf.export.capi`).

The contract's names are imported here at once; the others on first use, so
``import dolg_tf.export.contract`` (and this package) does not load TensorFlow.
"""

from __future__ import annotations

from dolg_tf._lazy import lazy_exports
from dolg_tf.export.contract import (
    DEFAULT_IMAGE_SIZE,
    EXPORT_JSON,
    EXPORT_PROFILES,
    OFFICIAL_MAX_IMAGE_PIXELS,
    RESIZE_POLICIES,
    WARMUP_FILE,
    ExportConfig,
    complete_versions,
    export_config_for,
    list_versions,
    read_export_metadata,
)

_LAZY = {
    "ExportModule": "dolg_tf.export.graph",
    "embed_reference": "dolg_tf.export.graph",
    "resize_for_embedding": "dolg_tf.export.graph",
    "default_warmup_images": "dolg_tf.export.writer",
    "export_saved_model": "dolg_tf.export.writer",
    "library_versions": "dolg_tf.export.writer",
    "warmup_requests": "dolg_tf.export.writer",
    "read_meta_graph": "dolg_tf.export.reader",
    "read_saved_model": "dolg_tf.export.reader",
    "FORBIDDEN_OPS": "dolg_tf.export.audit",
    "CApiRunError": "dolg_tf.export.audit",
    "audit_saved_model": "dolg_tf.export.audit",
    "op_types": "dolg_tf.export.audit",
    "run_with_c_api": "dolg_tf.export.audit",
}

__all__ = [
    "CApiRunError",
    "DEFAULT_IMAGE_SIZE",
    "EXPORT_JSON",
    "EXPORT_PROFILES",
    "ExportConfig",
    "ExportModule",
    "FORBIDDEN_OPS",
    "OFFICIAL_MAX_IMAGE_PIXELS",
    "RESIZE_POLICIES",
    "WARMUP_FILE",
    "audit_saved_model",
    "complete_versions",
    "default_warmup_images",
    "embed_reference",
    "export_config_for",
    "export_saved_model",
    "library_versions",
    "list_versions",
    "op_types",
    "read_export_metadata",
    "read_meta_graph",
    "read_saved_model",
    "resize_for_embedding",
    "run_with_c_api",
    "warmup_requests",
]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
