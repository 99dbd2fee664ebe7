"""Serving overhead: the SavedModel in-process vs gRPC and REST to ``dolg serve``.

Exports a DOLG model (random weights: speed does not depend on them) with the
export's default options (image size, scales, resize policy), starts ``dolg
serve`` on loopback, and measures, for each batch size and number of
concurrent clients, throughput (images/s) and per-request latency p50 / p99 of

  (a) ``serving_default`` of the SavedModel called in this process,
  (b) gRPC ``Predict`` to ``dolg serve`` (raw tensorflow-serving-api stub),
  (c) REST ``:predict`` to ``dolg serve`` (row format, base64 JPEG).

Each client sends ``--requests`` requests of ``batch`` JPEG photographs (the
built-in demo photos, 640 px on the longer side, so the in-graph decode and
resize run too). Modes are interleaved per cell, each after one warm-up
request, and ``--repeats`` rounds are run; the median round is reported. With
few requests, p99 is close to the slowest request.
(b)/(a) of throughput is the serving overhead (1.0 = none).

    python benchmarks/serving.py --preset resnet101 --batches 1,8 --clients 1,8
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import statistics
import sys
import tempfile
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")
from _common import jpeg_photos


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="resnet101", choices=["tiny", "resnet50", "resnet101"])
    parser.add_argument("--image-size", type=int, default=None, help="export image size (default: the export's)")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--clients", default="1,8")
    parser.add_argument("--requests", type=int, default=2, help="requests per client per round")
    parser.add_argument("--repeats", type=int, default=1, help="rounds; the median is reported")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    client_counts = [int(c) for c in args.clients.split(",")]

    import grpc
    import keras
    import numpy as np
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    from dolg_tf.export import ExportConfig, export_saved_model
    from dolg_tf.model import build_dolg
    from dolg_tf.server.process import ServerProcess

    keras.utils.set_random_seed(0)
    options = {} if args.image_size is None else {"image_size": args.image_size}
    export_config = ExportConfig(**options)
    tmp = tempfile.mkdtemp(prefix="dolg_serving_bench_")
    t0 = time.perf_counter()
    path = export_saved_model(build_dolg(args.preset), os.path.join(tmp, "dolg"), version=1, **options)
    export_s = time.perf_counter() - t0
    images = jpeg_photos(max(batches), longer=640)
    saved = tf.saved_model.load(path).signatures["serving_default"]
    server = ServerProcess(os.path.join(tmp, "dolg"), extra=["--poll-seconds", "0"], timeout=600).start()
    ports = server.info

    def batch_of(b: int) -> list[bytes]:
        return [images[i % len(images)] for i in range(b)]

    def make_inprocess(b):
        tensor = tf.constant(batch_of(b))
        return lambda: saved(images=tensor)["embedding"].numpy()

    def make_grpc(b):
        channel = grpc.insecure_channel(
            f"127.0.0.1:{ports['grpc_port']}", options=[("grpc.max_receive_message_length", 64 << 20)]
        )
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "dolg"
        request.inputs["images"].CopyFrom(tf.make_tensor_proto(batch_of(b), dtype=tf.string))
        return lambda: tf.make_ndarray(stub.Predict(request, timeout=600).outputs["embedding"])

    def make_rest(b):
        conn = http.client.HTTPConnection("127.0.0.1", ports["rest_port"], timeout=600)
        body = json.dumps({"instances": [{"b64": base64.b64encode(x).decode()} for x in batch_of(b)]})

        def call():
            conn.request("POST", "/v1/models/dolg:predict", body=body, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            payload = response.read()
            if response.status != 200:
                raise RuntimeError(payload[:200])
            return np.asarray(json.loads(payload)["predictions"], np.float32)

        return call

    modes = {"a_inprocess": make_inprocess, "b_grpc": make_grpc, "c_rest": make_rest}
    # Correctness first: the three paths give the same embeddings.
    reference = make_inprocess(2)()
    agreement = {
        name: float(np.abs(make(2)() - reference).max()) for name, make in modes.items() if name != "a_inprocess"
    }

    def run_cell(make, b: int, clients: int) -> dict:
        calls = [make(b) for _ in range(clients)]
        calls[0]()  # warm-up (connection, first-call setup); shapes never retrace: the input is [-1] strings
        latencies: list[float] = []
        lock = threading.Lock()

        def client(call):
            for _ in range(args.requests):
                t = time.perf_counter()
                call()
                with lock:
                    latencies.append(time.perf_counter() - t)

        threads = [threading.Thread(target=client, args=(c,)) for c in calls]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        return {
            "images_per_s": b * len(latencies) / wall,
            "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * _percentile(latencies, 99),
            "requests": len(latencies),
        }

    cells = []
    try:
        for b in batches:
            for clients in client_counts:
                rounds = {name: [] for name in modes}
                for _ in range(args.repeats):
                    for name, make in modes.items():  # interleaved
                        rounds[name].append(run_cell(make, b, clients))
                for name, results in rounds.items():
                    median = sorted(results, key=lambda r: r["images_per_s"])[len(results) // 2]
                    cells.append(
                        {"mode": name, "batch": b, "clients": clients, **{k: round(v, 2) for k, v in median.items()}}
                    )
                base = next(
                    c for c in cells if c["mode"] == "a_inprocess" and c["batch"] == b and c["clients"] == clients
                )
                for c in cells[-3:]:
                    c["throughput_vs_inprocess"] = round(c["images_per_s"] / base["images_per_s"], 3)
                print(json.dumps(cells[-3:]), file=sys.stderr, flush=True)
    finally:
        server.stop()

    result = {
        "benchmark": "serving",
        "preset": args.preset,
        "image_size": export_config.image_size,
        "resize": export_config.resize,
        "scales": list(export_config.scales),
        "input": "JPEG, 640 px longer side",
        "cpu_count": os.cpu_count(),
        "tensorflow": tf.__version__,
        "export_s": round(export_s, 1),
        "requests_per_client": args.requests,
        "repeats": args.repeats,
        "max_abs_diff_vs_inprocess": agreement,
        "cells": cells,
    }
    print(json.dumps(result))
    for c in cells:
        print(
            f"{c['mode']:12s} batch {c['batch']} x {c['clients']} clients: {c['images_per_s']:8.2f} img/s  "
            f"p50 {c['p50_ms']:9.1f} ms  p99 {c['p99_ms']:9.1f} ms  ({c['throughput_vs_inprocess']:.3f} of in-process)"
        )


if __name__ == "__main__":
    main()
