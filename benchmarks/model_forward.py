"""Build time and forward time of a DOLG preset on this machine.

Measures, in one process: model build time, and the single-scale forward
latency inside a ``tf.function`` at the given size for each batch size,
interleaved round-robin after warm-up, median of the repeats. Prints one JSON
line and one human line.

    python benchmarks/model_forward.py --preset resnet101 --size 512 --batches 1,8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="resnet101")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    import numpy as np
    import tensorflow as tf

    from dolg_tf.model import build_dolg

    t0 = time.perf_counter()
    model = build_dolg(args.preset)
    build_s = time.perf_counter() - t0
    fn = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    inputs = {
        b: tf.constant(np.random.default_rng(0).uniform(0, 255, (b, args.size, args.size, 3)), tf.float32)
        for b in batches
    }
    for b in batches:  # warm-up (trace + first run)
        fn(inputs[b]).numpy()
    times: dict[int, list[float]] = {b: [] for b in batches}
    for _ in range(args.repeats):
        for b in batches:
            t0 = time.perf_counter()
            fn(inputs[b]).numpy()
            times[b].append(time.perf_counter() - t0)
    result = {
        "benchmark": "model_forward",
        "preset": args.preset,
        "size": args.size,
        "build_s": round(build_s, 2),
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "forward": {
            str(b): {
                "median_s": round(statistics.median(t), 4),
                "images_per_s": round(b / statistics.median(t), 2),
            }
            for b, t in times.items()
        },
    }
    print(json.dumps(result))
    parts = ", ".join(
        f"batch {b}: {result['forward'][str(b)]['median_s']:.3f} s ({result['forward'][str(b)]['images_per_s']} img/s)"
        for b in batches
    )
    print(f"{args.preset} {args.size}x{args.size}: build {build_s:.2f} s; forward {parts}")


if __name__ == "__main__":
    main()
