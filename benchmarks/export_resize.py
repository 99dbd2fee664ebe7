"""Throughput of the export's two resize policies, through ``serving_default`` on real JPEG bytes.

One export per policy of the same model (same weights, same scales), both
loaded in this process; batches of real photos (the built-in demo photos,
JPEG-encoded at their natural aspect ratios) are run through each policy,
interleaved round-robin after warm-up; the median of the repeats is reported
and the ratio fixed / aspect printed.

    python benchmarks/export_resize.py --preset resnet101 --size 512 --batch 8 --repeats 3
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
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="resnet101")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--scales", default="0.7071,1.0,1.4142")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="also write the JSON result here")
    args = parser.parse_args(argv)

    import tensorflow as tf

    from dolg_tf.export import default_warmup_images, export_saved_model
    from dolg_tf.model import build_dolg

    scales = tuple(float(s) for s in args.scales.split(","))
    model = build_dolg(args.preset)
    tmp = tempfile.mkdtemp(prefix="dolg_resize_bench_")
    fns = {}
    for policy in ("aspect", "fixed"):
        path = export_saved_model(
            model, os.path.join(tmp, policy), image_size=args.size, resize=policy, scales=scales, warmup_batch_sizes=()
        )
        fns[policy] = tf.saved_model.load(path).signatures["serving_default"]
    images = tf.constant(default_warmup_images(args.batch, longer_side=1024))
    for fn in fns.values():  # warm-up
        fn(images=images)
    times = {p: [] for p in fns}
    for _ in range(args.repeats):
        for policy, fn in fns.items():
            t0 = time.perf_counter()
            fn(images=images)["embedding"].numpy()
            times[policy].append(time.perf_counter() - t0)
    result = {
        "preset": args.preset,
        "image_size": args.size,
        "batch": args.batch,
        "scales": list(scales),
        "threads": os.cpu_count(),
        "images_per_s": {p: round(args.batch / statistics.median(t), 3) for p, t in times.items()},
    }
    result["fixed_over_aspect"] = round(result["images_per_s"]["fixed"] / result["images_per_s"]["aspect"], 3)
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
