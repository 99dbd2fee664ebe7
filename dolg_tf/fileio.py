"""Atomic local file writes: a temporary file in the target's folder, fsync, then ``os.replace``.

A reader sees the old file or the new one, never half of one; a failed write
leaves no temporary file behind. Imports nothing heavy (the client and the
index use it). Remote (``gs://``) paths go through ``tf.io.gfile`` in the data
module instead.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from typing import IO, Any


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> str:
    """Calls ``write(f)`` on a binary temporary file, then renames it to ``path``; returns ``path``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_json(path: str | os.PathLike, payload: Any, **dump_options: Any) -> str:
    """``payload`` as JSON (UTF-8), written atomically; ``dump_options`` go to ``json.dumps``."""
    data = json.dumps(payload, **dump_options).encode("utf-8")
    return atomic_write(path, lambda f: f.write(data))
