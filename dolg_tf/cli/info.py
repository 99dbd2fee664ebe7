"""``dolg info``: print a preset's resolved model config."""

from __future__ import annotations

import argparse


def _cmd_info(args: argparse.Namespace) -> int:
    from dolg_tf.config import model_config

    print(model_config(args.preset).to_json())
    return 0


def register(sub) -> None:
    info = sub.add_parser("info", help="print a preset's resolved model config as JSON")
    info.add_argument("--preset", default="resnet101")
    info.set_defaults(func=_cmd_info)
