"""``dolg serve``: serve a SavedModel base path over TF Serving's gRPC and REST protocols.

Production uses the TF Serving container (``serving/``); this is the local
stand-in. When both servers listen it prints one JSON line on stdout, e.g.
``{"grpc_port": 8500, "rest_port": 8501, "model_name": "dolg", "versions": [1]}``,
so scripts (and the tests) can start it with ``--port 0 --rest-api-port 0``
and read the ports it bound. SIGTERM or SIGINT stops it cleanly (exit 0).
"""

from __future__ import annotations

import argparse
import json
import signal
import threading


def _cmd_serve(args: argparse.Namespace) -> int:
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
    serve.add_argument("--model-base-path", required=True, help="directory of integer-named versions (saved_models/dolg)")
    serve.add_argument("--model-name", default="dolg", help="model name clients address (default: dolg)")
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1, loopback only)")
    serve.add_argument("--port", type=int, default=8500, help="gRPC port; 0 picks a free one (default: 8500)")
    serve.add_argument(
        "--rest-api-port", type=int, default=8501, help="REST port; 0 picks a free one, -1 disables REST (default: 8501)"
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
        "--wait-for-model-seconds", type=float, default=None, help="fail if no version loads in this time (default: wait)"
    )
    serve.add_argument("--tensorflow-intra-op-parallelism", type=int, default=0, help="TF intra-op threads (0: TF default)")
    serve.add_argument("--tensorflow-inter-op-parallelism", type=int, default=0, help="TF inter-op threads (0: TF default)")
    serve.set_defaults(func=_cmd_serve)
