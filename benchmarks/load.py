"""Load harness for ``dolg serve`` (or TF Serving): N clients x M requests over gRPC and REST.

For each batch size, gRPC and REST cells run back to back (interleaved, after
one warm-up request per client), each with ``--clients`` concurrent clients
sending ``--requests`` requests of ``batch`` JPEG photographs (the built-in
demo photos at ``--photo-size`` px on the longer side). Each cell reports
throughput (images/s and requests/s), latency p50 / p99 / max, errors by kind
(gRPC status names, HTTP statuses, exception types) and, when the server's
process is known, its resident memory (VmRSS) before and after. The whole run
is bounded: a cell stops at ``--max-seconds`` even if requests remain.

Without ``--address`` it exports a model (``--preset``, random weights: speed
does not depend on them) or serves ``--model-base-path``, starts ``dolg serve``
on loopback ports and stops it at the end. With ``--address`` it loads a
server that is already running (``--server-pid`` adds its RSS).

    python benchmarks/load.py --preset tiny --image-size 64 --clients 8 --requests 50
    python benchmarks/load.py --address 127.0.0.1 --grpc-port 8500 --rest-port 8501 --server-pid 1234
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from functools import partial

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")
from _common import cpu_model, jpeg_photos, rss_bytes


def _rss_mb(pid: int | None) -> float | None:
    rss = rss_bytes(pid) if pid is not None else None
    return None if rss is None else round(rss / 2**20, 1)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


class _GrpcClient:
    def __init__(self, host: str, port: int, model: str, images: list[bytes]):
        import grpc
        import numpy as np
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

        self.grpc = grpc
        self.channel = grpc.insecure_channel(
            f"{host}:{port}",
            options=[("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)],
        )
        self.stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.request = predict_pb2.PredictRequest()
        self.request.model_spec.name = model
        self.request.inputs["images"].CopyFrom(tf.make_tensor_proto(np.array(images, dtype=object), dtype=tf.string))

    def call(self, timeout: float) -> str | None:
        try:
            self.stub.Predict(self.request, timeout=timeout)
            return None
        except self.grpc.RpcError as err:
            return f"grpc {err.code().name}"

    def close(self) -> None:
        self.channel.close()


class _RestClient:
    def __init__(self, host: str, port: int, model: str, images: list[bytes]):
        self.host, self.port, self.path = host, port, f"/v1/models/{model}:predict"
        self.body = json.dumps({"instances": [{"b64": base64.b64encode(b).decode("ascii")} for b in images]}).encode()
        self.conn: http.client.HTTPConnection | None = None

    def call(self, timeout: float) -> str | None:
        try:
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
            self.conn.request("POST", self.path, body=self.body, headers={"Content-Type": "application/json"})
            response = self.conn.getresponse()
            response.read()
            if (response.getheader("Connection") or "").lower() == "close":
                self.close()
            return None if response.status == 200 else f"HTTP {response.status}"
        except (OSError, http.client.HTTPException) as err:
            self.close()
            return type(err).__name__

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def run_cell(make_client, clients: int, requests: int, batch: int, max_seconds: float, timeout: float, pid) -> dict:
    """``clients`` threads x ``requests`` requests; returns the cell's figures."""
    pool = [make_client() for _ in range(clients)]
    for client in pool:  # warm-up: one request per client (connections, graph caches)
        client.call(timeout)
    latencies: list[float] = []
    errors: Counter = Counter()
    lock = threading.Lock()
    rss_before = _rss_mb(pid)
    deadline = time.monotonic() + max_seconds

    def work(client):
        for _ in range(requests):
            if time.monotonic() > deadline:
                with lock:
                    errors["not sent (time bound)"] += 1
                continue
            t0 = time.perf_counter()
            error = client.call(timeout)
            elapsed = time.perf_counter() - t0
            with lock:
                if error is None:
                    latencies.append(elapsed)
                else:
                    errors[error] += 1

    threads = [threading.Thread(target=work, args=(c,)) for c in pool]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    for client in pool:
        client.close()
    ok = len(latencies)
    return {
        "batch": batch,
        "clients": clients,
        "requests_ok": ok,
        "errors": dict(errors),
        "wall_s": round(wall, 2),
        "requests_per_s": round(ok / wall, 2),
        "images_per_s": round(ok * batch / wall, 2),
        "p50_ms": round(_percentile(latencies, 50) * 1e3, 1) if ok else None,
        "p99_ms": round(_percentile(latencies, 99) * 1e3, 1) if ok else None,
        "max_ms": round(max(latencies) * 1e3, 1) if ok else None,
        "rss_before_mb": rss_before,
        "rss_after_mb": _rss_mb(pid),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--address", default=None, help="host of a running server (default: start dolg serve on 127.0.0.1)"
    )
    parser.add_argument("--grpc-port", type=int, default=8500, help="gRPC port with --address (0: skip gRPC)")
    parser.add_argument("--rest-port", type=int, default=8501, help="REST port with --address (0: skip REST)")
    parser.add_argument("--server-pid", type=int, default=None, help="pid of the --address server, for its RSS")
    parser.add_argument("--model-name", default="dolg")
    parser.add_argument("--model-base-path", default=None, help="serve this export instead of exporting one")
    parser.add_argument("--preset", default="tiny", help="model preset to export (default: tiny)")
    parser.add_argument("--image-size", type=int, default=64, help="export image size (default: 64)")
    parser.add_argument("--scales", default="1.0", help="export scales (default: 1.0)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=50, help="requests per client and cell")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--protocols", default="grpc,rest")
    parser.add_argument("--photo-size", type=int, default=224, help="longer side of the JPEGs sent (default: 224)")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="time bound of one cell (default: 120)")
    parser.add_argument("--timeout", type=float, default=60.0, help="per-request timeout (default: 60)")
    parser.add_argument("--serve-args", default="", help="extra dolg serve flags, space-separated")
    args = parser.parse_args(argv)
    if not (1 <= args.clients <= 256 and 1 <= args.requests <= 100_000):
        parser.error("--clients must lie in [1, 256] and --requests in [1, 100000]")
    batches = [int(b) for b in args.batches.split(",")]
    protocols = [p for p in args.protocols.split(",") if p]
    if any(p not in ("grpc", "rest") for p in protocols):
        parser.error(f"--protocols takes grpc and/or rest, got {args.protocols!r}")

    tmp = server = None
    t_start = time.perf_counter()
    try:
        if args.address is None:
            base = args.model_base_path
            if base is None:
                import keras

                from dolg_tf.export import export_saved_model
                from dolg_tf.model import build_dolg

                tmp = tempfile.mkdtemp(prefix="dolg-load-")
                base = os.path.join(tmp, "dolg")
                keras.utils.set_random_seed(0)
                scales = tuple(float(s) for s in args.scales.split(","))
                export_saved_model(
                    build_dolg(args.preset), base, version=1, image_size=args.image_size, scales=scales,
                    max_batch_size=max(32, max(batches)),
                )  # fmt: skip
            from dolg_tf.server.process import ServerProcess

            server = ServerProcess(
                base, model_name=args.model_name, extra=["--poll-seconds", "0", *args.serve_args.split()], timeout=600
            ).start()
            ready = server.info
            host, ports, pid = "127.0.0.1", {"grpc": ready["grpc_port"], "rest": ready["rest_port"]}, server.pid
        else:
            host, ports, pid = args.address, {"grpc": args.grpc_port, "rest": args.rest_port}, args.server_pid
        photos = jpeg_photos(max(batches), args.photo_size)
        rss_start = _rss_mb(pid)
        cells = []
        for batch in batches:
            images = (photos * batch)[:batch]
            for protocol in protocols:  # interleaved per batch size
                if not ports[protocol]:
                    continue
                kind = _GrpcClient if protocol == "grpc" else _RestClient
                cell = run_cell(
                    partial(kind, host, ports[protocol], args.model_name, images),
                    args.clients, args.requests, batch, args.max_seconds, args.timeout, pid,
                )  # fmt: skip
                cells.append({"protocol": protocol, **cell})
        rss_end = _rss_mb(pid)
    finally:
        if server is not None:
            server.stop()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    ratios = {}
    for batch in batches:
        by = {c["protocol"]: c for c in cells if c["batch"] == batch}
        if "grpc" in by and "rest" in by and by["rest"]["images_per_s"]:
            ratios[f"grpc_over_rest_batch{batch}"] = round(by["grpc"]["images_per_s"] / by["rest"]["images_per_s"], 2)
    result = {
        "benchmark": "load",
        "server": "started" if args.address is None else f"{args.address}",
        "preset": args.preset if args.address is None and args.model_base_path is None else None,
        "image_size": args.image_size if args.address is None and args.model_base_path is None else None,
        "clients": args.clients,
        "requests_per_client": args.requests,
        "photo_size": args.photo_size,
        "cells": cells,
        "throughput_ratios": ratios,
        "server_rss_mb": {"start": rss_start, "end": rss_end},
        "total_errors": sum(sum(c["errors"].values()) for c in cells),
        "wall_s": round(time.perf_counter() - t_start, 1),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
    }
    print(json.dumps(result), flush=True)
    for c in cells:
        print(
            f"{c['protocol']:4s} batch {c['batch']}: {c['images_per_s']:.1f} img/s ({c['requests_per_s']:.1f} req/s), "
            f"p50 {c['p50_ms']} ms, p99 {c['p99_ms']} ms, max {c['max_ms']} ms, ok {c['requests_ok']}, "
            f"errors {c['errors'] or 0}, server RSS {c['rss_before_mb']} -> {c['rss_after_mb']} MB"
        )
    print(
        f"{args.clients} clients x {args.requests} requests per cell; ratios {ratios}; "
        f"cpu {result['cpu']} ({result['cores']} cores)"
    )
    return 1 if result["total_errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
