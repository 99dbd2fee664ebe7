"""Request errors carrying a canonical status code, shared by the gRPC and REST front ends.

TF Serving answers every failed request with a canonical code (the same numbers
in gRPC and in TensorFlow's ``error_codes.proto``); its REST server maps that
code to an HTTP status with a fixed table, reproduced here.
"""

from __future__ import annotations

import grpc

from dolg_tf.errors import ServingError

# Canonical code -> HTTP status, as TF Serving's http_server.cc maps them.
_HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}
_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


class RequestError(ServingError):
    """One request failed; ``code`` is the canonical status the client receives.

    Args:
        code: a ``grpc.StatusCode``.
        message: what was wrong, naming the bad value.
    """

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def http_status(self) -> int:
        return _HTTP_STATUS.get(self.code, 500)

    @classmethod
    def from_canonical(cls, number: int, message: str) -> RequestError:
        """Builds the error from a numeric canonical code (e.g. ``tf.errors.OpError.error_code``)."""
        return cls(_BY_NUMBER.get(int(number), grpc.StatusCode.UNKNOWN), message)


def invalid_argument(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.NOT_FOUND, message)
