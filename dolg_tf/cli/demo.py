"""``dolg demo``: embed the built-in demo photos and report retrieval quality."""

from __future__ import annotations

import argparse
import json
import time

from dolg_tf.cli._common import parse_scales


def _cmd_demo(args: argparse.Namespace) -> int:
    """Embeds the built-in demo photos' gallery and query views and reports retrieval quality."""
    import numpy as np
    import tensorflow as tf

    from dolg_tf.demo_data import demo_views
    from dolg_tf.evaluate import label_retrieval_metrics, rank_by_similarity
    from dolg_tf.model import build_dolg, load_dolg, multiscale_embed

    import keras

    keras.utils.set_random_seed(args.seed)  # untrained weights: same numbers on every run
    t0 = time.perf_counter()
    if args.model:
        model = load_dolg(args.model)
    else:
        model = build_dolg(args.preset, weights=args.weights, backbone_weights=args.backbone_weights)
    build_s = time.perf_counter() - t0
    gallery, gallery_labels, names = demo_views(args.gallery_views, seed=0, size=args.image_size)
    queries, query_labels, _ = demo_views(1, seed=1, size=args.image_size)

    embed = tf.function(
        lambda x: multiscale_embed(model, x, args.scales),
        input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)],
        reduce_retracing=True,
    )

    def embed_all(images):
        return np.concatenate([embed(tf.constant(im[None], tf.float32)).numpy() for im in images])

    t0 = time.perf_counter()
    gallery_emb = embed_all(gallery)
    query_emb = embed_all(queries)
    embed_s = time.perf_counter() - t0
    metrics = label_retrieval_metrics(rank_by_similarity(query_emb, gallery_emb), query_labels, gallery_labels)
    summary = {
        "preset": args.preset if not args.model else model.config.backbone,
        "trained_weights": bool(args.model or args.weights or args.backbone_weights),
        "photos": len(names),
        "gallery": len(gallery),
        "queries": len(queries),
        "scales": list(args.scales),
        "build_s": round(build_s, 2),
        "images_per_s": round((len(gallery) + len(queries)) / embed_s, 2),
        **{k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()},
    }
    print(json.dumps(summary))
    kind = "trained" if summary["trained_weights"] else "UNTRAINED (random weights: a colour-statistics baseline, not a trained result)"
    print(
        f"demo: {len(queries)} queries vs {len(gallery)} gallery views of {len(names)} built-in photos, "
        f"{kind} {summary['preset']} model: mAP {metrics['mAP']:.3f}, recall@1 {metrics['recall@1']:.3f}, "
        f"{summary['images_per_s']} images/s"
    )
    return 0


def register(sub) -> None:
    demo = sub.add_parser("demo", help="embed the built-in demo photos and report retrieval quality")
    demo.add_argument("--preset", default="tiny", help="model preset: tiny, resnet50, resnet101 (default: tiny)")
    demo.add_argument("--model", default=None, help="a .keras DOLG model (e.g. from `dolg convert`); overrides --preset")
    demo.add_argument("--weights", default=None, help="a .weights.h5 file of a DOLG model of this preset")
    demo.add_argument("--backbone-weights", default=None, help="keras-hub ResNet preset name or local directory")
    demo.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    demo.add_argument("--image-size", type=int, default=160, help="longer side of each view (default: 160)")
    demo.add_argument("--gallery-views", type=int, default=2, help="gallery views per photo (default: 2)")
    demo.add_argument(
        "--scales", type=parse_scales, default=(0.7071, 1.0, 1.4142), help="comma-separated inference scales"
    )
    demo.set_defaults(func=_cmd_demo)
