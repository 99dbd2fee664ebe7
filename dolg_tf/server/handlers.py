"""TF Serving's request handlers, protocol-neutral: Predict, GetModelMetadata and GetModelStatus on protobuf messages.

Each handler takes the :class:`~dolg_tf.server.models.ModelManager` and a
``tensorflow_serving.apis`` request message and returns the response message,
or raises :class:`~dolg_tf.server.status.RequestError` with TF Serving's status
code. The gRPC servicers (:mod:`dolg_tf.server.grpc_server`) and the REST front
end (:mod:`dolg_tf.server.rest`) both call them, so both protocols answer alike.
"""

from __future__ import annotations

from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2, predict_pb2

from dolg_tf.server.models import ModelManager
from dolg_tf.server.status import invalid_argument

SIGNATURE_DEF_FIELD = "signature_def"


def predict(manager: ModelManager, request: predict_pb2.PredictRequest) -> predict_pb2.PredictResponse:
    """Runs a ``PredictRequest`` on the version its ``model_spec`` names."""
    return manager.resolve_spec(request.model_spec).predict(request)


def model_metadata(
    manager: ModelManager, request: get_model_metadata_pb2.GetModelMetadataRequest
) -> get_model_metadata_pb2.GetModelMetadataResponse:
    """The version's ``SignatureDefMap`` packed under ``metadata["signature_def"]``, as TF Serving returns it."""
    if not request.metadata_field:
        raise invalid_argument("GetModelMetadataRequest must specify at least one metadata_field")
    for name in request.metadata_field:
        if name != SIGNATURE_DEF_FIELD:
            raise invalid_argument(f"Metadata field {name} is not supported")
    servable = manager.resolve_spec(request.model_spec)
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    response.model_spec.name = servable.name
    response.model_spec.version.value = servable.version
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    for key, signature_def in servable.signature_defs.items():
        signature_map.signature_def[key].CopyFrom(signature_def)
    response.metadata[SIGNATURE_DEF_FIELD].Pack(signature_map)
    return response


def model_status(
    manager: ModelManager, request: get_model_status_pb2.GetModelStatusRequest
) -> get_model_status_pb2.GetModelStatusResponse:
    """One ``ModelVersionStatus`` per version (or the one version / label asked for)."""
    spec = request.model_spec
    version = spec.version.value if spec.HasField("version") else None
    label = spec.version_label if spec.WhichOneof("version_choice") == "version_label" else None
    response = get_model_status_pb2.GetModelStatusResponse()
    for number, state in manager.version_states(spec.name, version, label).items():
        entry = response.model_version_status.add()
        entry.version = number
        entry.state = get_model_status_pb2.ModelVersionStatus.State.Value(state.state)
        entry.status.error_code = state.error_code.value[0]
        entry.status.error_message = state.error_message
    return response
