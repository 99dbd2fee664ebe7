"""TF Serving's gRPC API on the ``tensorflow-serving-api`` stubs: Predict, GetModelMetadata, GetModelStatus.

The request handling is written once against the protobuf messages
(:func:`predict`, :func:`model_metadata`, :func:`model_status`); the gRPC
servicers and the REST front end both call it.
"""

from __future__ import annotations

import logging
from concurrent import futures

import grpc
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from dolg_tf.server.models import ModelManager
from dolg_tf.server.preflight import port_in_use_error
from dolg_tf.server.status import RequestError, invalid_argument

logger = logging.getLogger(__name__)

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


def _call(handler, manager, request, context):
    try:
        return handler(manager, request)
    except RequestError as err:
        context.abort(err.code, err.message)
    except Exception as err:  # never let one request take the server down
        logger.exception("internal error")
        context.abort(grpc.StatusCode.INTERNAL, f"internal error: {err}")


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    """``tensorflow.serving.PredictionService``; Classify, Regress and MultiInference stay UNIMPLEMENTED."""

    def __init__(self, manager: ModelManager):
        self.manager = manager

    def Predict(self, request, context):  # noqa: N802  (gRPC method name)
        return _call(predict, self.manager, request, context)

    def GetModelMetadata(self, request, context):  # noqa: N802
        return _call(model_metadata, self.manager, request, context)


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
    """``tensorflow.serving.ModelService``; HandleReloadConfigRequest stays UNIMPLEMENTED."""

    def __init__(self, manager: ModelManager):
        self.manager = manager

    def GetModelStatus(self, request, context):  # noqa: N802
        return _call(model_status, self.manager, request, context)


def start_grpc_server(
    manager: ModelManager, host: str, port: int, max_message_bytes: int, workers: int
) -> tuple[grpc.Server, int, futures.ThreadPoolExecutor]:
    """Starts the gRPC server; returns it, the bound port (``port=0`` picks a free one) and its worker pool.

    The port is bound exclusively (``grpc.so_reuseport`` 0): with gRPC's default,
    a second server on the same port starts silently and new channels are split
    between the two.

    Raises:
        ServingError: the port is in use or cannot be bound.
    """
    executor = futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dolg-grpc")
    server = grpc.server(
        executor,
        options=[
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ],
    )
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(PredictionService(manager), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelService(manager), server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as err:  # grpc >= 1.60 raises instead of returning 0
        bound, reason = 0, str(err)
    else:
        reason = ""
    if bound == 0:
        executor.shutdown(wait=False)
        raise port_in_use_error("gRPC", host, port, "--port", reason or "bind failed")
    server.start()
    return server, bound, executor
