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
import errno
import json
import logging
import re
import selectors
import socket
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import json_format
from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2

from dolg_tf.errors import ServingError
from dolg_tf.server.handlers import SIGNATURE_DEF_FIELD, model_metadata, model_status
from dolg_tf.server.models import ModelManager
from dolg_tf.server.preflight import port_in_use_error
from dolg_tf.server.status import RequestError, invalid_argument, not_found

logger = logging.getLogger(__name__)

_PREDICT_PATH = re.compile(
    r"/v1/models/([^/:]+)(?:/versions/(\d+)|/labels/([^/:]+))?:(classify|regress|predict)", re.IGNORECASE
)
_STATUS_PATH = re.compile(
    r"/v1/models(?:/([^/:]+))?(?:/versions/(\d+)|/labels/([^/:]+))?(?:/(metadata))?", re.IGNORECASE
)
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
    raise invalid_argument(f'{where}: expected a string or a {{"b64": ...}} object, got {json.dumps(value)[:80]}')


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


def parse_predict_body(
    body: dict, input_dtypes: dict[str, tf.DType], check_batch: Callable[[str, int], None] | None = None
) -> tuple[dict[str, np.ndarray], str]:
    """TF Serving's request JSON -> ``({alias: array}, "row" | "columnar")``.

    ``check_batch(alias, n)`` is called with each input's batch size before
    any array is built, so an oversized request is refused before it costs memory.
    """
    check_batch = check_batch or (lambda alias, n: None)
    if "instances" in body and "inputs" in body:
        raise invalid_argument("Not formatted correctly expecting only one of 'inputs' or 'instances' keys to exist")
    names = sorted(input_dtypes)
    if "instances" in body:
        instances = body["instances"]
        if not isinstance(instances, list):
            raise invalid_argument("Expecting 'instances' to be an list/array")
        if not instances:
            raise invalid_argument("No values in 'instances' array")
        for name in names:
            check_batch(name, len(instances))
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
                raise invalid_argument(
                    f"Unknown named input: {extra[0]} in 'inputs' object (inputs: {', '.join(names)})"
                )
            for n in names:
                if isinstance(value[n], list):
                    check_batch(n, len(value[n]))
            arrays = {n: json_to_array(value[n], input_dtypes[n], f"input '{n}'") for n in names}
        else:
            if len(names) > 1:
                raise invalid_argument(
                    "inputs is a plain value/list, but expecting an object as multiple input tensors required"
                )
            if isinstance(value, list):
                check_batch(names[0], len(value))
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
                raise RequestError(
                    grpc.StatusCode.UNIMPLEMENTED, f"{verb} is not supported: DOLG exports predict signatures only"
                )
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
                request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=[SIGNATURE_DEF_FIELD])
                _fill_spec(request.model_spec, unquote(name), version, label)
                return _metadata_json(model_metadata(self.manager, request))
            request = get_model_status_pb2.GetModelStatusRequest()
            _fill_spec(request.model_spec, unquote(name), version, label)
            response = model_status(self.manager, request)
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
        batched = {alias for alias, info in signature_def.inputs.items() if _has_batch_dim(info)}
        try:
            inputs, layout = parse_predict_body(
                request, dtypes, lambda alias, n: servable.check_batch(alias, n) if alias in batched else None
            )
        except RecursionError:
            raise invalid_argument("JSON Value: the input lists are nested too deeply") from None
        try:
            _, outputs = servable.run(signature_name, inputs)
        except RequestError as err:
            strings = [alias for alias, dtype in dtypes.items() if dtype == tf.string]
            if err.code == grpc.StatusCode.INVALID_ARGUMENT and strings and _plain_strings(request):
                raise invalid_argument(
                    f"{err.message} -- input '{strings[0]}' was sent as plain JSON text; binary data such as an "
                    'encoded image must be base64-encoded and wrapped as {"b64": "<base64>"}'
                ) from None
            raise
        return format_predict_response(outputs, layout)


def _has_batch_dim(info) -> bool:
    dims = info.tensor_shape.dim
    return not info.tensor_shape.unknown_rank and len(dims) > 0 and dims[0].size == -1


def _plain_strings(request: dict) -> bool:
    """Whether the request's inputs hold a JSON string that is not inside a ``{"b64": ...}`` object."""
    stack = [request.get("instances"), request.get("inputs")]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            return True
        if isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, dict) and not _is_b64(value):
            stack.extend(value.values())
    return False


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
    response.metadata[SIGNATURE_DEF_FIELD].Unpack(signature_map)
    options = dict(preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    return {
        "model_spec": json_format.MessageToDict(response.model_spec, **options),
        "metadata": {SIGNATURE_DEF_FIELD: json_format.MessageToDict(signature_map, **options)},
    }


class _BodyError(Exception):
    """A request body that cannot be read: HTTP status and message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


# After SIGTERM, the REST server stops only once no request has come for this long (or the grace ends).
DRAIN_QUIET_S = 0.3
_SHUTTING_DOWN = "dolg serve is shutting down; send the request again (to another server)"
_DIGITS = re.compile(r"[0-9]{1,20}")
_HEX = re.compile(rb"[0-9a-fA-F]{1,16}")
# Chunk-size lines and trailers longer than this are refused (they carry no data).
_MAX_CHUNK_LINE = 4096
_MAX_TRAILERS = 100


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

    def do_GET(self):
        self._serve("GET")

    def do_POST(self):
        self._serve("POST")

    # Other verbs get TF Serving's "Malformed request" (400) as JSON, not http.server's HTML 501.
    def do_PUT(self):
        self._serve("PUT")

    def do_DELETE(self):
        self._serve("DELETE")

    def do_PATCH(self):
        self._serve("PATCH")

    def do_HEAD(self):
        self._serve("HEAD")

    def do_OPTIONS(self):
        self._serve("OPTIONS")

    def send_error(self, code, message=None, explain=None):
        """http.server's own refusals (bad request line, 414, 431, ...) as TF Serving's JSON, not an HTML page."""
        short, long = self.responses.get(code, ("Error", ""))
        text = message or short
        if explain and explain != long:
            text = f"{text}: {explain}"
        if self.request_version == "HTTP/0.9":  # an unparsable request line: answer with a status line anyway
            self.request_version = "HTTP/1.0"
        self._reply(code, {"error": text}, close=True)

    def handle_one_request(self):
        self._counted = False
        try:
            super().handle_one_request()
        finally:
            if self._counted:
                self.server.leave()

    def parse_request(self):
        # The request line has arrived: from here until its answer is written the
        # connection is busy, so a drain waits for it (and never cuts it mid-request).
        self._accepted = self.server.enter()
        self._counted = True
        return super().parse_request()

    def _serve(self, method: str) -> None:
        if not self._accepted:  # the request came after SIGTERM
            self._discard_quietly()
            self._reply(503, {"error": _SHUTTING_DOWN}, close=True)
            return
        self._serve_request(method)

    def _serve_request(self, method: str) -> None:
        path = self.path.split("?", 1)[0]
        try:
            body = self._read_body()
        except _BodyError as err:
            self._reply(err.status, {"error": err.message}, close=True)
            return
        if not _API_PATH.fullmatch(path):
            self._reply(404, {"error": f"Not found: {path}"})
            return
        status, payload = self.api.handle(method, path, body)
        self._reply(status, payload)

    def _content_length(self) -> int:
        raw = self.headers.get("Content-Length")
        if raw is None:
            return 0
        if not _DIGITS.fullmatch(raw.strip()):
            raise _BodyError(
                400,
                f"invalid Content-Length header {raw[:40]!r}: expected a number of bytes (0..{self.max_body_bytes})",
            )
        return int(raw.strip())

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        length = self._content_length()
        if length > self.max_body_bytes:
            if length <= 4 * self.max_body_bytes:
                self._discard(length)  # so the client reads our answer instead of a reset connection
            raise _BodyError(
                413, f"request body of {length} bytes is larger than {self.max_body_bytes} bytes (--max-message-bytes)"
            )
        return self.rfile.read(length) if length else b""

    def _read_chunked(self) -> bytes:
        """Reads a ``Transfer-Encoding: chunked`` body, bounded by the body limit."""
        parts, total = [], 0
        while True:
            line = self.rfile.readline(_MAX_CHUNK_LINE)
            if not line:
                raise _BodyError(400, "bad chunk: the chunked request body ended before its last (zero-size) chunk")
            size_text = line.split(b";", 1)[0].strip()
            if not _HEX.fullmatch(size_text):
                raise _BodyError(400, f"bad chunk: size line {line[:40]!r} is not a hexadecimal number of bytes")
            size = int(size_text, 16)
            if total + size > self.max_body_bytes:
                raise _BodyError(413, f"request body is larger than {self.max_body_bytes} bytes (--max-message-bytes)")
            if size == 0:
                for _ in range(_MAX_TRAILERS):
                    if self.rfile.readline(_MAX_CHUNK_LINE) in (b"\r\n", b"\n", b""):
                        return b"".join(parts)
                raise _BodyError(400, f"bad chunk: more than {_MAX_TRAILERS} trailer lines")
            data = self.rfile.read(size)
            if len(data) < size:
                raise _BodyError(400, f"bad chunk: the body ended inside a chunk of {size} bytes")
            if self.rfile.readline(_MAX_CHUNK_LINE) not in (b"\r\n", b"\n"):
                raise _BodyError(400, f"bad chunk: the chunk of {size} bytes is not followed by CRLF")
            parts.append(data)
            total += size

    def _discard(self, length: int) -> None:
        while length > 0:
            chunk = self.rfile.read(min(length, 1 << 20))
            if not chunk:
                return
            length -= len(chunk)

    def _discard_quietly(self) -> None:
        """Reads a refused request's body (briefly), so closing does not reset the connection under the answer."""
        try:
            length = self._content_length()
            if 0 < length <= self.max_body_bytes:
                self.connection.settimeout(2.0)
                self._discard(length)
        except (_BodyError, OSError):
            pass

    def finish(self):
        super().finish()
        if getattr(self, "_linger", False):
            _lingering_close(self.connection)

    def _reply(self, status: int, payload: dict, close: bool = False) -> None:
        # A refused request may still be arriving (a 100 KB URL is refused after 64 KB):
        # read it briefly before closing, or the reset would destroy the answer.
        self._linger = close and status >= 400
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if close or self.close_connection or self.server.draining:
            self.send_header("Connection", "close")  # also sets close_connection
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def log_message(self, format, *args):
        logger.debug("%s " + format, self.address_string(), *args)


def _lingering_close(sock: socket.socket, seconds: float = 2.0, limit: int = 1 << 20) -> None:
    """Half-closes ``sock`` and reads what the client still sends (bounded), so closing does not reset it."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(min(seconds, 0.5))
        deadline = time.monotonic() + seconds
        while limit > 0 and time.monotonic() < deadline:
            data = sock.recv(min(limit, 1 << 16))
            if not data:
                break
            limit -= len(data)


def _refusal(message: str) -> bytes:
    body = json.dumps({"error": message}).encode("utf-8")
    head = (
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode("ascii")
    return head + body


class _Reaper:
    """Closes refused connections gracefully, all in one thread.

    A refused connection is answered at once, half-closed, then handed here:
    what the client still sends is read and dropped (closing a socket with
    unread data would reset it and destroy the answer) until it closes or
    ``linger_s`` passes. Past ``limit`` sockets, new ones are closed at once.
    """

    def __init__(self, linger_s: float = 2.0, limit: int = 1024):
        self.linger_s, self.limit = linger_s, limit
        self._selector = selectors.DefaultSelector()
        self._deadlines: dict[socket.socket, float] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, sock: socket.socket) -> None:
        with self._lock:
            if len(self._deadlines) >= self.limit:
                sock.close()
                return
            sock.setblocking(False)
            self._selector.register(sock, selectors.EVENT_READ)
            self._deadlines[sock] = time.monotonic() + self.linger_s
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="dolg-rest-reaper", daemon=True)
                self._thread.start()

    def _close(self, sock: socket.socket) -> None:
        self._selector.unregister(sock)
        del self._deadlines[sock]
        sock.close()

    def _run(self) -> None:
        while True:
            events = self._selector.select(0.1)
            with self._lock:
                for key, _ in events:
                    sock = key.fileobj
                    if sock not in self._deadlines:
                        continue
                    try:
                        data = sock.recv(1 << 16)
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    if not data:
                        self._close(sock)
                now = time.monotonic()
                for sock in [s for s, deadline in self._deadlines.items() if now > deadline]:
                    self._close(sock)
                if not self._deadlines:
                    self._thread = None
                    return


class _Server(ThreadingHTTPServer):
    """One thread per connection, at most ``max_connections`` of them; drains on :meth:`begin_drain`."""

    # Connection threads are joined by ``join_connections`` when the server stops.
    daemon_threads = True
    allow_reuse_port = False  # exclusive port: a second server must fail to bind, not share it
    request_queue_size = 128
    max_connections = 256

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._busy = 0
        self._last_request = 0.0
        self._draining = False
        self._idle = threading.Condition()
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._reaper = _Reaper()

    def process_request(self, request, client_address):
        with self._idle:
            if len(self._connections) >= self.max_connections:
                refusal = (
                    f"too many connections: this server accepts {self.max_connections} at a time "
                    "(--rest_api_max_connections); retry later"
                )
            else:
                refusal = None
                thread = threading.Thread(
                    target=self.process_request_thread,
                    args=(request, client_address),
                    name="dolg-rest-conn",
                    daemon=True,
                )
                self._connections[request] = thread
        if refusal is None:
            thread.start()
            return
        logger.debug("refusing a connection from %s: %s", client_address, refusal)
        try:  # answered before the request is read: no thread is spent on it
            request.settimeout(0.5)
            request.sendall(_refusal(refusal))
            request.shutdown(socket.SHUT_WR)
        except OSError:
            request.close()
            return
        self._reaper.add(request)

    def shutdown_request(self, request):
        with self._idle:
            self._connections.pop(request, None)
        super().shutdown_request(request)

    # --- requests in progress --------------------------------------------------------------
    def enter(self) -> bool:
        """Counts a request in; returns False once draining (the request is then answered 503)."""
        with self._idle:
            self._busy += 1
            self._last_request = time.monotonic()
            return not self._draining

    def leave(self) -> None:
        with self._idle:
            self._busy -= 1
            self._idle.notify_all()

    @property
    def draining(self) -> bool:
        return self._draining

    def begin_drain(self) -> None:
        """From now on new requests, kept-alive connections included, get 503 + ``Connection: close``."""
        with self._idle:
            self._draining = True

    def drain(self, timeout: float, quiet: float = DRAIN_QUIET_S) -> int:
        """Waits up to ``timeout`` s until no request is in progress and none came for ``quiet`` s.

        The quiet period lets clients that were just told ``Connection: close``
        reconnect and hear 503, instead of finding their new connection cut.
        Returns how many requests are still in progress.
        """
        deadline = time.monotonic() + timeout
        with self._idle:
            while time.monotonic() < deadline:
                if self._busy == 0 and time.monotonic() - self._last_request >= quiet:
                    break
                self._idle.wait(min(0.05, max(0.0, deadline - time.monotonic())))
            return self._busy

    def close_connections(self) -> None:
        """Shuts every connection's socket, which ends idle keep-alive reads at once."""
        with self._idle:
            sockets = list(self._connections)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def join_connections(self, timeout: float) -> int:
        """Joins the connection threads (up to ``timeout`` s in all); returns how many are still running."""
        deadline = time.monotonic() + timeout
        with self._idle:
            threads = list(self._connections.values())
        for thread in threads:
            if thread.ident is not None:
                thread.join(max(0.0, deadline - time.monotonic()))
        return sum(t.is_alive() for t in threads)

    def handle_error(self, request, client_address):
        # A client that hangs up or times out is routine, not a traceback on stderr.
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            logger.debug("connection from %s ended: %s", client_address, sys.exc_info()[1])
            return
        super().handle_error(request, client_address)


def start_rest_server(
    manager: ModelManager, host: str, port: int, max_body_bytes: int, max_connections: int = 256
) -> tuple[_Server, threading.Thread, int]:
    """Starts the REST server in a thread; returns it, the thread and the bound port.

    Raises:
        ServingError: the port is in use or cannot be bound.
    """
    handler = type("DolgRestHandler", (_Handler,), {"api": RestApi(manager), "max_body_bytes": max_body_bytes})
    attributes = {"max_connections": max_connections}
    if ":" in host:
        attributes["address_family"] = socket.AF_INET6
    server_class = type("DolgRestServer", (_Server,), attributes)
    try:
        server = server_class((host, port), handler)
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise port_in_use_error("REST", host, port, "--rest-api-port") from None
        raise ServingError(f"cannot bind REST to {host}:{port}: {err.strerror or err}") from None
    thread = threading.Thread(target=server.serve_forever, name="dolg-rest", daemon=True)
    thread.start()
    return server, thread, server.server_address[1]
