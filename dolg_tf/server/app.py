"""The local TF-Serving-protocol server: a model manager plus the gRPC and REST front ends."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

from dolg_tf.errors import ServingError
from dolg_tf.server.grpc_server import start_grpc_server
from dolg_tf.server.models import DEFAULT_LOAD_RETRIES, DEFAULT_LOAD_RETRY_INTERVAL_S, ModelManager, VersionPolicy
from dolg_tf.server.preflight import check_port_number
from dolg_tf.server.rest import start_rest_server

logger = logging.getLogger(__name__)

# Bound on waiting for connection threads after their sockets are closed (a TF call cannot be interrupted).
JOIN_TIMEOUT_S = 120.0


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
        max_load_retries: retries of a failed version load (``--max_num_load_retries``).
        load_retry_interval_s: seconds between them (``--load_retry_interval_micros`` / 1e6).
        allow_version_labels_for_unavailable_models: accept, at start, a label whose
            version is not available (TF Serving refuses it without this flag).
        rest_max_connections: concurrent REST connections; more are answered 503 and closed.
        shutdown_grace_s: how long :meth:`DolgServer.stop` lets requests in progress run.
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
    max_load_retries: int = DEFAULT_LOAD_RETRIES
    load_retry_interval_s: float = DEFAULT_LOAD_RETRY_INTERVAL_S
    allow_version_labels_for_unavailable_models: bool = False
    rest_max_connections: int = 256
    shutdown_grace_s: float = 10.0

    def __post_init__(self):
        if self.max_load_retries < 0:
            raise ServingError(f"max_num_load_retries must be >= 0, got {self.max_load_retries}")
        if self.rest_max_connections < 1:
            raise ServingError(f"rest_api_max_connections must be >= 1, got {self.rest_max_connections}")
        if self.shutdown_grace_s < 0:
            raise ServingError(f"shutdown grace must be >= 0 seconds, got {self.shutdown_grace_s}")
        if self.max_message_bytes < 1024:
            raise ServingError(f"max_message_bytes must be at least 1024, got {self.max_message_bytes}")
        if self.workers < 1:
            raise ServingError(f"workers must be >= 1, got {self.workers}")
        check_port_number("port", self.port)
        check_port_number("rest_api_port", self.rest_api_port, allow_disabled=True)


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
            max_load_retries=options.max_load_retries,
            load_retry_interval_s=options.load_retry_interval_s,
        )
        self.grpc_port: int | None = None
        self.rest_port: int | None = None
        self._grpc = None
        self._grpc_pool = None
        self._rest = None
        self._rest_thread = None

    def start(self) -> DolgServer:
        """Waits for a first version, checks the labels, then opens the ports.

        Raises:
            ServingError: no version loaded in time, a label names an unavailable
                version (without ``allow_version_labels_for_unavailable_models``),
                or a port is in use.
        """
        opts = self.options
        self.manager.wait_until_available(opts.wait_for_model_s, poll_seconds=max(opts.poll_seconds, 0.5))
        self._check_labels()
        self._grpc, self.grpc_port, self._grpc_pool = start_grpc_server(
            self.manager, opts.host, opts.port, opts.max_message_bytes, opts.workers
        )
        if opts.rest_api_port >= 0:
            self._rest, self._rest_thread, self.rest_port = start_rest_server(
                self.manager, opts.host, opts.rest_api_port, opts.max_message_bytes, opts.rest_max_connections
            )
        self.manager.start_polling(opts.poll_seconds)
        logger.info(
            "serving %s versions %s from %s: gRPC %s:%s, REST %s:%s (pid %d)",
            opts.model_name, self.manager.available_versions(), self.manager.base_path,
            opts.host, self.grpc_port, opts.host, self.rest_port, os.getpid(),
        )  # fmt: skip
        return self

    def _check_labels(self) -> None:
        """TF Serving's start-up rule: a label must name a version that is available."""
        available = self.manager.available_versions()
        for label, version in sorted(self.options.version_labels.items()):
            if version in available:
                continue
            message = (
                f"Request to assign label to version {version} of model {self.options.model_name}, "
                "which is not currently available for inference"
            )
            if not self.options.allow_version_labels_for_unavailable_models:
                raise ServingError(
                    f"{message} (label {label!r}; pass --allow_version_labels_for_unavailable_models "
                    "to assign it before the version loads)"
                )
            logger.warning("%s; label %r answers NOT_FOUND until it loads", message, label)

    def stop(self, grace_s: float | None = None) -> None:
        """Drains and stops both servers, then the poller; returns once no request thread is running.

        New requests are refused at once (gRPC UNAVAILABLE, REST 503 with
        ``Connection: close``, also on kept-alive connections); requests in
        progress get up to ``grace_s`` (default: the options' grace) to finish.
        Worker threads are joined before returning, so none is inside
        TensorFlow when the interpreter shuts down.
        """
        grace_s = self.options.shutdown_grace_s if grace_s is None else grace_s
        t0 = time.monotonic()
        grpc_stopped = self._grpc.stop(grace_s) if self._grpc is not None else None  # both drain at once
        if self._rest is not None:
            # From here on new requests, on new or kept-alive connections, get 503 + Connection: close
            # (the accept loop keeps running to say so, instead of resetting connections).
            self._rest.begin_drain()
            left = self._rest.drain(grace_s)
            if left:
                logger.warning(
                    "%d REST request(s) still running after %.1f s; closing their connections", left, grace_s
                )
            self._rest.shutdown()  # the accept loop ends
            self._rest.server_close()  # new connections are refused
            self._rest.close_connections()
            stuck = self._rest.join_connections(JOIN_TIMEOUT_S)
            if stuck:
                logger.error("%d REST connection thread(s) did not end in %.0f s", stuck, JOIN_TIMEOUT_S)
            self._rest = None
        if grpc_stopped is not None:
            grpc_stopped.wait()
            self._grpc = None
        if self._grpc_pool is not None:
            self._grpc_pool.shutdown(wait=True)  # a handler past the grace period is still inside TensorFlow
            self._grpc_pool = None
        self.manager.stop()
        logger.info("stopped after %.1f s", time.monotonic() - t0)
