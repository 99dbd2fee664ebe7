"""A local server speaking TF Serving's gRPC and REST protocols (``dolg serve``).

Production serves the export with the official TF Serving container (see
``serving/``); this is the stand-in for development, tests and the quick start
where ``tensorflow_model_server`` is not installed. It loads the same
SavedModel directories, runs the same signatures and answers with the same
messages and status codes for everything the client touches.

The names below are imported on first use, so ``dolg_tf.server.preflight``
(argument and port checks) runs before TensorFlow is imported.
"""

from __future__ import annotations

from dolg_tf._lazy import lazy_exports

_EXPORTS = {
    "DolgServer": "dolg_tf.server.app",
    "ServeOptions": "dolg_tf.server.app",
    "ModelManager": "dolg_tf.server.models",
    "Servable": "dolg_tf.server.models",
    "VersionPolicy": "dolg_tf.server.preflight",
    "parse_version_labels": "dolg_tf.server.preflight",
    "RequestError": "dolg_tf.server.status",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
