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

from dolg_tf.cli._common import import_tensorflow_quietly
from dolg_tf.errors import DolgError

# Commands that always run TensorFlow: it is imported up front (see import_tensorflow_quietly).
# ``serve`` imports it itself, after checking its ports and paths (a wiring mistake costs one line).
_TENSORFLOW_COMMANDS = {"convert", "data", "export", "train"}


def _version() -> str:
    """``dolg 0.1.0 (TensorFlow 2.x, Keras 3.x, Python 3.x)``, without importing TensorFlow."""
    from importlib.metadata import PackageNotFoundError, version

    from dolg_tf import __version__

    parts = []
    for dist, name in (("tensorflow", "TensorFlow"), ("keras", "Keras")):
        try:
            parts.append(f"{name} {version(dist)}")
        except PackageNotFoundError:
            parts.append(f"{name} not installed")
    return f"dolg {__version__} ({', '.join(parts)}, Python {sys.version.split()[0]})"


def _describe(parser: argparse.ArgumentParser, module) -> None:
    """A subcommand without a description of its own shows its module's docstring in ``--help``."""
    if not parser.description and module.__doc__:
        parser.description = module.__doc__.strip()
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action.choices.values():
                if not choice.description:
                    command = choice.prog.split()[-1]
                    help_text = next((a.help for a in action._choices_actions if a.dest == command), None)
                    choice.description = help_text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dolg", description="DOLG image retrieval in Keras 3 / TensorFlow.")
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            module = importlib.import_module(f"{__name__}.{info.name}")
            known = set(sub.choices)
            module.register(sub)
            for name in set(sub.choices) - known:
                _describe(sub.choices[name], module)
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
        if args.command in _TENSORFLOW_COMMANDS:
            import_tensorflow_quietly()
        return args.func(args)
    except DolgError as err:
        print(f"dolg {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
