"""How a :class:`~dolg_tf.client.Client` talks to its server: timeouts, retry policy, TLS, request sizes.

:class:`ClientOptions` is frozen and checked once, when it is made; a client
(or many) built from it never checks the values again. Which model to call
(target, protocol, model name, signature, version) stays with the client.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from dolg_tf.client.inputs import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS, Limits
from dolg_tf.client.transports import TlsOptions
from dolg_tf.errors import ConfigError

# Above the export's 20 MiB per-image limit even as base64 JSON, under dolg serve's
# 64 MiB and TF Serving's 2 GiB. A plain gRPC server built with stock options takes 4 MiB.
DEFAULT_MAX_MESSAGE_BYTES = 32 * 1024 * 1024

ProgressArg = bool | Callable[[int, int | None], Any]

_SECONDS = ("timeout", "deadline", "backoff", "max_backoff")
_COUNTS = ("max_message_bytes", "batch_size", "max_in_flight", "max_image_bytes", "max_image_pixels")
_PEM = ("root_certificates", "client_certificate", "client_key")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class ClientOptions:
    """Timeouts, retry policy, TLS and request sizes of a :class:`~dolg_tf.client.Client`, checked once.

    Args:
        timeout: seconds allowed for one request attempt.
        retries: how many times one request is retried after UNAVAILABLE /
            DEADLINE_EXCEEDED (REST: 429, 502, 503, 504, connection errors).
        deadline: seconds one request may take in total, retries and backoff
            included; past it, :class:`~dolg_tf.errors.ServerUnavailableError`.
        backoff: first retry delay in seconds; it doubles each retry up to
            ``max_backoff``, each delay scaled by a random factor in [0.5, 1]
            (jitter) so that many clients do not retry in step.
        max_backoff: longest delay between two attempts.
        wait_for_server: seconds to keep retrying while the first contact finds
            no server (connection refused, unknown host). 0: a wiring mistake is
            reported at once, naming the target. Once the server has answered,
            failures are retried as above whatever this is.
        tls: use TLS (implied by the certificate options).
        root_certificates: CA certificates (PEM bytes or path); default: the system's.
        client_certificate: client certificate chain for mutual TLS (PEM bytes or path).
        client_key: private key of ``client_certificate`` (PEM bytes or path).
        server_name: name to check in the server's certificate (gRPC; for IPs and tunnels).
        credentials: ready-made ``grpc.ChannelCredentials`` (gRPC; overrides the TLS options).
        headers: extra request metadata / HTTP headers, a mapping or ``(name, value)``
            pairs (e.g. ``{"authorization": "Bearer ..."}``); kept as a tuple of pairs.
        max_message_bytes: largest request sent; requests are split to stay under it.
        batch_size: most images per request (the export refuses more than its
            ``max_batch_size``, 32 by default).
        max_in_flight: requests sent concurrently (1: one at a time, while the
            next batch is read and encoded).
        max_image_bytes: largest encoded image accepted (the server's limit).
        max_image_pixels: largest image (height x width) accepted (the server's limit).
        progress: default progress report of :meth:`Client.embed`: True (a bar),
            False, or a callable ``progress(done, total)``.

    Raises:
        ConfigError: a value of the wrong type or out of range, named with the
            value given.

    Example:

    ```python
    from dolg_tf.client import Client, ClientOptions

    patient = ClientOptions(timeout=300, retries=20, deadline=900, tls=True)
    with Client("serving.example.com:8500", options=patient) as client:
        emb = client.embed(["a.jpg"])
    ```
    """

    timeout: float = 60.0
    retries: int = 10
    deadline: float = 120.0
    backoff: float = 0.25
    max_backoff: float = 8.0
    wait_for_server: float = 0.0
    tls: bool = False
    root_certificates: bytes | str | os.PathLike | None = None
    client_certificate: bytes | str | os.PathLike | None = None
    client_key: bytes | str | os.PathLike | None = None
    server_name: str | None = None
    credentials: Any = None
    headers: tuple[tuple[str, Any], ...] = ()
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    batch_size: int = 8
    max_in_flight: int = 1
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    progress: ProgressArg = False

    def __post_init__(self) -> None:
        for name in _SECONDS:
            value = getattr(self, name)
            if not _is_number(value) or not value > 0:
                raise ConfigError(f"{name} must be a positive number of seconds, got {value!r}")
            object.__setattr__(self, name, float(value))
        if not _is_number(self.wait_for_server) or not self.wait_for_server >= 0:
            raise ConfigError(f"wait_for_server must be a number of seconds >= 0, got {self.wait_for_server!r}")
        object.__setattr__(self, "wait_for_server", float(self.wait_for_server))
        if not _is_int(self.retries) or self.retries < 0:
            raise ConfigError(f"retries must be a non-negative int, got {self.retries!r}")
        for name in _COUNTS:
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ConfigError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.tls, bool):
            raise ConfigError(f"tls must be True or False, got {self.tls!r}")
        for name in _PEM:
            value = getattr(self, name)
            if value is not None and not isinstance(value, (bytes, str, os.PathLike)):
                raise ConfigError(f"{name} must be PEM bytes or a file path, got {type(value).__name__}")
        if self.server_name is not None and (not isinstance(self.server_name, str) or not self.server_name):
            raise ConfigError(f"server_name must be a non-empty string, got {self.server_name!r}")
        object.__setattr__(self, "headers", _header_pairs(self.headers))
        if not isinstance(self.progress, bool) and not callable(self.progress):
            raise ConfigError(f"progress must be True, False or a callable(done, total), got {self.progress!r}")

    @property
    def tls_options(self) -> TlsOptions:
        """The TLS settings as the transports take them."""
        return TlsOptions(self.tls, self.root_certificates, self.client_certificate, self.client_key, self.server_name)

    @property
    def limits(self) -> Limits:
        """The per-image limits checked before an image is sent."""
        return Limits(self.max_image_bytes, self.max_image_pixels)

    def replace(self, **changes: Any) -> ClientOptions:
        """A copy with ``changes`` applied, checked like a new one.

        Raises:
            ConfigError: an unknown option name, or a bad value.
        """
        return dataclasses.replace(self, **check_option_names(changes))


def check_option_names(options: Mapping[str, Any]) -> Mapping[str, Any]:
    """Returns ``options`` after checking that each key names a :class:`ClientOptions` field.

    Raises:
        ConfigError: an unknown name (a typo), with the names that exist.
    """
    fields = {f.name for f in dataclasses.fields(ClientOptions)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ConfigError(f"unknown client option(s) {', '.join(unknown)}; the options are {', '.join(sorted(fields))}")
    return options


def _header_pairs(headers: Mapping[str, Any] | Iterable[tuple[str, Any]] | None) -> tuple[tuple[str, Any], ...]:
    if headers is None:
        return ()
    items = headers.items() if isinstance(headers, Mapping) else headers
    try:
        pairs = tuple((name, value) for name, value in items)
    except (TypeError, ValueError):
        raise ConfigError(f"headers must be a mapping or (name, value) pairs, got {headers!r}") from None
    for name, value in pairs:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"header names must be non-empty strings, got {name!r}")
        if not isinstance(value, (str, bytes)):
            raise ConfigError(f"header {name!r}: the value must be str or bytes, got {type(value).__name__}")
    return pairs
