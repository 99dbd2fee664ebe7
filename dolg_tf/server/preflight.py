"""Checks ``dolg serve`` runs before TensorFlow starts, so a wiring mistake costs one line, not a load.

Imports nothing heavy: a bad version policy or label, a missing base path, a
version directory given in place of its parent or a busy port is reported in
well under a second.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass

from dolg_tf.errors import ServingError
from dolg_tf.export.contract import is_saved_model_dir


@dataclass(frozen=True)
class VersionPolicy:
    """Which versions to serve: TF Serving's ``latest {num_versions}``, ``all {}`` or ``specific {versions}``.

    Args:
        kind: ``"latest"``, ``"all"`` or ``"specific"``.
        num_versions: how many of the newest versions ``latest`` keeps.
        versions: the versions ``specific`` serves.
    """

    kind: str = "latest"
    num_versions: int = 1
    versions: tuple[int, ...] = ()

    @classmethod
    def parse(cls, text: str) -> VersionPolicy:
        """Parses ``latest``, ``latest:N``, ``all`` or ``specific:1,3``."""
        kind, _, arg = text.strip().partition(":")
        try:
            if kind == "latest":
                policy = cls("latest", int(arg) if arg else 1)
                if policy.num_versions < 1:
                    raise ValueError
                return policy
            if kind == "all" and not arg:
                return cls("all")
            if kind == "specific":
                versions = tuple(sorted({int(v) for v in arg.split(",")}))
                if versions and min(versions) >= 0:
                    return cls("specific", versions=versions)
        except ValueError:
            pass
        raise ServingError(f"version policy must be latest, latest:N (N >= 1), all or specific:V1,V2,..., got {text!r}")

    def select(self, available: Sequence[int]) -> set[int]:
        ordered = sorted(available)
        if self.kind == "all":
            return set(ordered)
        if self.kind == "specific":
            return set(ordered) & set(self.versions)
        return set(ordered[-self.num_versions :])


def parse_version_labels(text: str) -> dict[str, int]:
    """Parses ``stable=1,canary=2`` into ``{"stable": 1, "canary": 2}``."""
    labels: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, version = item.partition("=")
        if not sep or not name or not version.strip().isdigit():
            raise ServingError(f"version labels must look like name=VERSION[,name=VERSION], got {item!r} in {text!r}")
        labels[name.strip()] = int(version)
    return labels


def describe_user() -> str:
    return f"the server runs as uid {os.getuid()}" if hasattr(os, "getuid") else "check the file permissions"


def check_port_number(name: str, port: int, allow_disabled: bool = False) -> None:
    """A TCP port, 0 (pick a free one) or, where allowed, -1 (disabled)."""
    if not (-1 if allow_disabled else 0) <= port <= 65535:
        raise ServingError(f"{name} must be a TCP port (0: pick a free one), got {port}")


def check_base_path(base_path: str | os.PathLike) -> str:
    """The absolute base path; refuses a missing path and a version directory given in its place."""
    path = os.path.abspath(os.fspath(base_path))
    if not os.path.isdir(path):
        raise ServingError(f"model base path {path} is not a directory")
    if is_saved_model_dir(path):
        raise ServingError(
            f"model base path {path} looks like a version directory (it holds saved_model.pb): "
            f"pass its parent, --model-base-path {os.path.dirname(path)}"
        )
    return path


def port_in_use_error(what: str, host: str, port: int, flag: str, reason: str = "") -> ServingError:
    """The one-line error for a port another process holds."""
    detail = f" ({reason})" if reason else ""
    return ServingError(
        f"{what} port {port} on {host} is already in use{detail}: stop the process holding it "
        f"or pass another {flag} (0 picks a free port)"
    )


def check_port_free(what: str, host: str, port: int, flag: str) -> None:
    """Binds ``host:port`` once, without SO_REUSEPORT, to see whether another process holds it.

    Port 0 is always free. The real bind happens later (after the model loads,
    as TF Serving opens its ports); that bind is exclusive too, so a race
    between the two is still refused, only later.
    """
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR lets a port in TIME_WAIT count as free (both servers set it);
        # on Linux it never lets two sockets listen on one port.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise port_in_use_error(what, host, port, flag) from None
            raise ServingError(f"cannot bind {what} to {host}:{port}: {err.strerror or err}") from None
