"""``dolg demo``: the whole product end to end on the built-in demo photos (``make demo``).

train -> export -> ``dolg serve`` -> client embed (gRPC + REST) -> faiss index
-> search held-out queries -> mAP / recall@1 -> results grid PNG -> server stopped.
See :mod:`dolg_tf.demo.run`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os


def _cmd_demo(args: argparse.Namespace) -> int:
    from dolg_tf.demo.run import run_demo

    train_args = list(args.train_arg)
    if args.steps is not None:
        train_args += ["--epochs", "1", "--steps-per-epoch", str(args.steps)]
    result = run_demo(
        workdir=args.workdir,
        export_base=args.export_base,
        train=not args.no_train,
        train_args=train_args,
        gallery_views=args.gallery_views,
        k=args.k,
        echo=not args.quiet,
    )
    result = dataclasses.replace(
        result, **{name: os.path.abspath(getattr(result, name)) for name in ("export_dir", "results_json", "grid_png")}
    )
    print(json.dumps(dataclasses.asdict(result)))
    m = result.metrics
    before = result.untrained_metrics
    trained = "trained" if not args.no_train else "served"
    line = (
        f"demo: {result.queries} held-out queries vs {result.gallery} gallery views, {trained} model "
        f"{result.export_dir} via dolg serve: mAP {m['mAP']:.3f}, recall@1 {m['recall@1']:.3f}"
    )
    if before:
        line += f" (untrained: mAP {before['mAP']:.3f}, recall@1 {before['recall@1']:.3f})"
    print(line)
    print(f"results grid: {result.grid_png}   results: {result.results_json}")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="end to end on the built-in photos: train, export, serve, embed, index, search",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--workdir", default=os.path.join("runs", "demo"), help="where views, index, results go")
    p.add_argument("--export-base", default=os.path.join("saved_models", "dolg"), help="SavedModel base path")
    p.add_argument("--no-train", action="store_true", help="serve the latest export under --export-base instead")
    p.add_argument("--steps", type=int, default=None, help="train this many steps (one epoch) instead of the preset's")
    p.add_argument(
        "--train-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for `dolg train` (repeatable), e.g. --train-arg=--lr=0.05",
    )
    p.add_argument("--gallery-views", type=int, default=2, help="gallery views per photo (default: 2)")
    p.add_argument("-k", type=int, default=5, help="results per query in the grid (default: 5)")
    p.add_argument("-q", "--quiet", action="store_true", help="do not echo the training log")
    p.set_defaults(func=_cmd_demo)
