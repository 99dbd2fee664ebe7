"""A local server speaking TF Serving's gRPC and REST protocols (``dolg serve``).

Production serves the export with the official TF Serving container (see
``serving/``); this is the stand-in for development, tests and the quick start
where ``tensorflow_model_server`` is not installed. It loads the same
SavedModel directories, runs the same signatures and answers with the same
messages and status codes for everything the client touches.
"""

from dolg_tf.server.app import DolgServer, ServeOptions
from dolg_tf.server.models import ModelManager, Servable, VersionPolicy, parse_version_labels
from dolg_tf.server.status import RequestError

__all__ = [
    "DolgServer",
    "ModelManager",
    "RequestError",
    "Servable",
    "ServeOptions",
    "VersionPolicy",
    "parse_version_labels",
]
