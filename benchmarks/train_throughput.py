"""Training throughput (images/s) of the DOLG training step, per image size and batch.

Each (size, batch) runs in its own process (so its peak memory is its own): the
model, ArcFace head and SGD optimizer are built under the default strategy
(``mirrored``: one CPU device, or all local GPUs), one step traces and warms up,
``--warmup`` more steps run untimed, then ``--steps`` steps are timed; the
median step time gives images/s. The input is one synthetic batch repeated, so
the figure is the step itself, not the JPEG pipeline.

"The largest batch that fits": the batch-8 run records the process's memory
after building (fixed cost) and at its peak; activation memory grows linearly
with the batch, so the largest power of two whose predicted peak stays under
``--memory-fraction`` of the memory available at start is measured too.

    python benchmarks/train_throughput.py                       # resnet101, 224 and 512, batch 8 + largest
    python benchmarks/train_throughput.py --sizes 224 --batches 8 --no-largest

Prints one JSON line per run and a final JSON summary, plus a human line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def child(preset: str, size: int, batch: int, steps: int, warmup: int, mixed_precision: str) -> dict:
    """Builds the training step and times it; returns the measurement."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    import tensorflow as tf

    from dolg_tf.training import run_config
    from dolg_tf.training.loop import TrainLoop

    config = run_config(preset, image_size=size, batch_size=batch, epochs=1, steps_per_epoch=1000,
                        warmup_epochs=0.0, export=False, eval_demo=False, progress=False,
                        mixed_precision=mixed_precision, model_dir=os.path.join("/tmp", f"dolg-bench-{os.getpid()}"))
    t0 = time.perf_counter()
    trainer = TrainLoop(config)
    build_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    images = tf.constant(rng.uniform(0, 255, (batch, size, size, 3)).astype(np.float32))
    labels = tf.constant(rng.integers(0, trainer.source.num_classes, batch).astype(np.int32))
    dataset = tf.data.Dataset.from_tensors((images, labels)).repeat()
    iterator = iter(trainer.strategy.experimental_distribute_dataset(dataset))
    step = trainer.make_train_step()
    fixed = _rss_bytes()
    t0 = time.perf_counter()
    float(step(iterator)[0])
    first_s = time.perf_counter() - t0
    for _ in range(warmup):
        float(step(iterator)[0])
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        float(step(iterator)[0])
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    median = statistics.median(times)
    return {
        "preset": preset,
        "image_size": size,
        "batch": batch,
        "replicas": trainer.replicas,
        "device": "GPU" if tf.config.list_physical_devices("GPU") else "CPU",
        "mixed_precision": mixed_precision,
        "steps_timed": steps,
        "step_s_median": round(median, 3),
        "step_s_all": [round(t, 3) for t in times],
        "images_per_s": round(batch / median, 2),
        "first_step_s": round(first_s, 1),
        "build_s": round(build_s, 1),
        "fixed_memory_gb": round(fixed / 2**30, 2),
        "peak_memory_gb": round(peak / 2**30, 2),
        "head_classes": int(trainer.source.num_classes),
    }


def _run_child(args, size: int, batch: int) -> dict | None:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", str(size), str(batch), "--preset", args.preset,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--mixed-precision", args.mixed_precision]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        print(json.dumps({"image_size": size, "batch": batch, "error": proc.stderr.strip().splitlines()[-1:]}))
        return None
    print(lines[-1], flush=True)
    return json.loads(lines[-1])


def largest_batch(measured: dict, budget_bytes: float, cap: int) -> int:
    """Largest power of two whose linearly predicted peak memory fits ``budget_bytes``."""
    fixed = measured["fixed_memory_gb"] * 2**30
    per_image = max(measured["peak_memory_gb"] * 2**30 - fixed, 1.0) / measured["batch"]
    best = measured["batch"]
    batch = best
    while batch * 2 <= cap and fixed + per_image * batch * 2 <= budget_bytes:
        batch *= 2
        best = batch
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="resnet101", help="model preset (default: resnet101)")
    parser.add_argument("--sizes", default="224,512", help="comma-separated image sizes (default: 224,512)")
    parser.add_argument("--batches", default="8", help="comma-separated batch sizes (default: 8)")
    parser.add_argument("--largest", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure the largest power-of-two batch predicted to fit (default: on)")
    parser.add_argument("--memory-fraction", type=float, default=0.5,
                        help="share of the memory available at start the largest batch may use (default: 0.5)")
    parser.add_argument("--max-batch", type=int, default=256, help="upper bound of the largest-batch search")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run (default: 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps after the first (default: 1)")
    parser.add_argument("--mixed-precision", default="off", choices=("off", "float16", "bfloat16"))
    parser.add_argument("--child", nargs=2, type=int, metavar=("SIZE", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.preset, args.child[0], args.child[1], args.steps, args.warmup,
                               args.mixed_precision)), flush=True)
        return 0
    budget = _available_bytes() * args.memory_fraction
    load_start = [round(x, 2) for x in os.getloadavg()]
    results = []
    for size in (int(s) for s in args.sizes.split(",")):
        runs = [r for r in (_run_child(args, size, int(b)) for b in args.batches.split(",")) if r]
        results += runs
        if args.largest and runs:
            big = largest_batch(runs[0], budget, args.max_batch)
            if big not in {r["batch"] for r in runs}:
                run = _run_child(args, size, big)
                if run:
                    run["largest_fitting"] = True
                    results.append(run)
    print(json.dumps({"benchmark": "train_throughput", "memory_budget_gb": round(budget / 2**30, 1),
                      "cpu_count": os.cpu_count(), "load_average_start": load_start,
                      "load_average_end": [round(x, 2) for x in os.getloadavg()], "results": results}))
    for r in results:
        tag = " (largest predicted to fit)" if r.get("largest_fitting") else ""
        print(f"{r['preset']} {r['image_size']}x{r['image_size']} batch {r['batch']}{tag}: "
              f"{r['images_per_s']} images/s ({r['step_s_median']} s/step, peak {r['peak_memory_gb']} GB, "
              f"{r['device']} x{r['replicas']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
