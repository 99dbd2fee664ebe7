"""The wire: TF Serving's gRPC ``PredictionService`` and its REST API.

A transport does three things: fetch the served model's ``SignatureDefMap``
(``GetModelMetadata`` / ``GET .../metadata``), send one ``Predict`` request of
encoded images and return the ``embedding`` rows, and estimate a request's size
so the client can keep requests under the message limit. Failures are sorted
into what the client does next: :class:`Transient` (retry with backoff),
:class:`Rejected` (``INVALID_ARGUMENT``: find the bad image), :class:`TooLarge`
(split the request), or a final :mod:`dolg_tf.errors` client error.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

import numpy as np

from dolg_tf.client import _protos as pb
from dolg_tf.errors import ClientError, ConfigError, ModelNotFoundError, WrongProtocolError
from dolg_tf.export.contract import DEFAULT_SIGNATURE, EMBEDDING_DTYPE, IMAGES_DTYPE
from dolg_tf.export.contract import EMBEDDING_KEY as OUTPUT_KEY
from dolg_tf.export.contract import IMAGES_KEY as INPUT_KEY

log = logging.getLogger(__name__)

# Responses are a few KB per image; this bound only stops a runaway server.
_MAX_RECEIVE_BYTES = 256 * 1024 * 1024


class Transient(Exception):
    """The server is unreachable, restarting, overloaded or too slow: worth retrying.

    ``unreachable`` is True when nothing answered at all (connection refused,
    unknown host): on the client's first contact that is a wiring mistake,
    reported at once rather than retried.
    """

    def __init__(self, message: str, unreachable: bool = False):
        super().__init__(message)
        self.unreachable = unreachable


# What gRPC and urllib3 say when no server listens at the address, or the host does not resolve.
_UNREACHABLE = re.compile(
    r"Connection refused|errors resolving|DNS resolution failed|Name or service not known|"
    r"nodename nor servname|Temporary failure in name resolution|No address associated with hostname",
    re.IGNORECASE,
)
GRPC_ON_REST_PORT = "that port speaks HTTP/1.1, not gRPC: is it the REST port? use --protocol rest (protocol='rest')"
REST_ON_GRPC_PORT = (
    "that port speaks HTTP/2 (gRPC), not HTTP/1.1: is it the gRPC port? use --protocol grpc (protocol='grpc')"
)


class Rejected(Exception):
    """The server refused the request's content (``INVALID_ARGUMENT`` / HTTP 400)."""


class TooLarge(Exception):
    """The request is over a message-size limit (client's or server's)."""


@dataclass(frozen=True)
class ModelInfo:
    """What the client learnt from the served model's metadata.

    Attributes:
        model_name: the served model's name.
        version: the version that answered (None when the server does not say).
        signature_name: the checked signature.
        embedding_dim: D of the ``embedding`` output (None when the signature leaves it open).
    """

    model_name: str
    version: int | None
    signature_name: str
    embedding_dim: int | None


@dataclass(frozen=True)
class VersionStatus:
    """One model version's state, as ``GetModelStatus`` reports it.

    Attributes:
        version: the version number.
        state: ``START``, ``LOADING``, ``AVAILABLE``, ``UNLOADING`` or ``END``.
        error: the version's error message ("" when fine).
    """

    version: int
    state: str
    error: str = ""


@dataclass(frozen=True)
class ModelSpec:
    """Which servable to ask for: TF Serving's ``ModelSpec`` fields."""

    name: str
    signature_name: str = DEFAULT_SIGNATURE
    version: int | None = None
    version_label: str | None = None

    def describe(self) -> str:
        where = f" version {self.version}" if self.version is not None else ""
        where += f" label {self.version_label!r}" if self.version_label else ""
        return f"model {self.name!r}{where}"

    def to_proto(self):
        spec = pb.model_pb2.ModelSpec(name=self.name, signature_name=self.signature_name)
        if self.version is not None:
            spec.version.value = self.version
        elif self.version_label:
            spec.version_label = self.version_label
        return spec


def _dims(shape) -> list[int] | None:
    return None if shape.unknown_rank else [d.size for d in shape.dim]


def check_signature(signature_map, spec: ModelSpec) -> int | None:
    """Checks that ``spec.signature_name`` is a DOLG embedding signature; returns D (or None).

    A DOLG embedding signature has exactly one input, ``images`` DT_STRING of
    rank 1, and an ``embedding`` DT_FLOAT output of rank 2.

    Raises:
        ModelNotFoundError: no such signature, or not a DOLG embedding signature.
    """
    signatures = signature_map.signature_def
    if spec.signature_name not in signatures:
        raise ModelNotFoundError(
            f"{spec.describe()} has no signature {spec.signature_name!r} "
            f"(it has {sorted(k for k in signatures if not k.startswith('__'))})"
        )
    sig = signatures[spec.signature_name]

    def show(tensors) -> str:
        return ", ".join(
            f"{k}: {pb.types_pb2.DataType.Name(v.dtype)} {_dims(v.tensor_shape)}" for k, v in sorted(tensors.items())
        )

    inp = sig.inputs.get(INPUT_KEY)
    out = sig.outputs.get(OUTPUT_KEY)
    in_dims = _dims(inp.tensor_shape) if inp is not None else None
    out_dims = _dims(out.tensor_shape) if out is not None else None
    ok = (
        set(sig.inputs) == {INPUT_KEY}
        and inp.dtype == pb.types_pb2.DataType.Value(IMAGES_DTYPE)
        and (in_dims is None or len(in_dims) == 1)
        and out is not None
        and out.dtype == pb.types_pb2.DataType.Value(EMBEDDING_DTYPE)
        and (out_dims is None or len(out_dims) == 2)
    )
    if not ok:
        raise ModelNotFoundError(
            f"{spec.describe()} signature {spec.signature_name!r} is not a DOLG embedding model: expected input "
            f"{INPUT_KEY!r} {IMAGES_DTYPE} [-1] and output {OUTPUT_KEY!r} {EMBEDDING_DTYPE} [-1, D], "
            f"got inputs ({show(sig.inputs)}) "
            f"and outputs ({show(sig.outputs)})"
        )
    return out_dims[1] if out_dims and out_dims[1] > 0 else None


def embedding_from_tensor(tensor, n: int) -> np.ndarray:
    """The ``(n, D)`` float32 array in a ``TensorProto``; raises ClientError on a malformed one."""
    if tensor.dtype != pb.types_pb2.DataType.Value(EMBEDDING_DTYPE):
        got = pb.types_pb2.DataType.Name(tensor.dtype)
        raise ClientError(f"the server returned {OUTPUT_KEY!r} as {got}, not {EMBEDDING_DTYPE}")
    dims = [d.size for d in tensor.tensor_shape.dim]
    if tensor.tensor_content:
        values = np.frombuffer(tensor.tensor_content, dtype="<f4")
    else:
        values = np.asarray(tensor.float_val, dtype=np.float32)
    if len(dims) != 2 or dims[0] != n or values.size != dims[0] * dims[1]:
        raise ClientError(f"the server returned 'embedding' of shape {dims} ({values.size} values) for {n} images")
    return values.astype(np.float32).reshape(dims)


def _pem(value: bytes | str | os.PathLike | None, what: str) -> bytes | None:
    """PEM bytes from bytes or a file path."""
    if value is None or isinstance(value, bytes):
        return value
    try:
        with open(os.fspath(value), "rb") as f:
            return f.read()
    except OSError as err:
        raise ConfigError(f"cannot read {what} {os.fspath(value)!r}: {err.strerror or err}") from err


@dataclass(frozen=True)
class TlsOptions:
    """TLS settings shared by both protocols.

    Attributes:
        enabled: use TLS (implied by any other field, or an ``https://`` REST target).
        root_certificates: CA bundle (PEM bytes or path); None: the system's.
        client_certificate: client certificate chain for mutual TLS (PEM bytes or path).
        client_key: the client certificate's private key (PEM bytes or path).
        server_name: override of the name checked in the server certificate (gRPC only).
    """

    enabled: bool = False
    root_certificates: bytes | str | os.PathLike | None = None
    client_certificate: bytes | str | os.PathLike | None = None
    client_key: bytes | str | os.PathLike | None = None
    server_name: str | None = None

    @property
    def active(self) -> bool:
        return bool(self.enabled or self.root_certificates or self.client_certificate or self.client_key)


# --------------------------------------------------------------------------- gRPC

_TRANSIENT_GRPC = ("UNAVAILABLE", "DEADLINE_EXCEEDED")


class GrpcTransport:
    """TF Serving's gRPC API through the ``tensorflow-serving-api`` stubs; one channel for the client's life."""

    protocol = "grpc"

    def __init__(
        self,
        target: str,
        spec: ModelSpec,
        *,
        max_message_bytes: int,
        tls: TlsOptions,
        credentials: Any = None,
        headers: Mapping[str, str] | None = None,
    ):
        import grpc

        self._grpc = grpc
        self.target = target
        self.spec = spec
        self.max_message_bytes = max_message_bytes
        # gRPC metadata keys must be lower-case.
        self._metadata = tuple((k.lower(), v) for k, v in (headers or {}).items()) or None
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max(max_message_bytes, _MAX_RECEIVE_BYTES)),
            # Reconnect on the client's own retry cadence rather than gRPC's default
            # (1 s growing to 120 s), so a restarted server is found promptly.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]
        if tls.server_name:
            options.append(("grpc.ssl_target_name_override", tls.server_name))
        if credentials is None and tls.active:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_pem(tls.root_certificates, "root certificates"),
                private_key=_pem(tls.client_key, "client key"),
                certificate_chain=_pem(tls.client_certificate, "client certificate"),
            )
        if credentials is not None:
            self._channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        prediction = pb.prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self._predict = prediction.Predict
        self._metadata_rpc = prediction.GetModelMetadata
        self._status_rpc = pb.model_service_pb2_grpc.ModelServiceStub(self._channel).GetModelStatus

    def _error(self, err, what: str) -> Exception:
        code = err.code() if hasattr(err, "code") else None
        name = code.name if code is not None else "UNKNOWN"
        details = (err.details() if hasattr(err, "details") else None) or str(err)
        message = f"{what} at {self.target} (gRPC): {name}: {details}"
        if "Failed parsing HTTP/2" in details or "http1.x server" in details:
            return WrongProtocolError(f"{what} at {self.target} (gRPC): {GRPC_ON_REST_PORT}")
        if name in _TRANSIENT_GRPC:
            return Transient(message, unreachable=name == "UNAVAILABLE" and bool(_UNREACHABLE.search(details)))
        if name == "RESOURCE_EXHAUSTED":
            # Over a message limit (gRPC's own wording) vs. a full batching queue.
            return TooLarge(message) if "larger than max" in details else Transient(message)
        if name == "INVALID_ARGUMENT":
            return Rejected(details)
        if name == "NOT_FOUND" or (name == "FAILED_PRECONDITION" and "signature" in details.lower()):
            # TF Serving answers an unknown signature with FAILED_PRECONDITION; dolg serve with NOT_FOUND.
            return ModelNotFoundError(f"{self.spec.describe()} not found at {self.target}: {details}")
        return ClientError(message)

    def metadata(self, timeout: float):
        request = pb.get_model_metadata_pb2.GetModelMetadataRequest(
            model_spec=self.spec.to_proto(), metadata_field=["signature_def"]
        )
        try:
            response = self._metadata_rpc(request, timeout=timeout, metadata=self._metadata)
        except self._grpc.RpcError as err:
            raise self._error(err, "GetModelMetadata") from None
        signature_map = pb.get_model_metadata_pb2.SignatureDefMap()
        if "signature_def" not in response.metadata or not response.metadata["signature_def"].Unpack(signature_map):
            raise ModelNotFoundError(f"{self.spec.describe()} at {self.target} returned no signature_def metadata")
        version = response.model_spec.version.value if response.model_spec.HasField("version") else None
        return signature_map, version

    def status(self, timeout: float) -> list[VersionStatus]:
        spec = self.spec.to_proto()
        spec.ClearField("signature_name")
        request = pb.get_model_status_pb2.GetModelStatusRequest(model_spec=spec)
        try:
            response = self._status_rpc(request, timeout=timeout, metadata=self._metadata)
        except self._grpc.RpcError as err:
            raise self._error(err, "GetModelStatus") from None
        state_name = pb.get_model_status_pb2.ModelVersionStatus.State.Name
        return [
            VersionStatus(int(v.version), state_name(v.state), v.status.error_message)
            for v in response.model_version_status
        ]

    def predict(self, blobs: Sequence[bytes], timeout: float) -> np.ndarray:
        request = pb.predict_pb2.PredictRequest(model_spec=self.spec.to_proto(), output_filter=[OUTPUT_KEY])
        tensor = request.inputs[INPUT_KEY]
        tensor.dtype = pb.types_pb2.DataType.Value(IMAGES_DTYPE)
        tensor.tensor_shape.dim.add(size=len(blobs))
        tensor.string_val.extend(blobs)
        if request.ByteSize() > self.max_message_bytes:
            raise TooLarge(f"request of {request.ByteSize()} bytes is over max_message_bytes={self.max_message_bytes}")
        try:
            response = self._predict(request, timeout=timeout, metadata=self._metadata)
        except self._grpc.RpcError as err:
            raise self._error(err, "Predict") from None
        if OUTPUT_KEY not in response.outputs:
            raise ClientError(f"the server's response has no 'embedding' output (got {sorted(response.outputs)})")
        return embedding_from_tensor(response.outputs[OUTPUT_KEY], len(blobs))

    @staticmethod
    def item_cost(nbytes: int) -> int:
        """Bytes one image adds to a ``PredictRequest`` (field tag + length varint + data)."""
        return nbytes + 1 + (nbytes.bit_length() + 6) // 7

    def fixed_cost(self) -> int:
        return len(self.spec.to_proto().SerializeToString()) + 64

    def close(self) -> None:
        self._channel.close()


# --------------------------------------------------------------------------- REST

_TRANSIENT_HTTP = {429, 502, 503, 504}


class RestTransport:
    """TF Serving's REST API (``/v1/models/...``) over one pooled ``requests.Session``."""

    protocol = "rest"

    def __init__(
        self,
        target: str,
        spec: ModelSpec,
        *,
        max_message_bytes: int,
        tls: TlsOptions,
        headers: Mapping[str, str] | None = None,
        pool_size: int = 4,
    ):
        import requests
        from requests.adapters import HTTPAdapter

        self._requests = requests
        if "://" in target:
            scheme = target.split("://", 1)[0].lower()
            if scheme not in ("http", "https"):
                raise ConfigError(f"REST target must be host:port or an http(s):// URL, got {target!r}")
            base = target.rstrip("/")
        else:
            base = ("https://" if tls.active else "http://") + target
        self.target = target
        self.spec = spec
        self.max_message_bytes = max_message_bytes
        url = f"{base}/v1/models/{quote(spec.name, safe='')}"
        if spec.version is not None:
            url += f"/versions/{spec.version}"
        elif spec.version_label:
            url += f"/labels/{quote(spec.version_label, safe='')}"
        self._url = url
        self._tempfiles: list[str] = []
        session = requests.Session()
        session.mount("http://", HTTPAdapter(pool_connections=1, pool_maxsize=pool_size, max_retries=0))
        session.mount("https://", HTTPAdapter(pool_connections=1, pool_maxsize=pool_size, max_retries=0))
        session.headers.update({"Content-Type": "application/json", **(headers or {})})
        self._session = session
        # Given per request, not on the session: requests lets REQUESTS_CA_BUNDLE override a session's verify.
        self._verify: bool | str = True
        self._cert: str | tuple[str, str] | None = None
        try:
            if tls.root_certificates is not None:
                self._verify = self._as_file(tls.root_certificates, "root certificates")
            if tls.client_certificate is not None:
                cert = self._as_file(tls.client_certificate, "client certificate")
                key = self._as_file(tls.client_key, "client key") if tls.client_key is not None else None
                self._cert = (cert, key) if key else cert
        except BaseException:
            self.close()  # removes the temporary files already written
            raise
        # Environment proxies (and NO_PROXY) apply as usual, except to a server on this machine.
        host = urlsplit(base).hostname or ""
        loopback = host == "localhost" or host.startswith("127.") or host == "::1"
        self._proxies = {"http": None, "https": None} if loopback else None

    def _as_file(self, value, what: str) -> str:
        """requests takes certificates as file paths: PEM bytes go to a private temporary file."""
        if not isinstance(value, bytes):
            if not os.path.isfile(value):
                raise ConfigError(f"{what} file not found: {os.fspath(value)!r}")
            return os.fspath(value)
        fd, path = tempfile.mkstemp(suffix=".pem")
        with os.fdopen(fd, "wb") as f:
            f.write(value)
        self._tempfiles.append(path)
        return path

    def _call(self, method: str, url: str, what: str, timeout: float, body: bytes | None = None) -> Any:
        r = self._requests
        try:
            response = self._session.request(
                method, url, data=body, timeout=timeout, verify=self._verify, cert=self._cert, proxies=self._proxies
            )
        except (r.exceptions.ConnectionError, r.exceptions.Timeout, r.exceptions.ChunkedEncodingError) as err:
            if "BadStatusLine" in str(err) and "\\x00\\x00" in str(err):  # HTTP/2 frames where a status line belongs
                raise WrongProtocolError(f"{what} at {self.target} (REST): {REST_ON_GRPC_PORT}") from None
            # urllib3 nests the useful part ("[Errno 111] Connection refused") deep in its message.
            errno = re.search(r"\[Errno -?\d+\] [^\"')]+", str(err))
            detail = errno.group(0) if errno else str(err)
            unreachable = isinstance(err, r.exceptions.ConnectionError) and bool(_UNREACHABLE.search(str(err)))
            raise Transient(f"{what} at {self.target} (REST): {type(err).__name__}: {detail}", unreachable) from None
        except r.exceptions.RequestException as err:
            raise ClientError(f"{what} at {self.target} (REST): {err}") from None
        try:
            payload = response.json()
        except ValueError:
            payload = None
        if response.status_code == 200 and isinstance(payload, dict):
            return payload
        detail = payload.get("error") if isinstance(payload, dict) else None
        detail = detail or response.text[:500] or response.reason
        message = f"{what} at {self.target} (REST): HTTP {response.status_code}: {detail}"
        status = response.status_code
        if status in _TRANSIENT_HTTP:
            raise Transient(message)
        if status == 400:
            raise Rejected(detail)
        if status == 413:
            raise TooLarge(message)
        if status == 404:
            raise ModelNotFoundError(f"{self.spec.describe()} not found at {self.target}: {detail}")
        raise ClientError(message)

    def metadata(self, timeout: float):
        from google.protobuf import json_format

        payload = self._call("GET", self._url + "/metadata", "GET metadata", timeout)
        signature_map = pb.get_model_metadata_pb2.SignatureDefMap()
        try:
            json_format.ParseDict(payload["metadata"]["signature_def"], signature_map, ignore_unknown_fields=True)
        except (KeyError, TypeError, json_format.ParseError) as err:
            raise ModelNotFoundError(
                f"{self.spec.describe()} at {self.target} returned no readable signature_def metadata: {err}"
            ) from None
        version = payload.get("model_spec", {}).get("version")
        return signature_map, int(version) if version not in (None, "") else None

    def status(self, timeout: float) -> list[VersionStatus]:
        payload = self._call("GET", self._url, "GET status", timeout)
        try:
            return [
                VersionStatus(int(v["version"]), str(v["state"]), str(v.get("status", {}).get("error_message", "")))
                for v in payload["model_version_status"]
            ]
        except (KeyError, TypeError, ValueError) as err:
            raise ClientError(f"unreadable model status from {self.target}: {err}") from None

    def predict(self, blobs: Sequence[bytes], timeout: float) -> np.ndarray:
        instances = [{"b64": base64.b64encode(b).decode("ascii")} for b in blobs]
        body = json.dumps({"signature_name": self.spec.signature_name, "inputs": {INPUT_KEY: instances}}).encode()
        if len(body) > self.max_message_bytes:
            raise TooLarge(f"request of {len(body)} bytes is over max_message_bytes={self.max_message_bytes}")
        payload = self._call("POST", self._url + ":predict", "predict", timeout, body)
        outputs = payload.get("outputs")
        if isinstance(outputs, dict):  # several outputs come back keyed by name
            outputs = outputs.get(OUTPUT_KEY)
        try:
            emb = np.asarray(outputs, dtype=np.float32)
        except (TypeError, ValueError):
            emb = None
        if emb is None or emb.ndim != 2 or emb.shape[0] != len(blobs):
            got = None if emb is None else emb.shape
            raise ClientError(f"the server returned 'embedding' of shape {got} for {len(blobs)} images")
        return emb

    @staticmethod
    def item_cost(nbytes: int) -> int:
        """Bytes one image adds to the JSON body: base64 plus ``{"b64": ""}, ``."""
        return 4 * ((nbytes + 2) // 3) + 12

    def fixed_cost(self) -> int:
        return 64 + len(self.spec.signature_name)

    def close(self) -> None:
        self._session.close()
        for path in self._tempfiles:
            try:
                os.unlink(path)
            except OSError:
                pass
        self._tempfiles.clear()
