"""Batch-1 latency of the exported SavedModel under TensorFlow thread-pool settings.

The model (random weights) is exported once; then one process per setting
loads it with ``tf.config.threading`` intra-op / inter-op pool sizes set
before TensorFlow starts (0 = TensorFlow's default, one per core), warms up,
and waits. The parent then asks every process in turn for one timed
``embed_pixels`` call at batch 1, ``--repeats`` rounds, so the settings are
interleaved and share the machine's noise; medians and ratios to the default
are reported.

    python benchmarks/threads.py --preset resnet101 --size 512 --settings 0:0,1:1,2:1,1:2,2:2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")


def _worker(path: str, intra: int, inter: int, size: int) -> None:
    """Loads the SavedModel, then answers each line on stdin with one call's seconds."""
    import time

    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(intra)
    tf.config.threading.set_inter_op_parallelism_threads(inter)
    serve = tf.saved_model.load(path).signatures["embed_pixels"]
    pixels = tf.constant(np.random.default_rng(0).integers(0, 256, (1, size, size, 3), dtype=np.uint8))
    serve(pixels=pixels)["embedding"].numpy()
    serve(pixels=pixels)["embedding"].numpy()
    print("ready", flush=True)
    for _ in sys.stdin:
        t0 = time.perf_counter()
        serve(pixels=pixels)["embedding"].numpy()
        print(f"{time.perf_counter() - t0:.6f}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="resnet101")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--settings", default="0:0,1:1,2:1,1:2,2:2", help="intra:inter pairs (0 = default)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args.worker[0], int(args.worker[1]), int(args.worker[2]), int(args.worker[3]))
        return 0

    from _common import cpu_model

    settings = [tuple(int(v) for v in s.split(":")) for s in args.settings.split(",")]
    with tempfile.TemporaryDirectory(prefix="dolg_threads_") as tmp:
        export = (
            "from dolg_tf.export import export_saved_model; from dolg_tf.model import build_dolg; "
            f"print(export_saved_model(build_dolg({args.preset!r}), {os.path.join(tmp, 'sm')!r}, "
            f"scales=(1.0,), image_size={args.size}, warmup_batch_sizes=()))"
        )
        path = (
            subprocess.run([sys.executable, "-c", export], capture_output=True, text=True, check=True, cwd=ROOT)
            .stdout.strip()
            .splitlines()[-1]
        )
        workers = {}
        for intra, inter in settings:
            proc = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--worker", path, str(intra), str(inter), str(args.size)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            while proc.stdout.readline().strip() != "ready":
                if proc.poll() is not None:
                    raise RuntimeError(f"worker intra={intra} inter={inter} exited with {proc.returncode}")
            workers[(intra, inter)] = proc
        times: dict[tuple[int, int], list[float]] = {s: [] for s in settings}
        try:
            for _ in range(args.repeats):
                for setting, proc in workers.items():
                    proc.stdin.write("go\n")
                    proc.stdin.flush()
                    times[setting].append(float(proc.stdout.readline()))
        finally:
            for proc in workers.values():
                proc.stdin.close()
                proc.wait()
    base = statistics.median(times[settings[0]])
    rows = [
        {
            "intra": i,
            "inter": j,
            "median_s": round(statistics.median(t), 4),
            "speedup_vs_first": round(base / statistics.median(t), 3),
            "all_s": [round(x, 4) for x in t],
        }
        for (i, j), t in times.items()
    ]
    print(
        json.dumps(
            {
                "benchmark": "threads",
                "preset": args.preset,
                "size": args.size,
                "batch": 1,
                "cpu": cpu_model(),
                "cpus": os.cpu_count(),
                "results": rows,
            }
        )
    )
    for r in rows:
        print(f"intra {r['intra']} inter {r['inter']}: {r['median_s']} s ({r['speedup_vs_first']}x the first setting)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
