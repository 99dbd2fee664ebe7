"""Command-line flags of ``training/train.py`` and ``dolg train`` (one definition for both)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import signal
import sys

from dolg_tf.config import ModelConfig
from dolg_tf.data.config import DataConfig
from dolg_tf.errors import ConfigError, DolgError
from dolg_tf.training.config import (
    DATA_FORMATS,
    HEADS,
    MIXED_PRECISION,
    OPTIMIZERS,
    SHARED_DATA_FIELDS,
    STRATEGIES,
    TRAIN_PRESETS,
    RunConfig,
    TrainConfig,
    run_config,
    split_overrides,
)

# Flag name -> TrainConfig field, for the flags that override the preset only when given.
_FLAG_FIELDS = (
    "strategy",
    "data",
    "data_format",
    "image_size",
    "batch_size",
    "epochs",
    "steps_per_epoch",
    "lr",
    "optimizer",
    "head",
    "mixed_precision",
    "jit",
    "model_dir",
    "resume",
    "export",
    "seed",
)
# Flags that take --name / --no-name (argparse.BooleanOptionalAction).
_BOOLEAN_FLAGS = ("jit", "resume", "export")

EPILOG = """\
examples:
  python training/train.py --strategy mirrored          # tiny preset, built-in demo data, a few CPU minutes
  python training/train.py --preset resnet101 --data /data/gldv2 --data-format gldv2 --mixed-precision float16
  python training/train.py --resume --model-dir runs/dolg/20250101-120000
  python training/train.py --set lr=0.05 --set model.multi_atrous=false --set data.min_crop_area=0.3

--set takes any field of the train, model or data config, as section.field=value or
field=value when the name is unique; values are JSON (true, 0.1, [6,12,18], "text") or
bare strings. The resolved config is written to <model-dir>/config.json.
"""


# Keyword arguments of the parser of both entry points.
PARSER_KWARGS = dict(
    description="Train DOLG with an ArcFace-family margin head under tf.distribute.",
    epilog=EPILOG,
    formatter_class=argparse.RawDescriptionHelpFormatter,
)


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the training flags to ``parser`` (used by both entry points)."""
    presets = sorted(TRAIN_PRESETS)
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    parser.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default=None,
        help="tf.distribute strategy: mirrored = all local GPUs (one CPU device when there is "
        "none), multiworker = MultiWorkerMirroredStrategy from TF_CONFIG, tpu (untested), "
        "one_device (default: mirrored)",
    )
    parser.add_argument(
        "--preset",
        choices=presets,
        default="tiny",
        help="model + recipe preset: tiny (CPU demo recipe) or resnet50/resnet101 (the paper's "
        "recipe: 512px, SGD 0.01, 100 epochs) (default: tiny)",
    )
    parser.add_argument(
        "--data",
        default=None,
        help="training data: a directory, CSV or TFRecord path/pattern, or 'demo' for the "
        "built-in demo photos (default: demo)",
    )
    parser.add_argument(
        "--data-format", choices=DATA_FORMATS, default=None, help="input format (default: detected from --data)"
    )
    parser.add_argument("--image-size", type=int, default=None, help="side of the square training crops")
    parser.add_argument("--batch-size", type=int, default=None, help="GLOBAL batch size, split over replicas")
    parser.add_argument("--epochs", type=int, default=None, help="number of epochs")
    parser.add_argument("--steps-per-epoch", type=int, default=None, help="steps per epoch (0: examples // batch size)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (linear warm-up, then cosine decay)")
    parser.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default=None,
        help="sgd (momentum 0.9, Nesterov, L2 decay) or adamw (decoupled decay) (default: sgd)",
    )
    parser.add_argument(
        "--head", choices=HEADS, default=None, help="margin head, kept in float32 (default: arcface, s=30, m=0.15)"
    )
    parser.add_argument(
        "--mixed-precision",
        choices=MIXED_PRECISION,
        default=None,
        help="off, float16 (dynamic loss scaling) or bfloat16 (default: off)",
    )
    parser.add_argument(
        "--jit",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compile each replica's forward/backward pass with XLA (default: off)",
    )
    parser.add_argument(
        "--model-dir",
        default=None,
        help="checkpoints, TensorBoard logs, config.json, label map "
        "(default: runs/dolg/<timestamp>; with --resume: the latest run there)",
    )
    parser.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="continue from the latest checkpoint in --model-dir: same step, learning rate and "
        "optimizer state (default: off; without it an existing checkpoint is an error)",
    )
    parser.add_argument(
        "--export",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="export a SavedModel to saved_models/dolg/<next version>/ after training (default: on)",
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: 0)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config field (repeatable), e.g. --set warmup_epochs=2 "
        "--set model.gem_p=4 --set data.min_crop_area=0.3; fields: "
        + ", ".join(f.name for f in dataclasses.fields(TrainConfig)),
    )
    return parser


def resolve_config(args: argparse.Namespace) -> RunConfig:
    """Preset -> flags -> ``--set`` overrides -> one frozen, validated :class:`RunConfig`.

    Raises:
        ConfigError: an unknown preset, field or invalid value.
    """
    sections = {
        "train": [f.name for f in dataclasses.fields(TrainConfig)],
        "model": [f.name for f in dataclasses.fields(ModelConfig)],
        "data": [f.name for f in dataclasses.fields(DataConfig) if f.name not in SHARED_DATA_FIELDS],
    }
    sets = split_overrides(args.overrides, sections)
    flags = {name: getattr(args, name) for name in _FLAG_FIELDS if getattr(args, name, None) is not None}
    preset = sets["train"].pop("preset", args.preset)
    # --set wins over a flag.
    return run_config(preset, model_overrides=sets["model"], data_overrides=sets["data"], **{**flags, **sets["train"]})


def in_flag_terms(message: str) -> str:
    """Rewrites the library's argument names in ``message`` as this command's flags.

    ``resume=True`` becomes ``--resume``, ``jit=False`` ``--no-jit``, ``model_dir``
    ``--model-dir``, and a boolean field without a flag ``--set name=true``. Quoted
    values (``'runs/model_dir'``) are left as they are.
    """
    fields = {f.name for f in dataclasses.fields(TrainConfig)}

    def boolean(match: re.Match) -> str:
        name, value = match.group(1), match.group(2) == "True"
        if name in _BOOLEAN_FLAGS:
            return f"--{'' if value else 'no-'}{name.replace('_', '-')}"
        if name in fields:
            return f"--set {name}={str(value).lower()}"
        return match.group(0)

    def rewrite(text: str) -> str:
        text = re.sub(r"\b([a-z][a-z0-9_]*)=(True|False)\b", boolean, text)
        for name in _FLAG_FIELDS:
            if "_" in name:
                text = re.sub(rf"(?<![-./\w]){name}\b(?!=)", "--" + name.replace("_", "-"), text)
        return text

    # Odd pieces are quoted values (paths): never rewritten.
    pieces = re.split(r"('[^']*')", message)
    return "".join(piece if i % 2 else rewrite(piece) for i, piece in enumerate(pieces))


def run(args: argparse.Namespace) -> int:
    """Trains from parsed flags, prints the summary; returns the exit status."""
    config = resolve_config(args)
    # Imported here, not at the top: this module gives `dolg --help` its flags, and the loop
    # imports TensorFlow and Keras, which take seconds.
    from dolg_tf.training.loop import TrainLoop
    from dolg_tf.training.steps import train

    try:
        loop = TrainLoop(config)
    except ConfigError as err:
        raise ConfigError(in_flag_terms(str(err))) from err
    result = train(loop)
    summary = result.to_dict()
    print(json.dumps(summary, sort_keys=True), flush=True)
    if loop.chief:
        print(_human_summary(result), flush=True)
    if result.interrupted:
        return 128 + int(getattr(signal, result.interrupted))
    return 0


def _human_summary(result) -> str:
    parts = [
        f"trained step {result.step}/{result.total_steps} on {result.replicas} replica(s)",
        f"loss {result.loss:.4f}",
        f"acc {result.accuracy:.3f}",
        f"{result.images_per_s:.1f} images/s",
    ]
    if result.before and result.after:
        parts.append(
            f"held-out demo mAP {result.before['mAP']:.3f} -> {result.after['mAP']:.3f}, "
            f"recall@1 {result.before['recall@1']:.3f} -> {result.after['recall@1']:.3f}"
        )
    elif result.after:
        parts.append(f"held-out demo mAP {result.after['mAP']:.3f}, recall@1 {result.after['recall@1']:.3f}")
    if result.skipped_images:
        parts.append(f"{result.skipped_images} corrupt images skipped")
    parts.append(f"checkpoint {result.checkpoint}")
    if result.export_dir:
        parts.append(f"export {result.export_dir}")
    if result.interrupted:
        parts.append(f"INTERRUPTED by {result.interrupted}")
    return "train: " + "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``training/train.py``."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    parser = add_train_arguments(argparse.ArgumentParser(prog="train.py", **PARSER_KWARGS))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # absl (a line per checkpoint save) and tf.distribute (a line per all-reduce set-up) are chatty
    # at INFO; the trainer logs the strategy and replica count itself.
    for name in ("absl", "tensorflow"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        # Not at the top: dolg_tf.cli imports this module to register `dolg train` (an import cycle).
        from dolg_tf.cli._common import import_tensorflow_quietly

        import_tensorflow_quietly()
        return run(args)
    except DolgError as err:
        print(f"train: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
