"""Per-op time table of the exported DOLG SavedModel (TensorFlow step stats, after Grappler).

The model (random weights) is exported twice at SIZE, single scale:
``before`` (Keras' SpaceToBatchND lowering of MultiAtrous' dilated
convolutions, batch norms not folded) and ``after`` (the default export). Each
SavedModel is loaded into a session, ``embed_pixels`` runs once to warm up,
then ``--repeats`` runs with full tracing; every node's compute time is summed
by op type. The table gives each op type's time, share and count, and the
MultiAtrous share (nodes under its name scope). The op times of parallel nodes
add up, so their sum can exceed the wall time.

    python benchmarks/profile_ops.py --preset resnet101 --size 512 --batches 1,8
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def export_variant(model, variant: str, size: int, directory: str) -> str:
    """Exports ``model`` with the speed-ups on (``after``) or off (``before``); returns the SavedModel path."""
    from dolg_tf.export import export_saved_model
    from dolg_tf.layers import multi_atrous
    from dolg_tf.model import fold

    multi_atrous.set_fast_path(variant == "after")
    fold.set_export_folding(variant == "after")
    try:
        return export_saved_model(model, directory, scales=(1.0,), image_size=size, warmup_batch_sizes=())
    finally:
        multi_atrous.set_fast_path(True)
        fold.set_export_folding(True)


def profile(path: str, size: int, batch: int, repeats: int) -> dict:
    """Op-type and MultiAtrous time of the SavedModel's ``embed_pixels`` on a (batch, size, size, 3) input."""
    import numpy as np
    import tensorflow as tf

    pixels = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    by_type: dict[str, list[float]] = collections.defaultdict(list)
    counts: collections.Counter = collections.Counter()
    atrous, totals, walls = [], [], []
    with tf.compat.v1.Session(graph=tf.Graph()) as sess:
        meta = tf.compat.v1.saved_model.loader.load(sess, ["serve"], path)
        signature = meta.signature_def["embed_pixels"]
        feed_name, out_name = signature.inputs["pixels"].name, signature.outputs["embedding"].name
        sess.run(out_name, {feed_name: pixels})
        options = tf.compat.v1.RunOptions(trace_level=tf.compat.v1.RunOptions.FULL_TRACE)
        for _ in range(repeats):
            run_meta = tf.compat.v1.RunMetadata()
            t0 = time.perf_counter()
            sess.run(out_name, {feed_name: pixels}, options=options, run_metadata=run_meta)
            walls.append(time.perf_counter() - t0)
            per_type: collections.Counter = collections.Counter()
            run_counts: collections.Counter = collections.Counter()
            in_atrous = 0.0
            for dev in run_meta.step_stats.dev_stats:
                for node in dev.node_stats:
                    if node.node_name in ("_SOURCE", "_SINK"):
                        continue
                    micros = node.op_end_rel_micros - node.op_start_rel_micros
                    op_type = node.timeline_label.split("(")[0].split("=")[-1].strip() or node.node_name
                    per_type[op_type] += micros
                    run_counts[op_type] += 1
                    if "multi_atrous" in node.node_name:
                        in_atrous += micros
            for key, micros in per_type.items():
                by_type[key].append(micros)
            counts = run_counts
            atrous.append(in_atrous)
            totals.append(sum(per_type.values()))
    total = statistics.median(totals)
    rows = sorted(((k, statistics.median(v)) for k, v in by_type.items()), key=lambda kv: -kv[1])
    return {
        "batch": batch,
        "wall_ms": round(1e3 * statistics.median(walls), 1),
        "op_time_ms": round(total / 1e3, 1),
        "multi_atrous_ms": round(statistics.median(atrous) / 1e3, 1),
        "multi_atrous_share": round(statistics.median(atrous) / total, 3),
        "ops": [
            {"op": k, "ms": round(v / 1e3, 1), "share": round(v / total, 3), "count": counts[k]}
            for k, v in rows
            if v / total >= 0.002
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="resnet101")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variants", default="before,after", help="before: Keras' dilated conv lowering, no BN fold")
    parser.add_argument("--top", type=int, default=14, help="rows of the human table")
    args = parser.parse_args()

    import tensorflow as tf

    from benchmarks._common import cpu_model
    from dolg_tf.model import build_dolg

    model = build_dolg(args.preset)
    tmp = tempfile.mkdtemp(prefix="dolg_profile_")
    paths = {v: export_variant(model, v, args.size, os.path.join(tmp, v)) for v in args.variants.split(",")}
    results = []
    for b in args.batches.split(","):
        for variant, path in paths.items():
            results.append(dict(variant=variant, **profile(path, args.size, int(b), args.repeats)))
    shutil.rmtree(tmp, ignore_errors=True)
    print(
        json.dumps(
            {
                "benchmark": "profile_ops",
                "preset": args.preset,
                "size": args.size,
                "signature": "embed_pixels",
                "cpu": cpu_model(),
                "threads": os.cpu_count(),
                "tf": tf.__version__,
                "results": results,
            }
        )
    )
    for r in results:
        print(
            f"\n{args.preset} {args.size}x{args.size} batch {r['batch']} ({r['variant']}): "
            f"wall {r['wall_ms']} ms, op time {r['op_time_ms']} ms, "
            f"MultiAtrous {r['multi_atrous_ms']} ms ({100 * r['multi_atrous_share']:.1f}%)"
        )
        print(f"| {'op':<28} | {'ms':>9} | {'share':>6} | {'count':>5} |")
        for row in r["ops"][: args.top]:
            print(f"| {row['op']:<28} | {row['ms']:>9.1f} | {100 * row['share']:>5.1f}% | {row['count']:>5} |")


if __name__ == "__main__":
    main()
