"""Lazy package exports: a public name is imported from its module on first use.

Package ``__init__`` modules use this so that importing a light part of the
package (the client, the export contract, ``dolg --help``) does not load
TensorFlow through a heavy sibling.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """The module-level ``__getattr__`` and ``__dir__`` of ``package`` for ``exports``.

    Args:
        package: the package's ``__name__``.
        exports: public name -> the module that defines it: absolute
            (``"dolg_tf.model"``) or relative to ``package`` (``".config"``).

    Returns:
        ``(__getattr__, __dir__)``. ``__getattr__`` imports the defining
        module on first use and caches the value in the package's namespace,
        so later lookups are plain attribute reads; an unknown name raises
        ``AttributeError`` as a module without it would. ``__dir__`` lists the
        package's namespace and every lazy name.
    """
    table = dict(exports)

    def __getattr__(name: str) -> object:
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(table[name], package), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(table))

    return __getattr__, __dir__
