"""The local TF-Serving-protocol server: a model manager plus the gRPC and REST front ends."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from dolg_tf.errors import ServingError
from dolg_tf.server.grpc_service import start_grpc_server
from dolg_tf.server.models import ModelManager, VersionPolicy
from dolg_tf.server.rest import start_rest_server

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeOptions:
    """Options of ``dolg serve`` (names follow ``tensorflow_model_server``'s flags).

    Args:
        model_base_path: directory of integer-named SavedModel versions.
        model_name: the name clients address.
        host: interface to bind; loopback unless told otherwise.
        port: gRPC port (0: a free one).
        rest_api_port: REST port (0: a free one; -1: no REST server).
        poll_seconds: how often to look for new versions (<= 0: only at start).
        version_policy: which versions to serve.
        version_labels: ``{"stable": 1}``.
        max_message_bytes: largest gRPC message / REST body accepted.
        workers: gRPC worker threads (the REST server uses a thread per connection).
        warmup: replay each version's warmup records before serving it.
        wait_for_model_s: how long to wait at start for a first version (None: forever).
    """

    model_base_path: str
    model_name: str = "dolg"
    host: str = "127.0.0.1"
    port: int = 8500
    rest_api_port: int = 8501
    poll_seconds: float = 1.0
    version_policy: VersionPolicy = field(default_factory=VersionPolicy)
    version_labels: dict[str, int] = field(default_factory=dict)
    max_message_bytes: int = 64 << 20
    workers: int = 16
    warmup: bool = True
    wait_for_model_s: float | None = None

    def __post_init__(self):
        if self.max_message_bytes < 1024:
            raise ServingError(f"max_message_bytes must be at least 1024, got {self.max_message_bytes}")
        if self.workers < 1:
            raise ServingError(f"workers must be >= 1, got {self.workers}")
        for name, port in (("port", self.port), ("rest_api_port", self.rest_api_port)):
            if not -1 <= port <= 65535 or (name == "port" and port < 0):
                raise ServingError(f"{name} must be a TCP port (0: pick a free one), got {port}")


class DolgServer:
    """Loads the model, then serves it over gRPC and REST until :meth:`stop`.

    Example:

    ```python
    server = DolgServer(ServeOptions("saved_models/dolg", port=0, rest_api_port=0)).start()
    print(server.grpc_port, server.rest_port)
    server.stop()
    ```
    """

    def __init__(self, options: ServeOptions):
        self.options = options
        self.manager = ModelManager(
            options.model_name,
            options.model_base_path,
            policy=options.version_policy,
            labels=options.version_labels,
            warmup=options.warmup,
            max_tensor_bytes=options.max_message_bytes,
        )
        self.grpc_port: int | None = None
        self.rest_port: int | None = None
        self._grpc = None
        self._rest = None
        self._rest_thread = None

    def start(self) -> DolgServer:
        opts = self.options
        self.manager.wait_until_available(opts.wait_for_model_s, poll_seconds=max(opts.poll_seconds, 0.5))
        missing = {label: v for label, v in opts.version_labels.items() if v not in self.manager.available_versions()}
        if missing:
            logger.warning("version labels point at versions that are not loaded: %s", missing)
        self._grpc, self.grpc_port = start_grpc_server(
            self.manager, opts.host, opts.port, opts.max_message_bytes, opts.workers
        )
        if opts.rest_api_port >= 0:
            self._rest, self._rest_thread, self.rest_port = start_rest_server(
                self.manager, opts.host, opts.rest_api_port, opts.max_message_bytes
            )
        self.manager.start_polling(opts.poll_seconds)
        logger.info(
            "serving %s versions %s from %s: gRPC %s:%s, REST %s:%s (pid %d)",
            opts.model_name, self.manager.available_versions(), self.manager.base_path,
            opts.host, self.grpc_port, opts.host, self.rest_port, os.getpid(),
        )  # fmt: skip
        return self

    def stop(self, grace_s: float = 5.0) -> None:
        """Stops accepting requests, lets in-flight ones finish (up to ``grace_s``), stops polling."""
        grpc_stopped = self._grpc.stop(grace_s) if self._grpc is not None else None  # both drain at once
        if self._rest is not None:
            self._rest.shutdown()  # no new connections; handler threads keep running
            left = self._rest.drain(grace_s)
            if left:
                logger.warning("%d REST request(s) still running after %.1f s; closing", left, grace_s)
            self._rest.server_close()
            self._rest = None
        if grpc_stopped is not None:
            grpc_stopped.wait()
            self._grpc = None
        self.manager.stop()
