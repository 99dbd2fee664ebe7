"""Loading SavedModel versions from a base path and running their signatures, as TF Serving does.

A base path holds one directory per version, named by an integer
(``saved_models/dolg/1/``, ``.../2/``). :class:`ModelManager` polls it, loads
the versions its policy asks for (by default the latest one), runs each
version's warmup records before making it available, and unloads a version only
after its replacement is available, so requests never find the model missing.
:class:`Servable` is one loaded version: it validates request tensors against
the version's ``SignatureDef`` and runs the signature.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow_serving.apis import predict_pb2

from dolg_tf.errors import ExportError, ServingError
from dolg_tf.export.contract import (
    DEFAULT_SIGNATURE,
    INIT_OP_SIGNATURE,
    SAVED_MODEL_FILE,
    SERVE_TAG,
    VERSION_NAME,
    read_export_metadata,
    warmup_path,
)
from dolg_tf.export.contract import complete_versions as scan_versions
from dolg_tf.export.reader import read_meta_graph
from dolg_tf.server.preflight import VersionPolicy, check_base_path, describe_user, parse_version_labels
from dolg_tf.server.status import RequestError, invalid_argument, not_found

logger = logging.getLogger(__name__)

__all__ = ["ModelManager", "Servable", "VersionPolicy", "VersionState", "parse_version_labels"]

# TF Serving replays at most this many warmup records per version.
MAX_WARMUP_RECORDS = 1000
# TF Serving's defaults for --max_num_load_retries and --load_retry_interval_micros.
DEFAULT_LOAD_RETRIES = 5
DEFAULT_LOAD_RETRY_INTERVAL_S = 60.0
# A progress line at least this often while a version loads or warms up.
PROGRESS_EVERY_S = 10.0


def _tensor_spec(info: meta_graph_pb2.TensorInfo) -> tuple[tf.DType, tf.TensorShape]:
    return tf.dtypes.as_dtype(info.dtype), tf.TensorShape(info.tensor_shape)


class Servable:
    """One loaded version of a model.

    Args:
        name: the model name it is served under.
        version: its integer version.
        path: the version directory.
        max_tensor_bytes: the largest decoded input tensor accepted.
    """

    def __init__(self, name: str, version: int, path: str, max_tensor_bytes: int = 64 << 20):
        self.name = name
        self.version = version
        self.path = path
        self.max_tensor_bytes = max_tensor_bytes
        self.meta_graph = read_meta_graph(path, SERVE_TAG)
        self.signature_defs = self.meta_graph.signature_def
        self.max_batch_size = read_max_batch_size(path)
        self._loaded = tf.saved_model.load(path, tags=[SERVE_TAG])
        self._functions = dict(self._loaded.signatures)

    # --- signatures -----------------------------------------------------------------
    def signature(self, signature_name: str) -> tuple[str, meta_graph_pb2.SignatureDef]:
        """Resolves ``""`` to ``serving_default``; an unknown name is NOT_FOUND."""
        name = signature_name or DEFAULT_SIGNATURE
        if name == INIT_OP_SIGNATURE or name not in self.signature_defs or name not in self._functions:
            known = sorted(k for k in self._functions if k != INIT_OP_SIGNATURE)
            raise not_found(
                f'Serving signature key "{name}" not found in model {self.name} version {self.version}; '
                f"signatures: {', '.join(known)}"
            )
        return name, self.signature_defs[name]

    # --- running ----------------------------------------------------------------------
    def run(
        self,
        signature_name: str,
        inputs: Mapping[str, np.ndarray],
        output_filter: Sequence[str] = (),
    ) -> tuple[str, dict[str, np.ndarray]]:
        """Runs a signature on numpy inputs.

        Args:
            signature_name: a signature key (``""`` means ``serving_default``).
            inputs: one array per input alias, of the signature's dtype.
            output_filter: output aliases to return (empty: all).

        Returns:
            ``(resolved signature name, {output alias: array})``.

        Raises:
            RequestError: NOT_FOUND for an unknown signature, INVALID_ARGUMENT for
                inputs that do not match it (names, dtype, shape) and whatever
                status the graph itself raises (e.g. INVALID_ARGUMENT from its
                input checks).
        """
        name, signature_def = self.signature(signature_name)
        expected = set(signature_def.inputs)
        sent = set(inputs)
        if sent != expected:
            raise invalid_argument(
                f"input size does not match signature: {len(sent)}!={len(expected)} "
                f"len({{{','.join(sorted(sent))}}}) != len({{{','.join(sorted(expected))}}}). "
                f"Sent extra: {{{','.join(sorted(sent - expected))}}}. "
                f"Missing but required: {{{','.join(sorted(expected - sent))}}}."
            )
        unknown_outputs = [o for o in output_filter if o not in signature_def.outputs]
        if unknown_outputs:
            raise invalid_argument(f"output tensor alias not found in signature: {unknown_outputs[0]}")
        tensors = {}
        for alias, array in inputs.items():
            dtype, shape = _tensor_spec(signature_def.inputs[alias])
            got = tf.dtypes.as_dtype(array.dtype) if array.dtype != object else tf.string
            if got != dtype:
                raise invalid_argument(f"input '{alias}' expects dtype {dtype.name} but got {got.name}")
            if not shape.is_compatible_with(array.shape):
                raise invalid_argument(
                    f"input '{alias}' expects shape {_shape_text(shape)} but got {list(array.shape)}"
                )
            tensors[alias] = tf.constant(array, dtype=dtype)
        try:
            result = self._functions[name](**tensors)
        except tf.errors.OpError as err:
            raise RequestError.from_canonical(err.error_code, graph_error_message(err.message)) from None
        except (TypeError, ValueError) as err:  # argument binding in the Python signature wrapper
            raise invalid_argument(str(err)) from None
        wanted = list(output_filter) or list(signature_def.outputs)
        return name, {alias: result[alias].numpy() for alias in wanted}

    def predict(self, request: predict_pb2.PredictRequest) -> predict_pb2.PredictResponse:
        """Answers a ``PredictRequest`` (model_spec already resolved to this version).

        Every input's declared shape, value count and size is checked against the
        signature and the limits before any tensor is built from it.
        """
        _, signature_def = self.signature(request.model_spec.signature_name)
        inputs = {
            alias: self.tensor_from_proto(alias, proto, signature_def.inputs.get(alias))
            for alias, proto in request.inputs.items()
        }
        name, outputs = self.run(request.model_spec.signature_name, inputs, list(request.output_filter))
        response = predict_pb2.PredictResponse()
        response.model_spec.name = self.name
        response.model_spec.version.value = self.version
        response.model_spec.signature_name = name
        for alias, value in outputs.items():
            response.outputs[alias].CopyFrom(tf.make_tensor_proto(value))
        return response

    def check_batch(self, alias: str, batch: int) -> None:
        """Refuses a batch over the export's ``max_batch_size`` (before any tensor is built)."""
        if self.max_batch_size is not None and batch > self.max_batch_size:
            raise invalid_argument(
                f"input '{alias}': batch of {batch} is over the limit of {self.max_batch_size} "
                f"(max_batch_size of {self.name} version {self.version}); split it into smaller requests"
            )

    def tensor_from_proto(self, alias: str, proto, spec: meta_graph_pb2.TensorInfo | None = None) -> np.ndarray:
        """Decodes a request ``TensorProto``, checking it before anything is allocated.

        A ``TensorProto`` may declare a huge shape with a single value, which
        TensorFlow expands by repeating the last value; so the declared shape is
        checked against the signature (dtype, rank, batch size) and the byte
        limit first, string values are counted by their real bytes, and a string
        tensor must carry exactly one value per element.
        """
        shape = [d.size for d in proto.tensor_shape.dim]
        if any(d < 0 for d in shape):
            raise invalid_argument(f"input '{alias}' is not a valid TensorProto: negative dimension in shape {shape}")
        if spec is not None:
            dtype, want = _tensor_spec(spec)
            if proto.dtype != dtype.as_datatype_enum:
                try:
                    got = tf.dtypes.as_dtype(proto.dtype).name
                except TypeError:
                    got = f"DataType {proto.dtype}"
                raise invalid_argument(f"input '{alias}' expects dtype {dtype.name} but got {got}")
            if not want.is_compatible_with(shape):
                raise invalid_argument(f"input '{alias}' expects shape {_shape_text(want)} but got {shape}")
            if want.rank and want[0] is None and shape:
                self.check_batch(alias, shape[0])
        elements = 1
        for d in shape:  # Python ints: no overflow on absurd shapes
            elements *= d
        if proto.dtype == tf.string.as_datatype_enum:
            count = len(proto.string_val)
            if count != elements:
                raise invalid_argument(
                    f"input '{alias}': shape {shape} has {elements} elements but the tensor carries {count} "
                    "string values; send exactly one value per element"
                )
            nbytes = sum(len(v) for v in proto.string_val)
        else:
            try:
                nbytes = elements * max(tf.dtypes.as_dtype(proto.dtype).size, 1)
            except (TypeError, ValueError) as err:
                raise invalid_argument(f"input '{alias}' is not a valid TensorProto: {err}") from None
        if nbytes > self.max_tensor_bytes:
            raise invalid_argument(
                f"input '{alias}': shape {shape} needs {nbytes} bytes, over the limit of {self.max_tensor_bytes} bytes"
            )
        try:
            return tf.make_ndarray(proto)
        except (TypeError, ValueError, KeyError) as err:
            raise invalid_argument(f"input '{alias}' is not a valid TensorProto: {err}") from None

    def warmup(self) -> int:
        """Replays ``assets.extra/tf_serving_warmup_requests``; returns the number of records run.

        Raises:
            ServingError: a record is not a ``PredictionLog`` with a predict request,
                or its request fails (TF Serving fails the load in both cases).
        """
        from tensorflow_serving.apis import prediction_log_pb2

        path = warmup_path(self.path)
        if not os.path.exists(path):
            return 0
        count = 0
        last_log = time.monotonic()
        for record in tf.data.TFRecordDataset(path).take(MAX_WARMUP_RECORDS):
            if time.monotonic() - last_log > PROGRESS_EVERY_S:
                logger.info("%s version %d: warming up, %d records replayed", self.name, self.version, count)
                last_log = time.monotonic()
            log = prediction_log_pb2.PredictionLog()
            try:
                log.ParseFromString(record.numpy())
            except Exception as err:  # protobuf's DecodeError has no stable import path
                raise ServingError(f"{path}: record {count} is not a PredictionLog: {err}") from None
            if log.WhichOneof("log_type") != "predict_log":
                kind = log.WhichOneof("log_type")
                raise ServingError(f"{path}: record {count} is {kind}, only predict_log is supported")
            try:
                self.predict(log.predict_log.request)
            except RequestError as err:
                raise ServingError(f"{path}: warmup record {count} failed: {err.message}") from None
            count += 1
        return count


def read_max_batch_size(path: str) -> int | None:
    """``max_batch_size`` recorded in an export's ``assets.extra/dolg_export.json`` (None: not recorded)."""
    try:
        value = read_export_metadata(path).get("export_config", {}).get("max_batch_size")
    except (ExportError, AttributeError):
        return None
    return value if isinstance(value, int) and value > 0 else None


@contextlib.contextmanager
def progress(message: str, every_s: float = PROGRESS_EVERY_S) -> Iterator[None]:
    """Logs ``message (N s)`` every ``every_s`` seconds until the block ends (long loads are not silent)."""
    done = threading.Event()
    t0 = time.monotonic()

    def beat():
        while not done.wait(every_s):
            logger.info("%s (%.0f s)", message, time.monotonic() - t0)

    thread = threading.Thread(target=beat, name="dolg-serve-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


_EAGER_PREFIX = re.compile(
    r"^Graph execution error:\s*(?:Detected at node .*?\n<stack traces unavailable>\n)?", re.DOTALL
)
_EAGER_SUFFIX = re.compile(r"\s*\[Op:__inference_[^\]]*\]\s*$")


def graph_error_message(message: str) -> str:
    """The graph's own message, as TF Serving's session returns it, without eager-call decorations."""
    return _EAGER_SUFFIX.sub("", _EAGER_PREFIX.sub("", message, count=1)).strip()


def _shape_text(shape: tf.TensorShape) -> str:
    return "<unknown rank>" if shape.rank is None else str([-1 if d is None else d for d in shape.as_list()])


@dataclass
class VersionState:
    """What ``GetModelStatus`` reports for one version."""

    state: str  # LOADING, AVAILABLE, UNLOADING or END, as in ModelVersionStatus.State
    error_code: grpc.StatusCode = grpc.StatusCode.OK
    error_message: str = ""
    since: float = field(default_factory=time.time)


class ModelManager:
    """Serves the versions of one model found under a base path.

    Args:
        model_name: the name clients address (``model_spec.name``).
        base_path: directory of integer-named version directories.
        policy: which versions to keep loaded.
        labels: version labels (``{"stable": 1}``).
        warmup: replay each version's warmup records before serving it.
        max_tensor_bytes: the largest decoded input tensor accepted.
        max_load_retries: retries of a failed load before the version is
            given up (END), as TF Serving's ``--max_num_load_retries``.
        load_retry_interval_s: seconds between those retries
            (``--load_retry_interval_micros`` / 1e6).
    """

    def __init__(
        self,
        model_name: str,
        base_path: str | os.PathLike,
        policy: VersionPolicy | None = None,
        labels: Mapping[str, int] | None = None,
        warmup: bool = True,
        max_tensor_bytes: int = 64 << 20,
        max_load_retries: int = DEFAULT_LOAD_RETRIES,
        load_retry_interval_s: float = DEFAULT_LOAD_RETRY_INTERVAL_S,
    ):
        self.model_name = model_name
        self.base_path = check_base_path(base_path)
        self.policy = policy or VersionPolicy()
        self.labels = dict(labels or {})
        self.warmup = warmup
        self.max_tensor_bytes = max_tensor_bytes
        if max_load_retries < 0:
            raise ServingError(f"max_num_load_retries must be >= 0, got {max_load_retries}")
        self.max_load_retries = max_load_retries
        self.load_retry_interval_s = max(0.0, load_retry_interval_s)
        self._servables: dict[int, Servable] = {}
        self._states: dict[int, VersionState] = {}
        self._lock = threading.Lock()
        self._poll_lock = threading.Lock()  # one reconcile at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- discovery and loading --------------------------------------------------------
    def complete_versions(self) -> list[int]:
        """Integer-named subdirectories holding a ``saved_model.pb`` (a half-written one has none yet)."""
        try:
            return scan_versions(self.base_path)
        except PermissionError as err:
            raise ServingError(
                f"cannot list model base path {self.base_path}: permission denied ({describe_user()})"
            ) from err
        except OSError as err:
            raise ServingError(f"cannot list model base path {self.base_path}: {err.strerror or err}") from err

    def unreadable_versions(self) -> list[str]:
        """Problems with integer-named entries that are not served because they cannot be read."""
        problems = []
        try:
            entries = [e for e in os.scandir(self.base_path) if VERSION_NAME.fullmatch(e.name)]
        except OSError:
            return problems  # complete_versions names it
        for entry in sorted(entries, key=lambda e: int(e.name)):
            graph = os.path.join(entry.path, SAVED_MODEL_FILE)
            try:
                with open(graph, "rb"):
                    pass
            except PermissionError:
                problems.append(f"{graph}: permission denied ({describe_user()})")
            except FileNotFoundError:
                if not os.access(entry.path, os.R_OK | os.X_OK):
                    problems.append(f"{entry.path}: permission denied ({describe_user()})")
            except OSError as err:
                problems.append(f"{graph}: {err.strerror or err}")
        return problems

    def poll_once(self) -> None:
        """Loads the versions the policy wants, then unloads the ones it no longer wants."""
        with self._poll_lock:
            wanted = self.policy.select(self.complete_versions())
            with self._lock:
                loaded = set(self._servables)
                failed = {v for v, s in self._states.items() if s.state == "END" and s.error_code != grpc.StatusCode.OK}
            for version in sorted(wanted - loaded - failed):
                self._load(version)
            with self._lock:
                available = set(self._servables)
            # Unload only when something wanted is available, so the model never disappears.
            if wanted & available:
                for version in sorted(available - wanted):
                    self._unload(version)

    def _load(self, version: int) -> None:
        """Loads and warms up one version, retrying failures like TF Serving; END with the error if all fail."""
        path = os.path.join(self.base_path, str(version))
        with self._lock:
            self._states[version] = VersionState("LOADING")
        attempts = 1 + self.max_load_retries
        for attempt in range(1, attempts + 1):
            try:
                servable, records, timing = self._load_once(version, path)
            except Exception as err:  # any failure marks the version failed; the server keeps serving the others
                error = err
                if attempt < attempts and not self._stop.is_set():
                    logger.warning(
                        "loading %s version %d failed (attempt %d of %d), retrying in %.1f s: %s",
                        self.model_name, version, attempt, attempts, self.load_retry_interval_s, err,
                    )  # fmt: skip
                    if not self._stop.wait(self.load_retry_interval_s):
                        continue
                break
            with self._lock:
                self._servables[version] = servable
                self._states[version] = VersionState("AVAILABLE")
            logger.info(
                "%s version %d is available (load %.1f s, %d warmup records in %.1f s)",
                self.model_name, version, timing[0], records, timing[1],
            )  # fmt: skip
            return
        logger.error("failed to load %s version %d from %s: %s", self.model_name, version, path, error)
        with self._lock:
            self._states[version] = VersionState("END", grpc.StatusCode.UNKNOWN, f"failed to load: {error}")

    def _load_once(self, version: int, path: str) -> tuple[Servable, int, tuple[float, float]]:
        logger.info("loading %s version %d from %s", self.model_name, version, path)
        t0 = time.monotonic()
        with progress(f"still loading {self.model_name} version {version}"):
            servable = Servable(self.model_name, version, path, self.max_tensor_bytes)
        t1 = time.monotonic()
        records = 0
        if self.warmup:
            logger.info("warming up %s version %d", self.model_name, version)
            with progress(f"still warming up {self.model_name} version {version}"):
                records = servable.warmup()
        return servable, records, (t1 - t0, time.monotonic() - t1)

    def _unload(self, version: int) -> None:
        with self._lock:
            self._servables.pop(version, None)
            # In-flight requests hold their own reference, so they finish on the old version.
            self._states[version] = VersionState("END")
        logger.info("unloaded %s version %d", self.model_name, version)

    def start_polling(self, poll_seconds: float) -> None:
        """Polls the base path every ``poll_seconds`` in a daemon thread (<= 0: never)."""
        if poll_seconds <= 0:
            return

        def loop():
            while not self._stop.wait(poll_seconds):
                try:
                    self.poll_once()
                except Exception:  # a bad directory must not kill the poller
                    logger.exception("polling %s failed", self.base_path)

        self._thread = threading.Thread(target=loop, name="dolg-serve-poll", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stops polling; waits for a load in progress (it cannot be interrupted inside TensorFlow)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            if self._thread.is_alive():
                logger.info("waiting for the version load in progress to finish")
                self._thread.join()

    def wait_until_available(self, timeout_s: float | None = None, poll_seconds: float = 1.0) -> None:
        """Blocks until a version is available (TF Serving also waits before opening its ports)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        said: set[str] = set()
        while True:
            self.poll_once()
            if self.available_versions():
                return
            problems = self.unreadable_versions()
            if deadline is not None and time.monotonic() > deadline:
                why = f": {'; '.join(problems)}" if problems else ""
                raise ServingError(
                    f"no loadable version of {self.model_name} under {self.base_path} after {timeout_s} s{why}"
                )
            for problem in problems:  # say each once
                if problem not in said:
                    logger.warning("cannot read a version of %s: %s; waiting", self.model_name, problem)
            if "waiting" not in said:
                logger.warning("no servable version of %s under %s yet; waiting", self.model_name, self.base_path)
            said.update(problems, ["waiting"])
            if self._stop.wait(poll_seconds):
                raise ServingError("stopped while waiting for a version")

    # --- lookup -----------------------------------------------------------------------
    def available_versions(self) -> list[int]:
        with self._lock:
            return sorted(self._servables)

    def _requested_version(self, name: str, version: int | None, label: str | None) -> int | None:
        """Checks the model name and turns a label into its version (None: the latest)."""
        if name != self.model_name:
            raise not_found(f"Servable not found for request: model {name!r} (this server serves {self.model_name!r})")
        if version is not None and label:
            raise invalid_argument(
                f"Both model version ({version}) and model version label ({label}) cannot be supplied."
            )
        if label:
            if label not in self.labels:
                raise not_found(f"Unrecognized servable version label: {label!r} of model {name}")
            return self.labels[label]
        return version

    def resolve(self, name: str, version: int | None = None, label: str | None = None) -> Servable:
        """Finds the servable a ``model_spec`` names: a version, a label, or (neither) the latest.

        Raises:
            RequestError: NOT_FOUND for an unknown model, version or label;
                INVALID_ARGUMENT when both a version and a label are given.
        """
        version = self._requested_version(name, version, label)
        with self._lock:
            if version is None:
                if not self._servables:
                    raise RequestError(grpc.StatusCode.UNAVAILABLE, f"no version of {name} is available")
                return self._servables[max(self._servables)]
            servable = self._servables.get(version)
        if servable is None:
            raise not_found(f"Servable not found for request: Specific({name}, {version})")
        return servable

    def resolve_spec(self, model_spec) -> Servable:
        """:meth:`resolve` for a ``tensorflow.serving.ModelSpec``."""
        version = model_spec.version.value if model_spec.HasField("version") else None
        label = model_spec.version_label if model_spec.WhichOneof("version_choice") == "version_label" else None
        return self.resolve(model_spec.name, version, label)

    def version_states(
        self, name: str, version: int | None = None, label: str | None = None
    ) -> dict[int, VersionState]:
        """The states ``GetModelStatus`` reports (all versions when neither version nor label is given)."""
        version = self._requested_version(name, version, label)
        with self._lock:
            states = dict(self._states)
        if version is None:
            return dict(sorted(states.items()))
        if version not in states:
            raise not_found(f"Could not find version {version} of model {name}")
        return {version: states[version]}
