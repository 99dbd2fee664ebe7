"""TF Serving's generated protobuf / gRPC modules, imported without TensorFlow.

The ``tensorflow_serving.apis`` modules import ``tensorflow.core.framework.*_pb2``
(TensorProto, SignatureDef...). Those generated files are plain protobuf code,
but importing anything under ``tensorflow`` first runs ``tensorflow/__init__.py``,
which loads the whole runtime (about 2.5 s and hundreds of MB). When TensorFlow is
not imported yet, a bare placeholder package stands in for ``tensorflow`` while the
``*_pb2`` files load from their real directory; then every ``tensorflow.*`` entry
this added is removed from ``sys.modules``, so a later ``import tensorflow`` in
the same process runs its real ``__init__`` as usual. The message classes stay
the same objects either way: protobuf keys them by descriptor in the default pool,
so ``tf.make_tensor_proto`` still builds the ``TensorProto`` these requests hold.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import types

_NEEDED = (
    "tensorflow.core.framework.types_pb2",
    "tensorflow.core.framework.tensor_pb2",
    "tensorflow.core.protobuf.meta_graph_pb2",
    "tensorflow_serving.apis.model_pb2",
    "tensorflow_serving.apis.predict_pb2",
    "tensorflow_serving.apis.get_model_metadata_pb2",
    "tensorflow_serving.apis.get_model_status_pb2",
    "tensorflow_serving.apis.prediction_service_pb2_grpc",
    "tensorflow_serving.apis.model_service_pb2_grpc",
)


def _load() -> dict[str, types.ModuleType]:
    if "tensorflow" in sys.modules:  # already paid for: import normally
        return {name: importlib.import_module(name) for name in _NEEDED}
    spec = importlib.util.find_spec("tensorflow")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "dolg_tf.client needs the `tensorflow` wheel's protobuf files (pip install tensorflow-serving-api)"
        )
    placeholder = types.ModuleType("tensorflow")
    placeholder.__path__ = list(spec.submodule_search_locations)
    placeholder.__spec__ = importlib.machinery.ModuleSpec("tensorflow", None, is_package=True)
    placeholder.__spec__.submodule_search_locations = placeholder.__path__
    before = set(sys.modules)
    sys.modules["tensorflow"] = placeholder
    try:
        return {name: importlib.import_module(name) for name in _NEEDED}
    finally:
        for name in set(sys.modules) - before:
            if name == "tensorflow" or name.startswith("tensorflow."):
                del sys.modules[name]


_modules = _load()
types_pb2 = _modules["tensorflow.core.framework.types_pb2"]
tensor_pb2 = _modules["tensorflow.core.framework.tensor_pb2"]
meta_graph_pb2 = _modules["tensorflow.core.protobuf.meta_graph_pb2"]
model_pb2 = _modules["tensorflow_serving.apis.model_pb2"]
predict_pb2 = _modules["tensorflow_serving.apis.predict_pb2"]
get_model_metadata_pb2 = _modules["tensorflow_serving.apis.get_model_metadata_pb2"]
get_model_status_pb2 = _modules["tensorflow_serving.apis.get_model_status_pb2"]
prediction_service_pb2_grpc = _modules["tensorflow_serving.apis.prediction_service_pb2_grpc"]
model_service_pb2_grpc = _modules["tensorflow_serving.apis.model_service_pb2_grpc"]
del _modules
