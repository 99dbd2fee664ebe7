"""Argument types (each raises ``argparse.ArgumentTypeError``) and the client flags shared by ``dolg`` subcommands."""

from __future__ import annotations

import argparse
import glob
import os
import re
import sys
import tempfile
from collections.abc import Callable

from dolg_tf.export.contract import DEFAULT_SIGNATURE


def _number(text: str, cast: Callable[[str], float], ok: Callable[[float], bool], expected: str):
    try:
        value = cast(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from err
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, lambda v: v > 0, "a positive integer")


def non_negative_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 0, "an integer >= 0")


def non_negative_float(text: str) -> float:
    return _number(text, float, lambda v: v >= 0, "a number >= 0")


def positive_float(text: str) -> float:
    return _number(text, float, lambda v: v > 0, "a positive number")


def _positive_list(text: str, cast, what: str) -> tuple:
    try:
        values = tuple(cast(v) for v in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{what} must be comma-separated numbers, got {text!r}") from err
    if not values or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"{what} must be positive, got {text!r}")
    return values


def parse_scales(text: str) -> tuple[float, ...]:
    """``"0.7071,1,1.4142"`` -> positive floats."""
    return _positive_list(text, float, "scales")


def parse_kappas(text: str) -> tuple[int, ...]:
    """``"1,5,10"`` -> positive ints."""
    return _positive_list(text, int, "kappas")


# --------------------------------------------------------------------------- TF Serving client flags
def add_client_arguments(parser: argparse.ArgumentParser, *, server_flag: bool = True) -> None:
    """Adds the flags of a :class:`dolg_tf.client.Client`: server, protocol, model, TLS, timeouts, retries.

    ``dolg embed`` and ``dolg evaluate`` share them through this function, so both
    commands take the same flags with the same defaults; :func:`client_options_from_args`
    turns them into a :class:`dolg_tf.client.ClientOptions`. ``server_flag=False``
    leaves ``--server`` out (a command that adds it itself, e.g. to a group).
    """
    if server_flag:
        parser.add_argument(
            "--server",
            default=None,
            metavar="HOST:PORT",
            help="TF Serving / dolg serve address (default: localhost:8500 for gRPC, "
            "localhost:8501 for REST; ':8501' means localhost)",
        )
    parser.add_argument(
        "--protocol",
        choices=("grpc", "rest"),
        default="grpc",
        help="grpc (port 8500) or rest (port 8501) (default: grpc)",
    )
    parser.add_argument("--model-name", default="dolg", help="served model name (default: dolg)")
    parser.add_argument("--signature", default=DEFAULT_SIGNATURE, help=f"signature name (default: {DEFAULT_SIGNATURE})")
    version = parser.add_mutually_exclusive_group()
    version.add_argument("--version", type=int, default=None, help="model version (default: the latest served)")
    version.add_argument("--version-label", default=None, help="model version label, e.g. stable")
    group = parser.add_argument_group("client: timeouts and retries")
    group.add_argument("--timeout", type=positive_float, default=60.0, help="seconds per request attempt (default: 60)")
    group.add_argument(
        "--deadline", type=positive_float, default=120.0, help="seconds per request, retries included (default: 120)"
    )
    group.add_argument(
        "--retries",
        type=non_negative_int,
        default=10,
        help="retries of an unavailable / timed-out request once the server has answered (default: 10)",
    )
    group.add_argument(
        "--wait-for-server",
        type=non_negative_float,
        default=0.0,
        metavar="SECONDS",
        help="keep retrying this long while no server listens yet (default: 0, report at once)",
    )
    group.add_argument(
        "--max-message-bytes", type=positive_int, default=32 << 20, help="largest request (default: 32 MiB)"
    )
    tls = parser.add_argument_group("client: TLS")
    tls.add_argument("--tls", action="store_true", help="connect with TLS (implied by the certificate flags)")
    tls.add_argument("--root-certificates", default=None, metavar="PEM", help="CA bundle (PEM) for TLS")
    tls.add_argument(
        "--client-certificate", default=None, metavar="PEM", help="client certificate (PEM) for mutual TLS"
    )
    tls.add_argument("--client-key", default=None, metavar="PEM", help="client private key (PEM) for mutual TLS")
    tls.add_argument(
        "--server-name",
        default=None,
        metavar="NAME",
        help="gRPC: name to check in the server's certificate (for an IP address or a tunnel)",
    )


def client_options_from_args(args: argparse.Namespace, **options):
    """The :class:`dolg_tf.client.ClientOptions` of the flags of :func:`add_client_arguments`.

    ``options`` are further ``ClientOptions`` fields (``batch_size``, ``progress``...).

    Raises:
        ConfigError: a value the options refuse.
    """
    from dolg_tf.client import ClientOptions

    return ClientOptions(
        timeout=args.timeout, deadline=args.deadline, retries=args.retries, wait_for_server=args.wait_for_server,
        max_message_bytes=args.max_message_bytes, tls=args.tls, root_certificates=args.root_certificates,
        client_certificate=args.client_certificate, client_key=args.client_key, server_name=args.server_name,
        **options,
    )  # fmt: skip


def client_from_args(args: argparse.Namespace, *, saved_model: str | None = None, **options):
    """A :class:`dolg_tf.client.Client` from the flags of :func:`add_client_arguments`.

    With ``saved_model`` the model runs in this process (no server; the network
    flags have no effect). ``options`` are further ``ClientOptions`` fields
    (``batch_size``...).
    """
    from dolg_tf.client import Client

    model = dict(
        model_name=args.model_name,
        signature_name=args.signature,
        version=args.version,
        version_label=args.version_label,
        options=client_options_from_args(args, **options),
    )
    if saved_model:
        return Client(saved_model, protocol="saved_model", **model)
    return Client(args.server, protocol=args.protocol, **model)


# --------------------------------------------------------------------------- TensorFlow start-up
# What TensorFlow prints when it looks for CUDA on a machine that has no NVIDIA driver at all.
_NO_GPU_NOISE = re.compile(rb"failed call to cuInit|Could not find cuda drivers on your machine")


def has_nvidia_driver() -> bool:
    """True when an NVIDIA kernel driver is loaded (then a CUDA error is worth seeing)."""
    return os.path.exists("/proc/driver/nvidia") or bool(glob.glob("/dev/nvidia[0-9]*"))


def import_tensorflow_quietly(start: Callable[[], object] | None = None) -> None:
    """Imports TensorFlow and finds its devices, without the CUDA-init error line on machines with no GPU.

    On a machine without an NVIDIA driver, TensorFlow's CUDA build logs
    ``failed call to cuInit: ... (303)`` at ERROR level, which
    ``TF_CPP_MIN_LOG_LEVEL`` cannot hide without hiding every other error.
    Here the process's standard error (file descriptor 2, where TensorFlow's
    C++ logging writes) goes to a temporary file while TensorFlow starts;
    afterwards everything it holds is written back except those lines. With a
    driver present (a CUDA failure is then real) nothing is filtered.

    Args:
        start: what to run while capturing (default: import TensorFlow and list
            its physical devices, which is when CUDA is initialised).
    """
    if start is None:
        if "tensorflow" in sys.modules:
            return

        def start():
            import tensorflow as tf

            tf.config.list_physical_devices()

    if has_nvidia_driver():
        start()
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as captured:
            os.dup2(captured.fileno(), 2)
            try:
                start()
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                captured.seek(0)
                for line in captured.read().splitlines(keepends=True):
                    if not _NO_GPU_NOISE.search(line):
                        os.write(2, line)
    finally:
        os.close(saved)
