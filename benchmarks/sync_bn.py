"""First-step (trace) and later-step time of two-replica training with synchronized batch norm.

Compares Keras' synchronized moments (three all-reduces per BN layer: sum, sum of squares, count) with
:func:`dolg_tf.training.sync_bn.enable_sync_batch_norm` (one all-reduce per layer). Each measurement is a fresh
process (the CPU is split into two logical devices before TensorFlow starts), and the two variants alternate
``--repeats`` times so they share the machine's noise. The first step is dominated by tracing the replica step.

    python benchmarks/sync_bn.py --preset tiny --size 64 --batch 16 --repeats 2
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


def _worker(variant: str, preset: str, size: int, batch: int, steps: int, model_dir: str) -> None:
    import time

    from dolg_tf.training.strategy import make_strategy

    strategy = make_strategy("mirrored", cpu_replicas=2)

    from dolg_tf.training import run_config, task
    from dolg_tf.training.loop import TrainLoop
    from dolg_tf.training.sync_bn import batch_norm_layers

    if variant == "keras":

        def keras_sync(model) -> int:  # Keras' own synchronized moments: only the flag
            layers = batch_norm_layers(model)
            for layer in layers:
                layer.synchronized = True
            return len(layers)

        task.enable_sync_batch_norm = keras_sync
    config = run_config(
        preset, epochs=1, steps_per_epoch=steps + 1, batch_size=batch, image_size=size, export=False,
        eval_demo=False, progress=False, model_dir=model_dir,
    )  # fmt: skip
    loop = TrainLoop(config, strategy=strategy)
    step, iterator = loop.make_train_step(), iter(loop.make_dataset())
    t0 = time.perf_counter()
    first = float(step(iterator)[0])
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        float(step(iterator)[0])
    later_s = (time.perf_counter() - t0) / steps
    print(json.dumps({"layers": loop.state.sync_bn_layers, "first_loss": first, "first_s": first_s, "step_s": later_s}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5, help="timed steps after the first")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        with tempfile.TemporaryDirectory() as model_dir:
            _worker(args.worker, args.preset, args.size, args.batch, args.steps, model_dir)
        return 0
    results: dict[str, list[dict]] = {"keras": [], "ours": []}
    for _ in range(args.repeats):
        for variant in results:
            command = [sys.executable, os.path.abspath(__file__), "--worker", variant, "--preset", args.preset]
            command += ["--size", str(args.size), "--batch", str(args.batch), "--steps", str(args.steps)]
            proc = subprocess.run(command, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            results[variant].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    keras_first = statistics.median(r["first_s"] for r in results["keras"])
    ours_first = statistics.median(r["first_s"] for r in results["ours"])
    keras_step = statistics.median(r["step_s"] for r in results["keras"])
    ours_step = statistics.median(r["step_s"] for r in results["ours"])
    print(f"{args.preset} {args.size}px, global batch {args.batch}, 2 CPU replicas, "
          f"{results['ours'][0]['layers']} BN layers")  # fmt: skip
    print("| | Keras (3 all-reduces a layer) | ours (1) | ratio |")
    print("|---|---|---|---|")
    print(f"| first step (trace), s | {keras_first:.1f} | {ours_first:.1f} | {keras_first / ours_first:.2f}x |")
    print(f"| later step, ms | {keras_step * 1e3:.0f} | {ours_step * 1e3:.0f} | {keras_step / ours_step:.2f}x |")
    losses = {variant: [r["first_loss"] for r in runs] for variant, runs in results.items()}
    print(f"first losses: {losses}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
