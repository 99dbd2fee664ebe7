"""``dolg export``: a DOLG model -> ``<out>/<integer version>/`` SavedModel for TF Serving."""

from __future__ import annotations

import argparse
import json
import sys
import time

from dolg_tf.cli._common import parse_scales
from dolg_tf.config import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS
from dolg_tf.errors import ConfigError
from dolg_tf.export.contract import EXPORT_PROFILES, OFFICIAL_MAX_IMAGE_PIXELS, RESIZE_POLICIES


def _progress():
    start = time.monotonic()

    def say(message: str) -> None:
        print(f"dolg export: [{time.monotonic() - start:5.1f} s] {message}", file=sys.stderr, flush=True)

    return say


def _cmd_export(args: argparse.Namespace) -> int:
    say = _progress()
    say("loading TensorFlow")
    import numpy as np

    from dolg_tf.export import (
        default_warmup_images,
        export_saved_model,
        read_export_metadata,
        run_with_c_api,
    )
    from dolg_tf.model import build_dolg, load_dolg

    if args.model and (args.weights or args.backbone_weights):
        raise ConfigError("--model is a whole model; do not combine it with --weights / --backbone-weights")
    if args.model:
        say(f"loading {args.model}")
        model = load_dolg(args.model)
    else:
        say(f"building the {args.preset} model")
        model = build_dolg(args.preset, weights=args.weights, backbone_weights=args.backbone_weights)
    options = {
        "image_size": args.image_size,
        "resize": args.resize,
        "scales": args.scales,
        "max_image_bytes": args.max_image_bytes,
        "max_image_pixels": args.max_image_pixels,
        "max_batch_size": args.max_batch_size,
    }
    source = {"model": args.model} if args.model else {"preset": args.preset, "weights": args.weights}
    path = export_saved_model(
        model,
        args.out,
        version=args.version,
        model_name=args.model_name,
        extra_metadata={"source": source},
        profile=args.profile,
        progress=say,
        **options,
    )
    summary = {"export_dir": path, **read_export_metadata(path)["export_config"]}
    if args.verify:
        # Load the export the way TF Serving does (C++ loader, no TF Python) and
        # compare with the Keras model on a real photo.
        from dolg_tf.export import embed_reference

        say("verifying: the export through TF's C API (TF Serving's loader) vs the Keras model")
        jpeg = default_warmup_images(1)[0]
        served = run_with_c_api(path, images=[jpeg])
        expected = embed_reference(model, [jpeg], read_export_metadata(path)["export_config"])
        summary["verify_max_abs_diff"] = float(np.abs(served - expected).max())
    say(f"done: {path}")
    print(json.dumps(summary))
    if not (args.model or args.weights or args.backbone_weights):
        print("note: exported a model with random weights (no --model / --weights given)")
    return 0


def register(sub) -> None:
    p = sub.add_parser("export", help="export a DOLG model as a TF Serving SavedModel version")
    src = p.add_argument_group("model (one of --model, or --preset [+ --weights])")
    src.add_argument("--model", default=None, help="a .keras DOLG model (e.g. from `dolg convert` or training)")
    src.add_argument("--preset", default="resnet101", help="preset when building: resnet101, resnet50, tiny")
    src.add_argument("--weights", default=None, help="a .weights.h5 of a DOLG model of --preset")
    src.add_argument("--backbone-weights", default=None, help="keras-hub ResNet preset name or local directory")
    p.add_argument("--out", default="saved_models/dolg", help="model base path (default: saved_models/dolg)")
    p.add_argument("--version", type=int, default=None, help="integer version (default: next free)")
    p.add_argument("--model-name", default="dolg", help="model name in the warm-up requests (default: dolg)")
    p.add_argument(
        "--profile",
        choices=sorted(EXPORT_PROFILES),
        default="default",
        help="default: aspect resize to the model's training size (else 512), scales 0.7071,1,1.4142; "
        "official: the authors' evaluation (no pre-resize, scales 0.3535,0.5,0.7071,1,1.4142, "
        f"at most {OFFICIAL_MAX_IMAGE_PIXELS} pixels). The flags below override the profile.",
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="longer side (aspect) or side (fixed); default: the size the model was trained at, else 512",
    )
    p.add_argument("--resize", choices=list(RESIZE_POLICIES), default=None, help="resize policy (default: aspect)")
    p.add_argument(
        "--scales", type=parse_scales, default=None, help="comma-separated scales (default: 0.7071,1,1.4142)"
    )
    p.add_argument("--max-image-bytes", type=int, default=None, help=f"default {DEFAULT_MAX_IMAGE_BYTES}")
    p.add_argument(
        "--max-image-pixels",
        type=int,
        default=None,
        help=f"default {DEFAULT_MAX_IMAGE_PIXELS} (official: see --profile)",
    )
    p.add_argument("--max-batch-size", type=int, default=None, help="default 32")
    p.add_argument("--verify", action="store_true", help="run the export through TF's C API and compare with Keras")
    p.set_defaults(func=_cmd_export)
