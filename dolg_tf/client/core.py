"""The DOLG embedding client: images in, L2-normalised embeddings out, over TF Serving's APIs."""

from __future__ import annotations

import logging
import os
import random
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

import numpy as np

from dolg_tf.client.inputs import Limits, as_item_list, precheck, prepare
from dolg_tf.client.options import DEFAULT_MAX_MESSAGE_BYTES, ClientOptions, ProgressArg, check_option_names
from dolg_tf.client.transports import (
    GrpcTransport,
    ModelInfo,
    ModelSpec,
    Rejected,
    RestTransport,
    TooLarge,
    Transient,
    VersionStatus,
    check_signature,
)
from dolg_tf.errors import ClientError, ConfigError, InvalidImageError, ModelNotFoundError, ServerUnavailableError
from dolg_tf.export.contract import DEFAULT_SIGNATURE

log = logging.getLogger(__name__)

PROTOCOLS = ("grpc", "rest", "saved_model")
DEFAULT_TARGETS = {"grpc": "localhost:8500", "rest": "localhost:8501"}
__all__ = ["DEFAULT_MAX_MESSAGE_BYTES", "Client", "ClientOptions", "embed", "pack_requests"]


def pack_requests(
    items: Iterable[tuple[int, bytes]],
    batch_size: int | Callable[[], int],
    max_message_bytes: int,
    item_cost: Callable[[int], int],
    fixed_cost: int,
) -> Iterator[list[tuple[int, bytes]]]:
    """Groups encoded images, in order, into requests of at most ``batch_size`` images and ``max_message_bytes``.

    Args:
        items: ``(index, encoded bytes)`` pairs.
        batch_size: most images per request, or a callable giving the current limit.
        max_message_bytes: the message-size limit a request must stay under.
        item_cost: bytes one image of ``n`` encoded bytes adds to a request.
        fixed_cost: bytes of a request with no image.

    Yields:
        Lists of ``(index, bytes)``, consecutive and in input order.

    Raises:
        InvalidImageError: one image alone makes a request over the limit.
    """
    limit = batch_size if callable(batch_size) else (lambda: batch_size)
    batch: list[tuple[int, bytes]] = []
    size = fixed_cost
    for index, data in items:
        cost = item_cost(len(data))
        if fixed_cost + cost > max_message_bytes:
            raise InvalidImageError(
                f"its {len(data)} encoded bytes make a request of about {fixed_cost + cost} bytes, over "
                f"max_message_bytes={max_message_bytes}; raise max_message_bytes (the server must accept it too)"
                " or send a smaller image",
                index,
            )
        if batch and (len(batch) >= limit() or size + cost > max_message_bytes):
            yield batch
            batch, size = [], fixed_cost
        batch.append((index, data))
        size += cost
    if batch:
        yield batch


class _Progress:
    """Progress over images: a tqdm bar, a plain stderr line when tqdm is missing, a callback, or nothing."""

    def __init__(self, progress: ProgressArg, total: int | None):
        self.done = 0
        self.total = total
        self._callback = progress if callable(progress) else None
        self._bar = None
        self._text = False
        self._last = 0.0
        self._start = time.monotonic()
        if progress is True:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                self._text = True
            else:
                self._bar = tqdm(total=total, unit="img", desc="embed", dynamic_ncols=True)

    def update(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self._text:
            now = time.monotonic()
            if now - self._last >= 0.5 or self.done == self.total:
                self._last = now
                rate = self.done / max(now - self._start, 1e-9)
                of = f"/{self.total}" if self.total is not None else ""
                sys.stderr.write(f"\rembed: {self.done}{of} images, {rate:.1f} img/s")
                sys.stderr.flush()
        if self._callback is not None:
            self._callback(self.done, self.total)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self._text and self.done:
            sys.stderr.write("\n")


def _option(name: str, settable: bool = False) -> property:
    """A :class:`Client` attribute that reads ``client.options.<name>``; a settable one replaces the options."""

    def get(self: Client) -> Any:
        return getattr(self._options, name)

    def set_(self: Client, value: Any) -> None:
        self._options = self._options.replace(**{name: value})

    return property(get, set_ if settable else None, doc=f"``options.{name}`` (see :class:`ClientOptions`).")


class Client:
    """Embeds images with a DOLG model served by TF Serving (or ``dolg serve``), over gRPC or REST.

    The client speaks only TF Serving's public APIs (``PredictionService``
    ``Predict`` / ``GetModelMetadata`` over gRPC with the ``tensorflow-serving-api``
    stubs; ``/v1/models/...`` over REST). On first use it fetches the model's
    metadata once and checks that the signature takes ``images`` (DT_STRING,
    encoded images) and returns ``embedding`` (DT_FLOAT, ``[N, D]``). One gRPC
    channel or HTTP session is kept for the client's life: use it as a context
    manager or call :meth:`close`.

    Args:
        target: ``host:port`` (default ``localhost:8500`` for gRPC,
            ``localhost:8501`` for REST; REST also takes an ``http(s)://`` URL).
            For ``protocol="saved_model"``: the SavedModel (or base) directory.
        model_name: the served model's name.
        signature_name: the signature to call (must be a DOLG ``images`` ->
            ``embedding`` signature).
        protocol: ``"grpc"``, ``"rest"``, or ``"saved_model"`` (no server: run
            the SavedModel in this process with TensorFlow).
        version: ask for this model version (default: the server's choice, the latest).
        version_label: ask for the version with this label (e.g. ``"stable"``);
            exclusive with ``version``.
        options: timeouts, retry policy, TLS, request sizes and progress, a
            frozen :class:`ClientOptions` checked once (default: its defaults).
        **option_values: any :class:`ClientOptions` field (``timeout=``,
            ``retries=``, ``tls=``, ``batch_size=``...), applied over ``options``.

    The options' retry and progress fields (``timeout``, ``retries``,
    ``deadline``, ``backoff``, ``max_backoff``, ``wait_for_server``,
    ``progress``) can be changed on a live client by assigning the attribute
    of that name (the new value is checked as in :class:`ClientOptions`); the
    others shape the channel or session and are fixed for the client's life.

    Raises:
        ConfigError: a bad option value, an unknown option name, or options
            that do not fit the protocol.

    Example:

    ```python
    from dolg_tf.client import Client

    with Client("localhost:8500") as client:
        emb = client.embed(["a.jpg", "b.png", pil_image, uint8_array])  # (4, 512), rows unit-norm
    ```
    """

    def __init__(
        self,
        target: str | os.PathLike | None = None,
        model_name: str = "dolg",
        signature_name: str = DEFAULT_SIGNATURE,
        protocol: str = "grpc",
        version: int | None = None,
        version_label: str | None = None,
        *,
        options: ClientOptions | None = None,
        **option_values: Any,
    ):
        if protocol not in PROTOCOLS:
            raise ConfigError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        if not isinstance(model_name, str) or not model_name:
            raise ConfigError(f"model_name must be a non-empty string, got {model_name!r}")
        if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 0):
            raise ConfigError(f"version must be a non-negative int, got {version!r}")
        if version is not None and version_label:
            raise ConfigError("give either version or version_label, not both")
        if options is None:
            options = ClientOptions(**check_option_names(option_values))
        elif not isinstance(options, ClientOptions):
            raise ConfigError(f"options must be a ClientOptions, got {type(options).__name__}")
        elif option_values:
            options = options.replace(**option_values)
        if options.credentials is not None and protocol != "grpc":
            raise ConfigError("credentials (grpc.ChannelCredentials) apply to protocol='grpc' only")
        if target is None:
            if protocol == "saved_model":
                raise ConfigError("protocol='saved_model' needs target=<SavedModel directory>")
            target = DEFAULT_TARGETS[protocol]
        target = os.fspath(target)
        if protocol != "saved_model" and target.startswith(":"):  # ":8501", as TF Serving's docs write it
            target = "localhost" + target
        self.target = target
        self.protocol = protocol
        self.spec = ModelSpec(model_name, signature_name, version, version_label)
        self._options = options
        # Until the server has answered once, "nobody listens there" is a wiring mistake, not an outage.
        self._contacted = protocol == "saved_model"
        # Lowered when the server refuses a whole batch but accepts its halves (its batch limit is smaller).
        self._batch_limit = options.batch_size
        self._info: ModelInfo | None = None
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._closed = False
        self._warned_norm = False
        headers = dict(options.headers) or None
        if protocol == "grpc":
            self._transport = GrpcTransport(
                self.target,
                self.spec,
                max_message_bytes=options.max_message_bytes,
                tls=options.tls_options,
                credentials=options.credentials,
                headers=headers,
            )
        elif protocol == "rest":
            self._transport = RestTransport(
                self.target,
                self.spec,
                max_message_bytes=options.max_message_bytes,
                tls=options.tls_options,
                headers=headers,
                pool_size=max(4, options.max_in_flight),
            )
        else:
            from dolg_tf.client.local import SavedModelTransport

            self._transport = SavedModelTransport(self.target, self.spec)
        self.max_message_bytes = min(options.max_message_bytes, self._transport.max_message_bytes)

    @property
    def options(self) -> ClientOptions:
        """The client's frozen :class:`ClientOptions`."""
        return self._options

    timeout = _option("timeout", settable=True)
    retries = _option("retries", settable=True)
    deadline = _option("deadline", settable=True)
    backoff = _option("backoff", settable=True)
    max_backoff = _option("max_backoff", settable=True)
    wait_for_server = _option("wait_for_server", settable=True)
    progress = _option("progress", settable=True)
    batch_size = _option("batch_size")
    max_in_flight = _option("max_in_flight")

    @property
    def limits(self) -> Limits:
        """The per-image limits (``max_image_bytes``, ``max_image_pixels``) checked before sending."""
        return self._options.limits

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Closes the channel / HTTP session. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client(target={self.target!r}, protocol={self.protocol!r}, {self.spec.describe()})"

    # ------------------------------------------------------------------ calls
    def _retrying(self, call: Callable[[float], Any]) -> Any:
        """Runs ``call(attempt_timeout)``, retrying :class:`Transient` failures with backoff inside the deadline.

        Before the server has answered once, "nothing listens there" is retried
        only for ``wait_for_server`` seconds (not counted against ``retries`` or
        the deadline, which start once a server is there).
        """
        start = waiting_since = time.monotonic()
        attempt = waits = 0
        while True:
            remaining = self.deadline - (time.monotonic() - start)
            try:
                result = call(min(self.timeout, max(0.05, remaining)))
            except Transient as err:
                now = time.monotonic()
                if err.unreachable and not self._contacted:
                    left = self.wait_for_server - (now - waiting_since)
                    if left <= 0:
                        raise ServerUnavailableError(self._unreachable_message(err)) from None
                    waits += 1
                    delay = min(self.max_backoff, self.backoff * 2 ** min(waits - 1, 30)) * random.uniform(0.5, 1.0)
                    log.info("%s; waiting for the server (%.0f s left)", err, left)
                    time.sleep(min(delay, left))
                    start = time.monotonic()
                    continue
                attempt += 1
                elapsed = now - start
                delay = min(self.max_backoff, self.backoff * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
                if attempt > self.retries or elapsed + delay >= self.deadline:
                    raise ServerUnavailableError(
                        f"{err} (gave up after {attempt} attempt(s) in {elapsed:.1f} s; "
                        f"retries={self.retries}, deadline={self.deadline:g} s)"
                    ) from None
                log.warning("%s; retry %d of %d in %.2f s", err, attempt, self.retries, delay)
                time.sleep(delay)
            except (ModelNotFoundError, Rejected, TooLarge):
                self._contacted = True  # the server answered, if only to refuse
                raise
            else:
                self._contacted = True
                return result

    def _unreachable_message(self, err: Transient) -> str:
        unknown_host = re.search(r"resol|name or service|nodename|hostname", str(err), re.I)
        reason = "unknown host" if unknown_host else "connection refused"
        waited = f" for {self.wait_for_server:g} s" if self.wait_for_server else ""
        protocol = {"grpc": "gRPC", "rest": "REST"}[self.protocol]
        return (
            f"no server answers at {self.target} ({protocol}: {reason}{waited}): is `dolg serve` or TF Serving "
            "running there? (--wait-for-server SECONDS / wait_for_server= waits for one that is starting)"
        )

    def check(self) -> ModelInfo:
        """Fetches the model's metadata (once) and checks it is a DOLG embedding signature.

        Returns:
            The :class:`ModelInfo` (name, version, signature, embedding size).

        Raises:
            ModelNotFoundError: unknown model / version / label / signature, or
                not a DOLG embedding signature.
            ServerUnavailableError: the server stayed unreachable past the deadline.
        """
        if self._closed:
            raise ClientError("the client is closed")
        with self._lock:
            if self._info is None:
                try:
                    signature_map, version = self._retrying(self._transport.metadata)
                except Rejected as err:  # e.g. TF Serving's answer to an unknown version label
                    raise ModelNotFoundError(f"{self.spec.describe()} refused by {self.target}: {err}") from None
                dim = check_signature(signature_map, self.spec)
                self._info = ModelInfo(self.spec.name, version, self.spec.signature_name, dim)
                log.info(
                    "%s at %s (%s): version %s, embedding size %s",
                    self.spec.describe(),
                    self.target,
                    self.protocol,
                    version,
                    dim,
                )
        return self._info

    def status(self) -> list[VersionStatus]:
        """The model's versions and their states (``GetModelStatus`` / ``GET /v1/models/{name}``).

        Asks for the client's version or label when it has one, else for all
        versions. Useful to wait for a server: a version in state ``AVAILABLE``
        answers requests.

        Raises:
            ModelNotFoundError: unknown model, version or label.
            ServerUnavailableError: the server stayed unreachable past the deadline.
        """
        if self._closed:
            raise ClientError("the client is closed")
        try:
            return self._retrying(self._transport.status)
        except Rejected as err:
            raise ModelNotFoundError(f"{self.spec.describe()} refused by {self.target}: {err}") from None

    @property
    def info(self) -> ModelInfo:
        """The served model's :class:`ModelInfo` (fetched on first access)."""
        return self.check()

    def _send(self, batch: list[tuple[int, bytes]]) -> np.ndarray:
        """Embeds one request's images; on a refusal, splits it to name the image at fault."""
        blobs = [data for _, data in batch]
        try:
            emb = self._retrying(lambda timeout: self._transport.predict(blobs, timeout))
        except Rejected as err:
            if len(batch) == 1:
                raise InvalidImageError(f"rejected by the server: {_server_reason(err)}", batch[0][0]) from None
            refused = f"a batch of {len(batch)} images was refused ({_server_reason(err)})"
        except TooLarge as err:
            if len(batch) == 1:
                raise InvalidImageError(
                    f"a request holding only this image is over a message-size limit: {err}", batch[0][0]
                ) from None
            refused = None
        else:
            return self._checked(emb, len(batch))
        half = len(batch) // 2
        parts = [self._send(batch[:half]), self._send(batch[half:])]
        if refused is not None:
            # Both halves went through: the server refuses the batch size itself.
            accepted = len(batch) - half
            if accepted < self._batch_limit:
                self._batch_limit = accepted
                log.warning("%s but its halves were accepted: sending at most %d images per request", refused, accepted)
        return np.concatenate(parts)

    def _checked(self, emb: np.ndarray, n: int) -> np.ndarray:
        info = self._info
        if emb.shape[0] != n or (info is not None and info.embedding_dim and emb.shape[1] != info.embedding_dim):
            raise ClientError(f"the server returned embeddings of shape {emb.shape} for {n} images")
        if not self._warned_norm and not np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-3):
            self._warned_norm = True
            log.warning("the served model's embeddings are not unit-norm; is it a DOLG export?")
        return emb

    def embed(self, images: Any, *, progress: ProgressArg | None = None) -> np.ndarray:
        """Embeds images, in order.

        Args:
            images: one image or an iterable of images, kinds mixed freely: file
                paths (``str`` / ``pathlib.Path``), encoded JPEG / PNG / GIF / BMP
                ``bytes``, numpy ``uint8`` arrays ``(H, W)``, ``(H, W, 1)`` or
                ``(H, W, 3)`` (RGB), PIL images; a 4-D ``(N, H, W, 3)`` uint8 array
                is N images. Arrays and PIL images are sent as lossless PNG.
            progress: True: a progress bar (tqdm, or a plain stderr line);
                a callable: called as ``progress(done, total)`` after each
                request; default: the client's ``progress``.

        Returns:
            float32 array ``(N, D)``, one L2-normalised row per image, in input order
            (``(1, D)`` for a single image).

        Raises:
            InvalidImageError: an image is missing, unreadable, not an image,
                too large, or refused by the server; ``.index`` names it.
            ModelNotFoundError: see :meth:`check`.
            ServerUnavailableError: a request kept failing until its deadline.
        """
        items, _ = as_item_list(images)
        limits = self.limits
        if isinstance(items, Sequence):
            for index, item in enumerate(items):  # cheap checks first: fail before any server work
                precheck(item, index, limits)
        info = self.check()
        total = len(items) if isinstance(items, Sequence) else None
        bar = _Progress(self.progress if progress is None else progress, total)
        try:
            parts = self._embed_batches(items, bar, limits)
        finally:
            bar.close()
        if not parts:
            return np.zeros((0, info.embedding_dim or 0), np.float32)
        return np.concatenate([emb for _, emb in sorted(parts, key=lambda p: p[0])])

    def _embed_batches(self, items: Iterable[Any], bar: _Progress, limits: Limits) -> list[tuple[int, np.ndarray]]:
        encoded = ((i, prepare(item, i, limits)) for i, item in enumerate(items))
        batches = pack_requests(
            encoded,
            lambda: self._batch_limit,
            self.max_message_bytes,
            self._transport.item_cost,
            self._transport.fixed_cost(),
        )
        if self.max_in_flight == 1 and self.protocol == "saved_model":
            # In-process: nothing to overlap with, keep it on this thread.
            parts = []
            for batch in batches:
                parts.append((batch[0][0], self._send(batch)))
                bar.update(len(batch))
            return parts
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.max_in_flight, thread_name_prefix="dolg-client")
        parts: list[tuple[int, np.ndarray]] = []
        pending: dict[Future, list[tuple[int, bytes]]] = {}
        errors: list[BaseException] = []

        def collect(done) -> None:
            for fut in done:
                batch = pending.pop(fut)
                if fut.cancelled():
                    continue
                if fut.exception() is not None:
                    errors.append(fut.exception())
                else:
                    parts.append((batch[0][0], fut.result()))
                    bar.update(len(batch))

        try:
            for batch in batches:
                # The next batch is read and encoded while max_in_flight requests run.
                while len(pending) >= self.max_in_flight:
                    collect(wait(pending, return_when=FIRST_COMPLETED)[0])
                if errors:
                    break
                pending[self._pool.submit(self._send, batch)] = batch
        except InvalidImageError as err:  # a local check failed: let earlier requests report first
            errors.append(err)
        except BaseException:  # interrupted: drop what has not started
            for fut in pending:
                fut.cancel()
            raise
        if errors:
            for fut in pending:
                fut.cancel()
        collect(wait(pending)[0])
        if errors:
            raise min(errors, key=_error_order)
        return parts


def _server_reason(err: Exception) -> str:
    """A server's INVALID_ARGUMENT text without TF's node trace or the index within the sub-request."""
    text = re.split(r"\s*\[\[\{\{node ", str(err), maxsplit=1)[0].strip()
    text = re.sub(r"^assertion failed: \[(.*)\]$", r"\1", text, flags=re.S)
    return re.sub(r"\b(images|pixels)\[\d+\]: ", "", text)


def _error_order(err: BaseException) -> tuple[int, float]:
    """Reports the lowest-indexed image error first; other errors before image errors."""
    index = getattr(err, "index", None)
    return (1, index) if isinstance(err, InvalidImageError) and index is not None else (0, 0)


def embed(images: Any, **client_options: Any) -> np.ndarray:
    """Embeds images with a one-off :class:`Client` (``Client(**client_options).embed(images)``).

    Args:
        images: see :meth:`Client.embed`.
        **client_options: :class:`Client` arguments (``target``, ``protocol``,
            ``model_name``, ``options``) and :class:`ClientOptions` fields
            (``batch_size``, ``progress``, ``timeout``...).

    Returns:
        float32 ``(N, D)``, L2-normalised rows in input order.

    Example:

    ```python
    import dolg_tf.client

    emb = dolg_tf.client.embed(["query.jpg"], target="localhost:8500")
    ```
    """
    with Client(**client_options) as client:
        return client.embed(images)
