"""TF Serving's gRPC API on the ``tensorflow-serving-api`` stubs: the servicers and the server.

``PredictionService`` (Predict, GetModelMetadata) and ``ModelService``
(GetModelStatus) turn a :class:`~dolg_tf.server.status.RequestError` from the
protocol-neutral handlers in :mod:`dolg_tf.server.handlers` into the call's
status code; :func:`start_grpc_server` binds and starts them.
"""

from __future__ import annotations

import logging
from concurrent import futures

import grpc
from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

from dolg_tf.server.handlers import model_metadata, model_status, predict
from dolg_tf.server.models import ModelManager
from dolg_tf.server.preflight import port_in_use_error
from dolg_tf.server.status import RequestError

logger = logging.getLogger(__name__)


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

    def Predict(self, request, context):
        return _call(predict, self.manager, request, context)

    def GetModelMetadata(self, request, context):
        return _call(model_metadata, self.manager, request, context)


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
    """``tensorflow.serving.ModelService``; HandleReloadConfigRequest stays UNIMPLEMENTED."""

    def __init__(self, manager: ModelManager):
        self.manager = manager

    def GetModelStatus(self, request, context):
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
