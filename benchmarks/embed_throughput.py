"""Descriptor throughput: our SavedModel (now and before the speed-ups) vs the PyTorch reference.

All variants run the same DOLG weights (a random official-format checkpoint,
converted), single scale, at SIZE x SIZE, for each batch size, interleaved
round-robin after warm-up; the median of the repeats is reported, with the
per-repeat ratios to PyTorch as the spread. Variants: the SavedModel's
``embed_pixels`` (``savedmodel``) and ``serving_default`` on JPEG bytes, each
as exported now and as exported ``before`` (MultiAtrous' dilated convolutions
lowered by Keras to SpaceToBatchND, batch norms not folded); the PyTorch
reference is the official architecture, channels_last, same threads. The same
run measures the machine's fp32 matmul GFLOP/s (TensorFlow, 2048^3) and the
FLOPs of one forward pass (Conv2D + MatMul ops of the traced graph): "dense"
counts each dilated conv at its full 3x3 size, "done" what the per-tap
decomposition computes; the achieved GFLOP/s of ``savedmodel`` uses "done".

    python benchmarks/embed_throughput.py --preset resnet101 --size 512 --batches 1,8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # for tests.torch_official


def _graph_flops(concrete) -> int:
    """Useful FLOPs (2*MACs) of every Conv2D / MatMul in a concrete function with static shapes.

    TF on CPU runs a dilated conv as SpaceToBatchND -> Conv2D -> BatchToSpaceND
    over a padded tensor; such a conv is counted at its useful size (the
    original input's H x W, "same" padding, stride 1), not the padded one.
    """
    total = 0
    graphs = [concrete.graph]
    seen = set()
    while graphs:
        graph = graphs.pop()
        for op in graph.get_operations():
            if op.type == "Conv2D":
                out = op.outputs[0].shape.as_list()
                kh, kw, cin, cout = op.inputs[1].shape.as_list()
                if op.inputs[0].op.type == "SpaceToBatchND":
                    out = op.inputs[0].op.inputs[0].shape.as_list()
                total += 2 * out[0] * out[1] * out[2] * kh * kw * cin * cout
            elif op.type in ("MatMul", "BatchMatMulV2"):
                a, out = op.inputs[0].shape.as_list(), op.outputs[0].shape.as_list()
                k = a[-2] if op.get_attr("transpose_a" if op.type == "MatMul" else "adj_x") else a[-1]
                batch = 1
                for d in out[:-2]:
                    batch *= d
                total += 2 * batch * out[-2] * out[-1] * k
        for fn in graph._functions.values():
            if fn.name not in seen:
                seen.add(fn.name)
                graphs.append(fn.graph)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="resnet101", choices=["resnet50", "resnet101"])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--variants",
        default="savedmodel,savedmodel_before,serving_default_jpeg",
        help="besides pytorch_reference: savedmodel, savedmodel_before, serving_default_jpeg, "
        "serving_default_jpeg_before (before = dilated convs lowered by Keras, batch norms not folded)",
    )
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    import numpy as np
    import tensorflow as tf
    import torch
    from _common import cpu_model

    from dolg_tf.convert import from_official_pytorch
    from dolg_tf.export import export_saved_model
    from dolg_tf.layers import multi_atrous
    from dolg_tf.model import fold
    from tests.torch_official import OfficialDOLG, official_input, randomise_

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    depth = 101 if args.preset == "resnet101" else 50
    module = randomise_(OfficialDOLG(depth, True, num_classes=10), seed=0)
    module = module.to(memory_format=torch.channels_last)
    tmp = tempfile.mkdtemp(prefix="dolg_bench_")
    ckpt = os.path.join(tmp, "official.pyth")
    torch.save({"model_state": module.state_dict()}, ckpt)
    model = from_official_pytorch(ckpt)

    def export(variant):
        # before: Keras' SpaceToBatchND lowering of the dilated convs and no BN folding (the earlier export)
        multi_atrous.set_fast_path(variant == "after")
        fold.set_export_folding(variant == "after")
        try:
            path = export_saved_model(
                model, os.path.join(tmp, variant), scales=(1.0,), image_size=args.size, warmup_batch_sizes=()
            )
        finally:
            multi_atrous.set_fast_path(True)
            fold.set_export_folding(True)
        return tf.saved_model.load(path).signatures

    saved = {variant: export(variant) for variant in ("after", "before")}

    rng = np.random.default_rng(0)
    pixels = {b: rng.integers(0, 256, (b, args.size, args.size, 3), dtype=np.uint8) for b in batches}
    tf_pixels = {b: tf.constant(p) for b, p in pixels.items()}
    jpegs = {}
    for b, p in pixels.items():
        encoded = [tf.io.encode_jpeg(tf.constant(img), quality=95).numpy() for img in p]
        jpegs[b] = tf.constant(encoded)
    torch_in = {
        b: official_input(p.astype(np.float32)).contiguous(memory_format=torch.channels_last) for b, p in pixels.items()
    }

    def pixels_fn(variant):
        return lambda b: saved[variant]["embed_pixels"](pixels=tf_pixels[b])["embedding"].numpy()

    def jpeg_fn(variant):
        return lambda b: saved[variant]["serving_default"](images=jpegs[b])["embedding"].numpy()

    def run_torch(b):
        with torch.inference_mode():
            return module(torch_in[b])[0].numpy()

    variants = {
        "savedmodel": pixels_fn("after"),
        "savedmodel_before": pixels_fn("before"),
        "serving_default_jpeg": jpeg_fn("after"),
        "serving_default_jpeg_before": jpeg_fn("before"),
        "pytorch_reference": run_torch,
    }
    variants = {k: v for k, v in variants.items() if k in args.variants.split(",") or k == "pytorch_reference"}
    b0 = batches[0]
    ref = run_torch(b0)
    ref = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    agreement = float(np.abs(pixels_fn("after")(b0) - ref).max())
    before_vs_after = float(np.abs(pixels_fn("after")(b0) - pixels_fn("before")(b0)).max())
    for b in batches:  # warm-up
        for fn in variants.values():
            fn(b)

    a = tf.random.normal((2048, 2048))
    matmul = tf.function(lambda x: tf.matmul(x, x))
    matmul(a).numpy()
    times = {(name, b): [] for name in variants for b in batches}
    matmul_times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        matmul(a).numpy()
        matmul_times.append(time.perf_counter() - t0)
        for b in batches:
            for name, fn in variants.items():
                t0 = time.perf_counter()
                fn(b)
                times[(name, b)].append(time.perf_counter() - t0)
    matmul_gflops = 2 * 2048**3 / statistics.median(matmul_times) / 1e9
    spec = tf.TensorSpec((1, args.size, args.size, 3), tf.float32)
    flops = {}
    for variant in ("before", "after"):
        multi_atrous.set_fast_path(variant == "after")
        flops[variant] = _graph_flops(tf.function(lambda x: model(x, training=False)).get_concrete_function(spec))
    multi_atrous.set_fast_path(True)

    result = {
        "benchmark": "embed_throughput",
        "preset": args.preset,
        "multi_atrous": True,
        "size": args.size,
        "cpu": cpu_model(),
        "threads": threads,
        "tf": tf.__version__,
        "torch": torch.__version__,
        "repeats": args.repeats,
        "matmul_fp32_gflops": round(matmul_gflops, 1),
        "gflop_per_image_dense": round(flops["before"] / 1e9, 2),
        "gflop_per_image_done": round(flops["after"] / 1e9, 2),
        "max_abs_diff_savedmodel_vs_pytorch": agreement,
        "max_abs_diff_after_vs_before": before_vs_after,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "results": {},
    }
    for b in batches:
        row = {}
        for name in variants:
            med = statistics.median(times[(name, b)])
            row[name] = {
                "median_s": round(med, 4),
                "images_per_s": round(b / med, 3),
                "all_s": [round(t, 3) for t in times[(name, b)]],
            }
        torch_times = times[("pytorch_reference", b)]
        for name in variants:
            if name != "pytorch_reference":
                row[f"ratio_{name}_over_pytorch"] = round(statistics.median(torch_times) / row[name]["median_s"], 3)
                row[f"ratio_{name}_over_pytorch_per_repeat"] = [
                    round(p / o, 3) for p, o in zip(torch_times, times[(name, b)])
                ]
        if "savedmodel" in variants:
            done = flops["after"] * b / row["savedmodel"]["median_s"] / 1e9
            row["savedmodel_gflops_done"] = round(done, 1)
            row["savedmodel_share_of_matmul_peak"] = round(done / matmul_gflops, 3)
        result["results"][str(b)] = row
    print(json.dumps(result))
    for b in batches:
        r = result["results"][str(b)]
        parts = [f"{name} {r[name]['images_per_s']} img/s" for name in variants]
        ratios = [
            f"{name}/PyTorch {r[f'ratio_{name}_over_pytorch']}x" for name in variants if name != "pytorch_reference"
        ]
        print(
            f"{args.preset} {args.size}px batch {b} on {result['cpu']} ({threads} threads): "
            + ", ".join(parts)
            + "; "
            + ", ".join(ratios)
            + (
                f"; SavedModel {r['savedmodel_gflops_done']} GFLOP/s done of {result['matmul_fp32_gflops']} "
                f"matmul GFLOP/s"
                if "savedmodel" in variants
                else ""
            )
        )


if __name__ == "__main__":
    main()
