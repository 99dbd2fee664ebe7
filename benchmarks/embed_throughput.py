"""Descriptor throughput: our SavedModel vs our Keras model vs the PyTorch reference.

All three run the same DOLG weights (a random official-format checkpoint,
converted), single scale, at SIZE x SIZE, for each batch size, interleaved
round-robin after warm-up; the median of the repeats is reported. The same
run measures the machine's fp32 matmul GFLOP/s (TensorFlow, 2048^3) and the
FLOPs of one forward pass (Conv2D + MatMul ops of the traced graph), giving the
achieved GFLOP/s of the SavedModel path.

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
        for fn in graph._functions.values():  # noqa: SLF001 - nested function bodies
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
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    import numpy as np
    import tensorflow as tf
    import torch

    from dolg_tf.convert import from_official_pytorch
    from dolg_tf.export import export_saved_model
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
    saved = tf.saved_model.load(
        export_saved_model(model, os.path.join(tmp, "sm"), scales=(1.0,), image_size=args.size, warmup_batch_sizes=())
    )
    serve = saved.signatures["embed_pixels"]
    keras_fn = tf.function(lambda x: model(x, training=False), reduce_retracing=True)

    rng = np.random.default_rng(0)
    pixels = {b: rng.integers(0, 256, (b, args.size, args.size, 3), dtype=np.uint8) for b in batches}
    tf_pixels = {b: tf.constant(p) for b, p in pixels.items()}
    tf_float = {b: tf.constant(p.astype(np.float32)) for b, p in pixels.items()}
    torch_in = {b: official_input(p.astype(np.float32)).contiguous(memory_format=torch.channels_last) for b, p in pixels.items()}

    def run_saved(b):
        return serve(pixels=tf_pixels[b])["embedding"].numpy()

    def run_keras(b):
        return keras_fn(tf_float[b]).numpy()

    def run_torch(b):
        with torch.inference_mode():
            return module(torch_in[b])[0].numpy()

    variants = {"savedmodel": run_saved, "keras_tf_function": run_keras, "pytorch_reference": run_torch}
    b0 = batches[0]
    ref = run_torch(b0)
    ref = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    agreement = float(np.abs(run_saved(b0) - ref).max())  # also the warm-up of both
    for b in batches:
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
    flops = _graph_flops(keras_fn.get_concrete_function(tf.TensorSpec((1, args.size, args.size, 3), tf.float32)))

    result = {
        "benchmark": "embed_throughput",
        "preset": args.preset,
        "multi_atrous": True,
        "size": args.size,
        "threads": threads,
        "matmul_fp32_gflops": round(matmul_gflops, 1),
        "gflop_per_image": round(flops / 1e9, 2),
        "max_abs_diff_savedmodel_vs_pytorch": agreement,
        "results": {},
    }
    for b in batches:
        row = {}
        for name in variants:
            med = statistics.median(times[(name, b)])
            row[name] = {"median_s": round(med, 4), "images_per_s": round(b / med, 3)}
        row["savedmodel_gflops"] = round(flops * b / row["savedmodel"]["median_s"] / 1e9, 1)
        row["ratio_savedmodel_over_pytorch"] = round(
            row["savedmodel"]["images_per_s"] / row["pytorch_reference"]["images_per_s"], 3
        )
        result["results"][str(b)] = row
    print(json.dumps(result))
    for b in batches:
        r = result["results"][str(b)]
        print(
            f"{args.preset} {args.size}px batch {b}: SavedModel {r['savedmodel']['images_per_s']} img/s, "
            f"Keras tf.function {r['keras_tf_function']['images_per_s']} img/s, "
            f"PyTorch {r['pytorch_reference']['images_per_s']} img/s; SavedModel/PyTorch = "
            f"{r['ratio_savedmodel_over_pytorch']}; SavedModel {r['savedmodel_gflops']} GFLOP/s of "
            f"{result['matmul_fp32_gflops']} matmul GFLOP/s"
        )


if __name__ == "__main__":
    main()
