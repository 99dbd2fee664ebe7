"""TF Serving's REST API on the standard library's ``ThreadingHTTPServer``.

Routes (paths case-insensitive, as in TF Serving):

- ``POST /v1/models/{name}[/versions/{v}|/labels/{l}]:predict`` — row format
  ``{"instances": [...]}`` -> ``{"predictions": [...]}`` or columnar
  ``{"inputs": ...}`` -> ``{"outputs": ...}``; optional ``"signature_name"``.
  Binary strings travel as ``{"b64": "<base64>"}``.
- ``GET /v1/models/{name}[/versions/{v}|/labels/{l}]`` — ``GetModelStatusResponse`` as JSON.
- ``GET /v1/models/{name}[/versions/{v}|/labels/{l}]/metadata`` — ``{"model_spec": ..., "metadata":
  {"signature_def": <SignatureDefMap as JSON>}}``.

Errors are ``{"error": "<message>"}`` with TF Serving's HTTP status for the
canonical code (400 INVALID_ARGUMENT, 404 NOT_FOUND, ...).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import re
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import json_format
from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2

from dolg_tf.server import grpc_service
from dolg_tf.server.models import ModelManager
from dolg_tf.server.status import RequestError, invalid_argument, not_found

logger = logging.getLogger(__name__)

_PREDICT_PATH = re.compile(
    r"/v1/models/([^/:]+)(?:/versions/(\d+)|/labels/([^/:]+))?:(classify|regress|predict)", re.IGNORECASE
)
_STATUS_PATH = re.compile(r"/v1/models(?:/([^/:]+))?(?:/versions/(\d+)|/labels/([^/:]+))?(?:/(metadata))?", re.IGNORECASE)
_API_PATH = re.compile(r"/v1/.*", re.IGNORECASE)


# --- JSON <-> numpy ---------------------------------------------------------------------
def _is_b64(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and "b64" in value


def _string_leaves(value: Any, where: str) -> Any:
    """Nested JSON of strings / ``{"b64": ...}`` objects -> nested lists of bytes."""
    if isinstance(value, list):
        return [_string_leaves(v, where) for v in value]
    if isinstance(value, str):
        return value.encode("utf-8")
    if _is_b64(value):
        if not isinstance(value["b64"], str):
            raise invalid_argument(f"{where}: the value of 'b64' must be a string")
        try:
            return base64.b64decode(value["b64"], validate=True)
        except (binascii.Error, ValueError) as err:
            raise invalid_argument(f"{where}: unable to base64 decode: {err}") from None
    raise invalid_argument(f"{where}: expected a string or a {{\"b64\": ...}} object, got {json.dumps(value)[:80]}")


def _dense_shape(value: Any, where: str) -> list[int]:
    """The shape of a nested list, which must be rectangular."""
    if not isinstance(value, list):
        return []
    if not value:
        return [0]
    shapes = [_dense_shape(v, where) for v in value]
    if any(s != shapes[0] for s in shapes):
        raise invalid_argument(f"{where}: the nested lists are ragged (inner shapes {shapes[0]} and others differ)")
    return [len(value)] + shapes[0]


def json_to_array(value: Any, dtype: tf.DType, where: str) -> np.ndarray:
    """Converts one JSON value to an array of ``dtype``, refusing lossy or mistyped values.

    Raises:
        RequestError: INVALID_ARGUMENT naming the input and the problem.
    """
    if dtype == tf.string:
        shape = _dense_shape(value, where)
        leaves = _string_leaves(value, where)
        array = np.empty(shape, dtype=object)
        if shape:
            flat = np.array(leaves, dtype=object).reshape(-1) if shape[-1] else []
            array.reshape(-1)[:] = flat
        else:
            array[()] = leaves
        return array
    try:
        array = np.array(value)
    except ValueError as err:  # ragged nesting
        raise invalid_argument(f"{where}: the nested lists are ragged: {err}") from None
    kind = array.dtype.kind
    np_dtype = dtype.as_numpy_dtype
    if array.size == 0:
        return array.astype(np_dtype)
    if dtype == tf.bool:
        if kind != "b":
            raise invalid_argument(f"{where}: expects bool values, got {array.dtype.name}")
    elif dtype.is_integer:
        if kind not in "iu":
            raise invalid_argument(f"{where}: expects {dtype.name} values, got {_kind_name(array)}")
        if array.min() < dtype.min or array.max() > dtype.max:
            raise invalid_argument(
                f"{where}: values must lie in [{dtype.min}, {dtype.max}] for {dtype.name}, "
                f"got [{array.min()}, {array.max()}]"
            )
    elif dtype.is_floating:
        if kind not in "iuf":
            raise invalid_argument(f"{where}: expects {dtype.name} values, got {_kind_name(array)}")
    else:
        raise invalid_argument(f"{where}: inputs of dtype {dtype.name} are not supported over REST")
    return array.astype(np_dtype)


def _kind_name(array: np.ndarray) -> str:
    return {"f": "floating-point numbers", "b": "booleans", "U": "strings", "O": "objects"}.get(
        array.dtype.kind, array.dtype.name
    )


def array_to_json(alias: str, array: np.ndarray) -> Any:
    """An output array as JSON; strings are UTF-8 text, or ``{"b64": ...}`` when the alias ends in ``_bytes``."""
    if array.dtype == object or array.dtype.kind == "S":
        encode = (
            (lambda b: {"b64": base64.b64encode(b).decode("ascii")})
            if alias.endswith("_bytes")
            else (lambda b: b.decode("utf-8", errors="replace"))
        )
        return np.vectorize(encode, otypes=[object])(array).tolist() if array.size else array.tolist()
    return array.tolist()


def parse_predict_body(body: dict, input_dtypes: dict[str, tf.DType]) -> tuple[dict[str, np.ndarray], str]:
    """TF Serving's request JSON -> ``({alias: array}, "row" | "columnar")``."""
    if "instances" in body and "inputs" in body:
        raise invalid_argument("Not formatted correctly expecting only one of 'inputs' or 'instances' keys to exist")
    names = sorted(input_dtypes)
    if "instances" in body:
        instances = body["instances"]
        if not isinstance(instances, list):
            raise invalid_argument("Expecting 'instances' to be an list/array")
        if not instances:
            raise invalid_argument("No values in 'instances' array")
        named = isinstance(instances[0], dict) and not _is_b64(instances[0])
        if not named and len(names) > 1:
            raise invalid_argument(
                "instances is a plain list, but expecting list of objects as multiple input tensors required"
            )
        per_input: dict[str, list[np.ndarray]] = {name: [] for name in names}
        for i, item in enumerate(instances):
            is_object = isinstance(item, dict) and not _is_b64(item)
            if named != is_object:
                raise invalid_argument(
                    f"Expecting {'object' if named else 'value/list'} but got "
                    f"{'object' if is_object else 'value/list'} at item {i} of input list"
                )
            values = item if named else {names[0]: item}
            if set(values) != set(names):
                raise invalid_argument(
                    f"Failed to process element: {i} of 'instances' list. JSON object keys "
                    f"{sorted(values)} must be equal to: {','.join(names)}"
                )
            for name in names:
                array = json_to_array(values[name], input_dtypes[name], f"element {i} of 'instances', input '{name}'")
                if per_input[name] and per_input[name][0].shape != array.shape:
                    raise invalid_argument(
                        f"Failed to process element: {i} of 'instances' list. Expecting shape "
                        f"{list(per_input[name][0].shape)} but got: {list(array.shape)}"
                    )
                per_input[name].append(array)
        return {name: np.stack(arrays) for name, arrays in per_input.items()}, "row"
    if "inputs" in body:
        value = body["inputs"]
        if isinstance(value, dict) and not _is_b64(value):
            missing = [n for n in names if n not in value]
            if missing:
                raise invalid_argument(f"Missing named input: {missing[0]} in 'inputs' object.")
            extra = sorted(set(value) - set(names))
            if extra:
                raise invalid_argument(f"Unknown named input: {extra[0]} in 'inputs' object (inputs: {', '.join(names)})")
            arrays = {n: json_to_array(value[n], input_dtypes[n], f"input '{n}'") for n in names}
        else:
            if len(names) > 1:
                raise invalid_argument(
                    "inputs is a plain value/list, but expecting an object as multiple input tensors required"
                )
            arrays = {names[0]: json_to_array(value, input_dtypes[names[0]], f"input '{names[0]}'")}
        return arrays, "columnar"
    raise invalid_argument("Missing 'inputs' or 'instances' key")


def format_predict_response(outputs: dict[str, np.ndarray], layout: str) -> dict:
    if layout == "columnar":
        if len(outputs) == 1:
            ((alias, value),) = outputs.items()
            return {"outputs": array_to_json(alias, value)}
        return {"outputs": {alias: array_to_json(alias, value) for alias, value in outputs.items()}}
    sizes = {alias: (value.shape[0] if value.ndim else None) for alias, value in outputs.items()}
    if None in sizes.values() or len(set(sizes.values())) > 1:
        raise invalid_argument(f"Tensors in the row format must share their first dimension, got {sizes}")
    if len(outputs) == 1:
        ((alias, value),) = outputs.items()
        return {"predictions": array_to_json(alias, value)}
    columns = {alias: array_to_json(alias, value) for alias, value in outputs.items()}
    rows = next(iter(sizes.values()))
    return {"predictions": [{alias: column[i] for alias, column in columns.items()} for i in range(rows)]}


# --- the HTTP server ----------------------------------------------------------------------
class RestApi:
    """Maps HTTP requests to model calls; independent of the socket layer, so it is easy to reason about."""

    def __init__(self, manager: ModelManager):
        self.manager = manager

    def handle(self, method: str, path: str, body: bytes) -> tuple[int, dict]:
        try:
            return 200, self._dispatch(method, path, body)
        except RequestError as err:
            return err.http_status, {"error": err.message}
        except Exception as err:  # one bad request never stops the server
            logger.exception("internal error on %s %s", method, path)
            return 500, {"error": f"internal error: {err}"}

    def _dispatch(self, method: str, path: str, body: bytes) -> dict:
        if method == "POST" and (match := _PREDICT_PATH.fullmatch(path)):
            name, version, label, verb = match.groups()
            if verb.lower() != "predict":
                raise RequestError(grpc.StatusCode.UNIMPLEMENTED, f"{verb} is not supported: DOLG exports predict signatures only")
            return self._predict(unquote(name), _version(version), unquote(label) if label else None, body)
        if method == "GET" and (match := _STATUS_PATH.fullmatch(path)):
            name, version, label, sub = match.groups()
            if not name:
                raise invalid_argument("Missing model name in request.")
            if version is not None and label:
                raise invalid_argument(
                    f"Both model version ({version}) and model version label ({label}) cannot be supplied."
                )
            if sub:
                request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
                _fill_spec(request.model_spec, unquote(name), version, label)
                return _metadata_json(grpc_service.model_metadata(self.manager, request))
            request = get_model_status_pb2.GetModelStatusRequest()
            _fill_spec(request.model_spec, unquote(name), version, label)
            response = grpc_service.model_status(self.manager, request)
            return json_format.MessageToDict(response, always_print_fields_with_no_presence=True)
        raise invalid_argument(f"Malformed request: {method} {path}")

    def _predict(self, name: str, version: int | None, label: str | None, body: bytes) -> dict:
        try:
            request = json.loads(body) if body else None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise invalid_argument(f"JSON Parse error: {err}") from None
        except RecursionError:
            raise invalid_argument("JSON Parse error: the document is nested too deeply") from None
        if request is None:
            raise invalid_argument("JSON Parse error: The document is empty")
        if not isinstance(request, dict):
            raise invalid_argument("JSON Value: the request body is not an object")
        signature_name = request.get("signature_name", "")
        if not isinstance(signature_name, str):
            raise invalid_argument("'signature_name' key must be a string value.")
        servable = self.manager.resolve(name, version, label)
        _, signature_def = servable.signature(signature_name)
        dtypes = {alias: tf.dtypes.as_dtype(info.dtype) for alias, info in signature_def.inputs.items()}
        try:
            inputs, layout = parse_predict_body(request, dtypes)
        except RecursionError:
            raise invalid_argument("JSON Value: the input lists are nested too deeply") from None
        _, outputs = servable.run(signature_name, inputs)
        return format_predict_response(outputs, layout)


_MAX_VERSION = 2**63 - 1  # ModelSpec.version is an int64


def _version(text: str | None) -> int | None:
    return None if text is None else int(text)


def _fill_spec(spec, name: str, version: str | None, label: str | None) -> None:
    spec.name = name
    if version is not None:
        if int(version) > _MAX_VERSION:  # no such version can exist (and int64 cannot hold it)
            raise not_found(f"Servable not found for request: Specific({name}, {version})")
        spec.version.value = int(version)
    if label:
        spec.version_label = unquote(label)


def _metadata_json(response: get_model_metadata_pb2.GetModelMetadataResponse) -> dict:
    """TF Serving's metadata JSON: model_spec and the unpacked SignatureDefMap, proto field names kept."""
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signature_map)
    options = dict(preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    return {
        "model_spec": json_format.MessageToDict(response.model_spec, **options),
        "metadata": {"signature_def": json_format.MessageToDict(signature_map, **options)},
    }


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as TF Serving's server offers
    server_version = "dolg-serve"
    # Seconds a connection may sit idle (or stall mid-body) before it is closed, so
    # stalled or abandoned connections cannot hold handler threads forever.
    timeout = 60
    api: RestApi
    max_body_bytes: int

    def setup(self):
        super().setup()
        # Headers and body go out in separate writes; with Nagle on, the body
        # waits for the client's delayed ACK (~40 ms per request on Linux).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_GET(self):  # noqa: N802  (http.server naming)
        self._serve("GET")

    def do_POST(self):  # noqa: N802
        self._serve("POST")

    # Other verbs get TF Serving's "Malformed request" (400) as JSON, not http.server's HTML 501.
    def do_PUT(self):  # noqa: N802
        self._serve("PUT")

    def do_DELETE(self):  # noqa: N802
        self._serve("DELETE")

    def do_PATCH(self):  # noqa: N802
        self._serve("PATCH")

    def do_HEAD(self):  # noqa: N802
        self._serve("HEAD")

    def do_OPTIONS(self):  # noqa: N802
        self._serve("OPTIONS")

    def _serve(self, method: str) -> None:
        with self.server.in_flight():
            self._serve_request(method)

    def _serve_request(self, method: str) -> None:
        path = self.path.split("?", 1)[0]
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            body = self._read_chunked()
            if body is None:
                self._reply(413, {"error": f"request body is larger than {self.max_body_bytes} bytes (--max-message-bytes)"})
                self.close_connection = True
                return
            self._answer(method, path, body)
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0 or length > self.max_body_bytes:
            if 0 < length <= 4 * self.max_body_bytes:
                self._discard(length)  # so the client reads our answer instead of a reset connection
            self._reply(
                413 if length > 0 else 400,
                {"error": f"request body of {length} bytes is outside 0..{self.max_body_bytes} bytes (--max-message-bytes)"},
            )
            self.close_connection = True
            return
        self._answer(method, path, self.rfile.read(length) if length else b"")

    def _answer(self, method: str, path: str, body: bytes) -> None:
        if not _API_PATH.fullmatch(path):
            self._reply(404, {"error": f"Not found: {path}"})
            return
        status, payload = self.api.handle(method, path, body)
        self._reply(status, payload)

    def _read_chunked(self) -> bytes | None:
        """Reads a ``Transfer-Encoding: chunked`` body; None when it exceeds the limit."""
        parts, total = [], 0
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                size = -1
            if size < 0 or total + size > self.max_body_bytes:
                return None
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):  # trailers
                    pass
                return b"".join(parts)
            parts.append(self.rfile.read(size))
            self.rfile.readline(1024)  # the CRLF after each chunk
            total += size

    def _discard(self, length: int) -> None:
        while length > 0:
            chunk = self.rfile.read(min(length, 1 << 20))
            if not chunk:
                return
            length -= len(chunk)

    def _reply(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def log_message(self, format, *args):  # noqa: A002  (http.server's signature)
        logger.debug("%s " + format, self.address_string(), *args)


class _Server(ThreadingHTTPServer):
    # Idle keep-alive connections must not keep the process alive; requests in
    # progress are waited for by ``drain`` instead.
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._busy = 0
        self._idle = threading.Condition()

    @contextlib.contextmanager
    def in_flight(self):
        with self._idle:
            self._busy += 1
        try:
            yield
        finally:
            with self._idle:
                self._busy -= 1
                self._idle.notify_all()

    def drain(self, timeout: float) -> int:
        """Waits up to ``timeout`` s for requests in progress to finish; returns how many are left."""
        with self._idle:
            self._idle.wait_for(lambda: self._busy == 0, timeout)
            return self._busy

    def handle_error(self, request, client_address):
        # A client that hangs up or times out is routine, not a traceback on stderr.
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            logger.debug("connection from %s ended: %s", client_address, sys.exc_info()[1])
            return
        super().handle_error(request, client_address)


def start_rest_server(
    manager: ModelManager, host: str, port: int, max_body_bytes: int
) -> tuple[ThreadingHTTPServer, threading.Thread, int]:
    """Starts the REST server in a thread; returns it, the thread and the bound port."""
    handler = type("DolgRestHandler", (_Handler,), {"api": RestApi(manager), "max_body_bytes": max_body_bytes})
    server_class = type("DolgRestServer6", (_Server,), {"address_family": socket.AF_INET6}) if ":" in host else _Server
    server = server_class((host, port), handler)
    thread = threading.Thread(target=server.serve_forever, name="dolg-rest", daemon=True)
    thread.start()
    return server, thread, server.server_address[1]
