"""Argument types shared by the ``dolg`` subcommands (each raises ``argparse.ArgumentTypeError``)."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def _number(text: str, cast: Callable[[str], float], ok: Callable[[float], bool], expected: str):
    try:
        value = cast(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from err
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, lambda v: v > 0, "a positive integer")


def non_negative_float(text: str) -> float:
    return _number(text, float, lambda v: v >= 0, "a number >= 0")


def positive_float(text: str) -> float:
    return _number(text, float, lambda v: v > 0, "a positive number")


def _positive_list(text: str, cast, what: str) -> tuple:
    try:
        values = tuple(cast(v) for v in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{what} must be comma-separated numbers, got {text!r}") from err
    if not values or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"{what} must be positive, got {text!r}")
    return values


def parse_scales(text: str) -> tuple[float, ...]:
    """``"0.7071,1,1.4142"`` -> positive floats."""
    return _positive_list(text, float, "scales")


def parse_kappas(text: str) -> tuple[int, ...]:
    """``"1,5,10"`` -> positive ints."""
    return _positive_list(text, int, "kappas")
