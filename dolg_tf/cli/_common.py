"""Helpers shared by the ``dolg`` subcommands."""

from __future__ import annotations

import argparse


def parse_scales(text: str) -> tuple[float, ...]:
    try:
        scales = tuple(float(s) for s in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"scales must be comma-separated numbers, got {text!r}") from err
    if not scales or any(s <= 0 for s in scales):
        raise argparse.ArgumentTypeError(f"scales must be positive, got {text!r}")
    return scales
