"""The ``dolg`` command.

Each subcommand lives in its own module of this package and exposes
``register(subparsers)``, which adds its parser and sets ``func`` to the
handler. Modules are discovered here (names starting with ``_`` are helpers),
so adding a subcommand never edits this file. Handlers import heavy
libraries (TensorFlow, Keras) lazily, so ``dolg --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import sys

from dolg_tf.errors import DolgError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dolg", description="DOLG image retrieval in Keras 3 / TensorFlow.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # A subcommand that sets pass_through=True (embed-batch: Beam's options) gets the
    # flags it does not know as args.extra_args; any other refuses them as usual.
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "pass_through", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra_args = extra
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        return args.func(args)
    except DolgError as err:
        print(f"dolg {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
