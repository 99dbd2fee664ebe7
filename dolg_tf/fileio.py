"""Atomic local file writes: a temporary file in the target's folder, fsync, then ``os.replace``.

A reader sees the old file or the new one, never half of one; a failed write
leaves no temporary file behind. A process killed while writing (SIGKILL, a
power cut) cannot clean up after itself, so each temporary file carries its
writer's process id in its name (``.<name>.<host>-<pid>.<random>.tmp``), and
the next write of the same target removes the temporaries whose writer is gone.
The new file gets the permissions an ordinary ``open(path, "w")`` would give
it: those of the file it replaces, else ``0o666`` less the process umask
(``tempfile.mkstemp`` alone would leave every artefact ``0o600``, unreadable
by a server running as another user).

Imports nothing heavy (the client and the index use it). A path with a URI
scheme (``gs://``, ``s3://``, ``ram://``, ...) is written through
``tf.io.gfile`` instead, imported only then: a temporary object in the same
folder, renamed over the target (on object stores a copy, not atomic, but a
reader never sees a half-written object).
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import stat
import tempfile
import threading
import time
import uuid
import zlib
from collections.abc import Callable
from typing import IO, Any

log = logging.getLogger(__name__)

# A temporary file whose writer cannot be checked (another host, a name without a pid, or a
# pid that a new process may have taken) counts as abandoned after this long without a change.
STALE_SECONDS = 24 * 3600.0

_HOST_TAG = f"{zlib.crc32(socket.gethostname().encode('utf-8', 'replace')):08x}"
_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux ``/proc``)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_lock:  # os.umask can only be read by setting it
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    except OSError:
        return True  # cannot tell: keep the file
    return True


def remove_stale_temporaries(path: str | os.PathLike) -> list[str]:
    """Removes temporary files that killed writers left next to ``path``; returns their paths.

    Only temporaries of this target are considered, and only those whose writer
    is gone: a process id from this host that no longer runs, or no
    modification for :data:`STALE_SECONDS` (another host's writer, a name
    without a process id, a process id taken again by a new process).
    A concurrent writer's temporary file is never touched.
    """
    path = os.path.abspath(os.fspath(path))
    folder, name = os.path.split(path)
    prefix = f".{name}."
    ours = re.compile(re.escape(prefix) + r"([0-9a-f]{8})-(\d+)\.[A-Za-z0-9_]+\.tmp\Z")
    legacy = re.compile(re.escape(prefix) + r"[a-z0-9_]{8}\Z")  # tempfile.mkstemp's default names
    removed = []
    try:
        entries = [e for e in os.scandir(folder) if e.name.startswith(prefix)]
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        match = ours.match(entry.name)
        if match is None and not legacy.match(entry.name):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISREG(info.st_mode):
            continue
        if match is not None and match.group(1) == _HOST_TAG:
            pid = int(match.group(2))
            abandoned = pid != os.getpid() and not _pid_alive(pid)
        else:
            abandoned = False
        abandoned = abandoned or now - info.st_mtime > STALE_SECONDS
        if abandoned:
            try:
                os.unlink(entry.path)
            except OSError:
                continue
            removed.append(entry.path)
            log.info("removed %s, a temporary file left by an interrupted write of %s", entry.path, path)
    return removed


def is_uri(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a file through a URI scheme (``gs://...``) rather than a local path."""
    return "://" in os.fspath(path)


def _atomic_write_uri(path: str, write: Callable[[IO[bytes]], Any]) -> str:
    import tensorflow as tf  # only for URIs: local writes stay free of TensorFlow

    folder, name = path.rsplit("/", 1)
    tf.io.gfile.makedirs(folder)
    tmp = f"{folder}/.{name}.{_HOST_TAG}-{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with tf.io.gfile.GFile(tmp, "wb") as f:
            write(f)
        tf.io.gfile.rename(tmp, path, overwrite=True)
    except BaseException:
        if tf.io.gfile.exists(tmp):
            tf.io.gfile.remove(tmp)
        raise
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> str:
    """Calls ``write(f)`` on a binary temporary file, then renames it to ``path``; returns ``path``.

    The file's permissions are those of the file it replaces, or ``0o666``
    less the umask for a new file. Temporaries of ``path`` left by killed
    writers are removed first (see :func:`remove_stale_temporaries`).
    A URI (``gs://bucket/x.json``; see :func:`is_uri`) is written through
    ``tf.io.gfile``: a temporary object beside it, then a rename.
    """
    path = os.fspath(path)
    if is_uri(path):
        return _atomic_write_uri(path, write)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    remove_stale_temporaries(path)
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        mode = 0o666 & ~current_umask()
    fd, tmp = tempfile.mkstemp(
        prefix=f".{os.path.basename(path)}.{_HOST_TAG}-{os.getpid()}.", suffix=".tmp", dir=folder
    )
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
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
