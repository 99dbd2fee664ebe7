"""``dolg serve``: serve a SavedModel base path over TF Serving's gRPC and REST protocols.

Production uses the TF Serving container (``serving/``); this is the local
stand-in. When both servers listen it prints one JSON line on stdout, e.g.
``{"grpc_port": 8500, "rest_port": 8501, "model_name": "dolg", "versions": [1]}``,
so scripts (and the tests) can start it with ``--port 0 --rest-api-port 0``
and read the ports it bound. SIGTERM or SIGINT stops it cleanly (exit 0):
new requests are refused at once (gRPC UNAVAILABLE, REST 503 with
``Connection: close``), requests in progress get --shutdown-grace-seconds to
finish. Wiring mistakes (a busy port, a version directory given as the base
path, a version label for a version that is not available) end it with one
line on stderr and exit code 2. Flags named after ``tensorflow_model_server``'s
accept its underscore spelling too (``--max_num_load_retries``).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading

from dolg_tf.cli._common import import_tensorflow_quietly, non_negative_float, positive_int


def _preflight(args: argparse.Namespace) -> None:
    """Checks that need no TensorFlow, so a wiring mistake is reported in well under a second."""
    from dolg_tf.server.preflight import (
        VersionPolicy,
        check_base_path,
        check_port_free,
        check_port_number,
        parse_version_labels,
    )

    VersionPolicy.parse(args.version_policy)
    parse_version_labels(args.version_labels)
    check_port_number("port", args.port)
    check_port_number("rest_api_port", args.rest_api_port, allow_disabled=True)
    check_base_path(args.model_base_path)
    check_port_free("gRPC", args.host, args.port, "--port")
    if args.rest_api_port > 0:
        check_port_free("REST", args.host, args.rest_api_port, "--rest-api-port")


def _cmd_serve(args: argparse.Namespace) -> int:
    _preflight(args)
    # Loading and warming up take tens of seconds for a real model: say so without -v.
    logging.getLogger("dolg_tf.server").setLevel(min(logging.INFO, logging.getLogger().getEffectiveLevel()))
    import_tensorflow_quietly()

    import tensorflow as tf

    # Thread pools must be sized before TensorFlow runs its first op.
    if args.tensorflow_intra_op_parallelism:
        tf.config.threading.set_intra_op_parallelism_threads(args.tensorflow_intra_op_parallelism)
    if args.tensorflow_inter_op_parallelism:
        tf.config.threading.set_inter_op_parallelism_threads(args.tensorflow_inter_op_parallelism)

    from dolg_tf.server import DolgServer, ServeOptions, VersionPolicy, parse_version_labels

    options = ServeOptions(
        model_base_path=args.model_base_path,
        model_name=args.model_name,
        host=args.host,
        port=args.port,
        rest_api_port=args.rest_api_port,
        poll_seconds=args.poll_seconds,
        version_policy=VersionPolicy.parse(args.version_policy),
        version_labels=parse_version_labels(args.version_labels),
        max_message_bytes=args.max_message_bytes,
        workers=args.workers,
        warmup=not args.no_warmup,
        wait_for_model_s=args.wait_for_model_seconds,
        max_load_retries=args.max_num_load_retries,
        load_retry_interval_s=args.load_retry_interval_micros / 1e6,
        allow_version_labels_for_unavailable_models=args.allow_version_labels_for_unavailable_models,
        rest_max_connections=args.rest_api_max_connections,
        shutdown_grace_s=args.shutdown_grace_seconds,
    )
    stop = threading.Event()
    # Installed before loading (a SIGTERM while loading must still stop cleanly) and restored after.
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _serve_until_stopped(DolgServer(options), options, stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _serve_until_stopped(server, options, stop: threading.Event) -> int:
    # Start in a thread: waiting for a first version can take long (or forever), and a
    # signal must still end the process cleanly.
    failure: list[BaseException] = []

    def start():
        try:
            server.start()
        except BaseException as err:  # re-raised in the main thread
            failure.append(err)

    starting = threading.Thread(target=start, name="dolg-serve-start", daemon=True)
    starting.start()
    while starting.is_alive() and not stop.wait(0.2):
        pass
    if starting.is_alive():  # stopped while the first version was still loading
        server.manager.stop()
        # The load in progress cannot be interrupted; it must not be inside TensorFlow at exit.
        starting.join()
        server.stop()
        print(json.dumps({"stopped": True}), flush=True)
        return 0
    if failure:
        server.stop()
        raise failure[0]
    print(
        json.dumps(
            {
                "grpc_port": server.grpc_port,
                "rest_port": server.rest_port,
                "model_name": options.model_name,
                "versions": server.manager.available_versions(),
            }
        ),
        flush=True,
    )
    try:
        stop.wait()
    finally:
        server.stop()
    print(json.dumps({"stopped": True}), flush=True)
    return 0


def register(sub) -> None:
    serve = sub.add_parser(
        "serve",
        help="serve a SavedModel over TF Serving's gRPC and REST APIs (local stand-in for TF Serving)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument(
        "--model-base-path", required=True, help="directory of integer-named versions (saved_models/dolg)"
    )
    serve.add_argument("--model-name", default="dolg", help="model name clients address (default: dolg)")
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1, loopback only)")
    serve.add_argument("--port", type=int, default=8500, help="gRPC port; 0 picks a free one (default: 8500)")
    serve.add_argument(
        "--rest-api-port",
        type=int,
        default=8501,
        help="REST port; 0 picks a free one, -1 disables REST (default: 8501)",
    )
    serve.add_argument(
        "--poll-seconds", type=float, default=1.0, help="look for new versions this often; <= 0: never (default: 1)"
    )
    serve.add_argument(
        "--version-policy", default="latest", help="latest, latest:N, all or specific:V1,V2 (default: latest)"
    )
    serve.add_argument("--version-labels", default="", help="labels, e.g. stable=1,canary=2")
    serve.add_argument(
        "--max-message-bytes", type=int, default=64 << 20, help="largest gRPC message / REST body (default: 64 MiB)"
    )
    serve.add_argument("--workers", type=int, default=16, help="gRPC worker threads (default: 16)")
    serve.add_argument("--no-warmup", action="store_true", help="do not replay assets.extra/tf_serving_warmup_requests")
    serve.add_argument(
        "--wait-for-model-seconds",
        type=float,
        default=None,
        help="fail if no version loads in this time (default: wait)",
    )
    serve.add_argument(
        "--tensorflow-intra-op-parallelism", type=int, default=0, help="TF intra-op threads (0: TF default)"
    )
    serve.add_argument(
        "--tensorflow-inter-op-parallelism", type=int, default=0, help="TF inter-op threads (0: TF default)"
    )
    serve.add_argument(
        "--max_num_load_retries", "--max-num-load-retries", dest="max_num_load_retries", type=_non_negative_int,
        metavar="N", default=5,
        help="retries of a failed version load before it is given up, as in TF Serving (default: 5)",
    )  # fmt: skip
    serve.add_argument(
        "--load_retry_interval_micros", "--load-retry-interval-micros", dest="load_retry_interval_micros",
        type=_non_negative_int, default=60_000_000, metavar="MICROS",
        help="microseconds between load retries, as in TF Serving (default: 60000000, one minute)",
    )  # fmt: skip
    serve.add_argument(
        "--allow_version_labels_for_unavailable_models", "--allow-version-labels-for-unavailable-models",
        dest="allow_version_labels_for_unavailable_models", type=_boolean, nargs="?", const=True, default=False,
        metavar="BOOL",
        help="accept a version label whose version is not available at start-up (TF Serving's flag; default: refuse)",
    )  # fmt: skip
    serve.add_argument(
        "--rest_api_max_connections", "--rest-api-max-connections", dest="rest_api_max_connections",
        type=positive_int, default=256, metavar="N",
        help="concurrent REST connections; more are answered 503 and closed (default: 256)",
    )  # fmt: skip
    serve.add_argument(
        "--shutdown-grace-seconds", "--shutdown_grace_seconds", dest="shutdown_grace_seconds", type=non_negative_float,
        default=10.0, metavar="SECONDS",
        help="on SIGTERM, how long requests in progress may run before their connections close (default: 10)",
    )  # fmt: skip
    serve.set_defaults(func=_cmd_serve)


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _boolean(text: str) -> bool:
    """TF Serving's flag values: true/false (also 1/0, yes/no)."""
    value = text.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
