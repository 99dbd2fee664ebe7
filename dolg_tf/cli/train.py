"""``dolg train``: the training entry point (same flags as ``training/train.py``)."""

from __future__ import annotations

import argparse
import logging

from dolg_tf.training.cli import PARSER_KWARGS, add_train_arguments, run


def _cmd_train(args: argparse.Namespace) -> int:
    # The dolg CLI logs warnings only unless -v; training's progress lines are INFO and always wanted.
    logging.getLogger("dolg_tf.training").setLevel(logging.WARNING if args.quiet else logging.INFO)
    return run(args)


def register(sub) -> None:
    parser = sub.add_parser(
        "train", help="train DOLG with a margin head under tf.distribute (default: the built-in demo)", **PARSER_KWARGS
    )
    add_train_arguments(parser).set_defaults(func=_cmd_train)
