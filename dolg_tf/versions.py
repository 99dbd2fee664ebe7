"""Version directories under a model base path, read the way TF Serving reads them.

A version is a subdirectory named by an integer (ASCII digits only) that holds
``saved_model.pb``; a half-written export (a dot-named temporary directory, or
one without ``saved_model.pb`` yet) is not a version. Shared by the export,
``dolg serve``, the client's in-process transport and the demo; imports nothing
heavy, so the client stays light.
"""

from __future__ import annotations

import os
import re

VERSION_NAME = re.compile(r"[0-9]+")


def complete_versions(base_path: str | os.PathLike) -> list[int]:
    """Complete version numbers under ``base_path``, ascending.

    Raises:
        OSError: ``base_path`` cannot be listed (e.g. it does not exist).
    """
    return sorted(
        int(entry.name)
        for entry in os.scandir(base_path)
        if VERSION_NAME.fullmatch(entry.name) and os.path.isfile(os.path.join(entry.path, "saved_model.pb"))
    )
