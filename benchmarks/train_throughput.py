"""Training throughput (images/s) of the DOLG training step, ours against the PyTorch reference.

Default (``--against-pytorch``): for each preset, one process builds

- ``ours``: our training step (DOLG + ArcFace head + SGD, the preset's recipe,
  under the default strategy), as ``dolg train`` runs it;
- ``ours_before``: the same step with MultiAtrous' dilated convolutions
  lowered by Keras (SpaceToBatchND), i.e. without the per-tap decomposition;
- ``pytorch``: the official DOLG architecture (tests/torch_official.py,
  channels_last) with an ArcFace head (s=30, m=0.15) over the descriptor,
  cross-entropy, ``torch.optim.SGD`` (lr 0.01, momentum 0.9, Nesterov,
  weight decay 1e-4): forward, backward and step;

on the same synthetic batch (SIZE x SIZE, BATCH images, the same classes),
warms each up, then times them round-robin ``--repeats`` times; the median
step time of each gives images/s, and the per-repeat ratios show the spread.

``--no-against-pytorch`` measures our step alone per size and batch, each in
its own process (so its peak memory is its own), plus the largest power-of-two
batch predicted to fit (activation memory grows linearly with the batch).

    python benchmarks/train_throughput.py --presets resnet50,resnet101 --size 224 --batch 8
    python benchmarks/train_throughput.py --no-against-pytorch --sizes 224,512 --batches 8

Prints one JSON line per run and a final JSON summary, plus human lines.
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
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")

ARCFACE_SCALE, ARCFACE_MARGIN = 30.0, 0.15


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def build_ours(preset: str, size: int, batch: int, mixed_precision: str = "off", fast_path: bool = True):
    """Our training step on one synthetic batch repeated: ``(step, loop)``; ``step()`` returns the loss."""
    import numpy as np
    import tensorflow as tf

    from dolg_tf.layers import multi_atrous
    from dolg_tf.training import TrainLoop, run_config

    model_dir = os.path.join("/tmp", f"dolg-bench-{os.getpid()}-{int(fast_path)}")
    config = run_config(
        preset,
        image_size=size,
        batch_size=batch,
        epochs=1,
        steps_per_epoch=1000,
        warmup_epochs=0.0,
        export=False,
        eval_demo=False,
        progress=False,
        mixed_precision=mixed_precision,
        model_dir=model_dir,
    )
    loop = TrainLoop(config)
    rng = np.random.default_rng(0)
    images = tf.constant(rng.uniform(0, 255, (batch, size, size, 3)).astype(np.float32))
    labels = tf.constant(rng.integers(0, loop.source.num_classes, batch).astype(np.int32))
    dataset = tf.data.Dataset.from_tensors((images, labels)).repeat()
    iterator = iter(loop.strategy.experimental_distribute_dataset(dataset))
    train_step = loop.make_train_step()
    # The MultiAtrous lowering is chosen when the step is traced, i.e. at its first call.
    multi_atrous.set_fast_path(fast_path)
    try:
        float(train_step(iterator)[0])
    finally:
        multi_atrous.set_fast_path(True)
    return (lambda: float(train_step(iterator)[0])), loop


def build_torch(depth: int, size: int, batch: int, num_classes: int):
    """The PyTorch reference training step (official architecture + ArcFace + SGD); ``step()`` returns the loss."""
    import torch
    import torch.nn.functional as F

    from tests.torch_official import OfficialDOLG

    torch.manual_seed(0)
    module = OfficialDOLG(depth, True, num_classes=num_classes).train().to(memory_format=torch.channels_last)
    with torch.no_grad():
        module.desc_cls.weight.normal_(0, 0.01)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=gen).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, num_classes, (batch,), generator=gen)
    cos_m, sin_m = torch.cos(torch.tensor(ARCFACE_MARGIN)), torch.sin(torch.tensor(ARCFACE_MARGIN))

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        descriptor = module(images)[0]
        cos = F.linear(F.normalize(descriptor), F.normalize(module.desc_cls.weight)).clamp(-1.0, 1.0)
        sin = torch.sqrt((1.0 - cos * cos).clamp(min=0.0))
        onehot = F.one_hot(labels, num_classes).to(cos.dtype)
        logits = ARCFACE_SCALE * (cos + onehot * (cos * cos_m - sin * sin_m - cos))
        loss = F.cross_entropy(logits, labels)
        loss.backward()
        optimizer.step()
        return loss.item()

    step()
    return step


def against_pytorch(preset: str, size: int, batch: int, repeats: int, warmup: int) -> dict:
    """Ours (after, before) and the PyTorch reference step, interleaved in this process."""
    import tensorflow as tf
    import torch
    from _common import cpu_model

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    depth = 101 if preset == "resnet101" else 50
    after, loop = build_ours(preset, size, batch)
    before, _ = build_ours(preset, size, batch, fast_path=False)
    steps = {"ours": after, "ours_before": before, "pytorch": build_torch(depth, size, batch, loop.source.num_classes)}
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t) for name, t in times.items()}
    ratios = [p / o for p, o in zip(times["pytorch"], times["ours"])]
    return {
        "preset": preset,
        "image_size": size,
        "batch": batch,
        "cpu": cpu_model(),
        "threads": threads,
        "tf": tf.__version__,
        "torch": torch.__version__,
        "head_classes": int(loop.source.num_classes),
        "step_s_median": {name: round(m, 3) for name, m in med.items()},
        "step_s_all": {name: [round(t, 3) for t in v] for name, v in times.items()},
        "images_per_s": {name: round(batch / m, 2) for name, m in med.items()},
        "ours_over_pytorch": round(med["pytorch"] / med["ours"], 3),
        "ours_over_pytorch_per_repeat": [round(r, 3) for r in ratios],
        "ours_over_ours_before": round(med["ours_before"] / med["ours"], 3),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def child(preset: str, size: int, batch: int, steps: int, warmup: int, mixed_precision: str) -> dict:
    """Builds our training step alone and times it; returns the measurement."""
    import tensorflow as tf

    t0 = time.perf_counter()
    step, loop = build_ours(preset, size, batch, mixed_precision)
    first_s = time.perf_counter() - t0
    fixed = _rss_bytes()
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {
        "preset": preset,
        "image_size": size,
        "batch": batch,
        "replicas": loop.replicas,
        "device": "GPU" if tf.config.list_physical_devices("GPU") else "CPU",
        "mixed_precision": mixed_precision,
        "steps_timed": steps,
        "step_s_median": round(median, 3),
        "step_s_all": [round(t, 3) for t in times],
        "images_per_s": round(batch / median, 2),
        "build_and_first_step_s": round(first_s, 1),
        "fixed_memory_gb": round(fixed / 2**30, 2),
        "peak_memory_gb": round(peak_rss_bytes() / 2**30, 2),
        "head_classes": int(loop.source.num_classes),
    }


def _run_child(args, flag: str, *values) -> dict | None:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        flag,
        *map(str, values),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--repeats",
        str(args.repeats),
        "--mixed-precision",
        args.mixed_precision,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        print(json.dumps({"run": [flag, *map(str, values)], "error": proc.stderr.strip().splitlines()[-3:]}))
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
    parser.add_argument(
        "--against-pytorch",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="interleave ours with the PyTorch reference step (default: on)",
    )
    parser.add_argument("--presets", default="resnet50,resnet101", help="presets compared with PyTorch")
    parser.add_argument("--size", type=int, default=224, help="image size of the PyTorch comparison (default: 224)")
    parser.add_argument("--batch", type=int, default=8, help="batch of the PyTorch comparison (default: 8)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds of the comparison (default: 5)")
    parser.add_argument("--preset", default="resnet101", help="model preset without --against-pytorch")
    parser.add_argument("--sizes", default="224,512", help="comma-separated image sizes (default: 224,512)")
    parser.add_argument("--batches", default="8", help="comma-separated batch sizes (default: 8)")
    parser.add_argument(
        "--largest",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure the largest power-of-two batch predicted to fit (default: on)",
    )
    parser.add_argument(
        "--memory-fraction",
        type=float,
        default=0.5,
        help="share of the memory available at start the largest batch may use (default: 0.5)",
    )
    parser.add_argument("--max-batch", type=int, default=256, help="upper bound of the largest-batch search")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run (default: 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps after the first (default: 1)")
    parser.add_argument("--mixed-precision", default="off", choices=("off", "float16", "bfloat16"))
    parser.add_argument("--child", nargs=3, metavar=("PRESET", "SIZE", "BATCH"), help=argparse.SUPPRESS)
    parser.add_argument("--compare-child", nargs=3, metavar=("PRESET", "SIZE", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        preset, size, batch = args.child[0], int(args.child[1]), int(args.child[2])
        print(json.dumps(child(preset, size, batch, args.steps, args.warmup, args.mixed_precision)), flush=True)
        return 0
    if args.compare_child:
        preset, size, batch = args.compare_child[0], int(args.compare_child[1]), int(args.compare_child[2])
        print(json.dumps(against_pytorch(preset, size, batch, args.repeats, args.warmup)), flush=True)
        return 0
    load_start = [round(x, 2) for x in os.getloadavg()]
    results = []
    if args.against_pytorch:
        for preset in args.presets.split(","):
            run = _run_child(args, "--compare-child", preset, args.size, args.batch)
            if run:
                results.append(run)
        print(
            json.dumps(
                {"benchmark": "train_throughput_vs_pytorch", "load_average_start": load_start, "results": results}
            )
        )
        for r in results:
            ips = r["images_per_s"]
            spread = r["ours_over_pytorch_per_repeat"]
            print(
                f"{r['preset']} {r['image_size']}x{r['image_size']} batch {r['batch']} fp32 on {r['cpu']} "
                f"({r['threads']} threads): ours {ips['ours']} img/s, before {ips['ours_before']} img/s, "
                f"PyTorch {ips['pytorch']} img/s -> ours/PyTorch {r['ours_over_pytorch']}x "
                f"(per repeat {min(spread)}..{max(spread)}), after/before {r['ours_over_ours_before']}x"
            )
        return 0
    budget = _available_bytes() * args.memory_fraction
    for size in (int(s) for s in args.sizes.split(",")):
        runs = [
            r for r in (_run_child(args, "--child", args.preset, size, int(b)) for b in args.batches.split(",")) if r
        ]
        results += runs
        if args.largest and runs:
            big = largest_batch(runs[0], budget, args.max_batch)
            if big not in {r["batch"] for r in runs}:
                run = _run_child(args, "--child", args.preset, size, big)
                if run:
                    run["largest_fitting"] = True
                    results.append(run)
    print(
        json.dumps(
            {
                "benchmark": "train_throughput",
                "memory_budget_gb": round(budget / 2**30, 1),
                "cpu_count": os.cpu_count(),
                "load_average_start": load_start,
                "load_average_end": [round(x, 2) for x in os.getloadavg()],
                "results": results,
            }
        )
    )
    for r in results:
        tag = " (largest predicted to fit)" if r.get("largest_fitting") else ""
        print(
            f"{r['preset']} {r['image_size']}x{r['image_size']} batch {r['batch']}{tag}: "
            f"{r['images_per_s']} images/s ({r['step_s_median']} s/step, peak {r['peak_memory_gb']} GB, "
            f"{r['device']} x{r['replicas']})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
