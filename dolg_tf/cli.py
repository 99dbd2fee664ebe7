"""The ``dolg`` command."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from dolg_tf.errors import DolgError

log = logging.getLogger("dolg_tf")


def _parse_scales(text: str) -> tuple[float, ...]:
    try:
        scales = tuple(float(s) for s in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"scales must be comma-separated numbers, got {text!r}") from err
    if not scales or any(s <= 0 for s in scales):
        raise argparse.ArgumentTypeError(f"scales must be positive, got {text!r}")
    return scales


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


def _cmd_convert(args: argparse.Namespace) -> int:
    """Converts an official DOLG PyTorch checkpoint to a Keras model file."""
    from dolg_tf.convert import from_official_pytorch

    out = args.out
    if not (out.endswith(".keras") or out.endswith(".weights.h5")):
        os.makedirs(out, exist_ok=True)
        out = os.path.join(out, "dolg.keras")
    if os.path.exists(out) and not args.overwrite:
        raise DolgError(f"{out} exists; pass --overwrite to replace it")
    model = from_official_pytorch(args.checkpoint, preset=args.preset)
    tmp = out + ".tmp" + (".keras" if out.endswith(".keras") else ".weights.h5")
    if out.endswith(".keras"):
        model.save(tmp)
    else:
        model.save_weights(tmp)
    os.replace(tmp, out)  # never leave a half-written model behind
    config_path = os.path.splitext(out)[0].removesuffix(".weights") + ".config.json"
    with open(config_path, "w") as f:
        f.write(model.config.to_json())
    print(json.dumps({"out": out, "config": config_path, **model.config.to_dict()}))
    print(f"converted {args.checkpoint} -> {out} ({model.config.backbone}, multi_atrous={model.config.multi_atrous})")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from dolg_tf.config import model_config

    print(model_config(args.preset).to_json())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dolg", description="DOLG image retrieval in Keras 3 / TensorFlow.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="embed the built-in demo photos and report retrieval quality")
    demo.add_argument("--preset", default="tiny", help="model preset: tiny, resnet50, resnet101 (default: tiny)")
    demo.add_argument("--model", default=None, help="a .keras DOLG model (e.g. from `dolg convert`); overrides --preset")
    demo.add_argument("--weights", default=None, help="a .weights.h5 file of a DOLG model of this preset")
    demo.add_argument("--backbone-weights", default=None, help="keras-hub ResNet preset name or local directory")
    demo.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    demo.add_argument("--image-size", type=int, default=160, help="longer side of each view (default: 160)")
    demo.add_argument("--gallery-views", type=int, default=2, help="gallery views per photo (default: 2)")
    demo.add_argument(
        "--scales", type=_parse_scales, default=(0.7071, 1.0, 1.4142), help="comma-separated inference scales"
    )
    demo.set_defaults(func=_cmd_demo)

    convert = sub.add_parser("convert", help="convert released DOLG weights to a Keras model")
    convert.add_argument("--from", dest="source", choices=["official-pytorch"], default="official-pytorch")
    convert.add_argument("--checkpoint", required=True, help="official .pyth/.pth checkpoint")
    convert.add_argument("--out", required=True, help="a .keras file, a .weights.h5 file, or a directory")
    convert.add_argument("--preset", default=None, help="insist on resnet50 or resnet101 (default: detect)")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    convert.set_defaults(func=_cmd_convert)

    info = sub.add_parser("info", help="print a preset's resolved model config as JSON")
    info.add_argument("--preset", default="resnet101")
    info.set_defaults(func=_cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        return args.func(args)
    except DolgError as err:
        print(f"dolg {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
