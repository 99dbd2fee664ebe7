"""Embeddings files: a float32 ``(N, D)`` ``.npy`` array and, beside it, its ids as JSON.

``dolg embed`` writes them, ``dolg index build`` / ``dolg index search`` and
``dolg evaluate --embeddings`` read them. The layout:

* ``gallery.npy``: numpy's ``.npy`` format, float32, C order, no pickled objects;
* ``gallery.ids.json``: ``{"ids": [...], "count": N, "dim": D, "embeddings": "gallery.npy", ...}``
  (further keys, e.g. the model and version, are free); readers also take a
  plain JSON list or a ``.txt`` file with one id per line.

Files come from users, so a reader trusts nothing in them: the ``.npy`` header
is read and checked (dtype, two dimensions, size against ``max_bytes`` and the
file's length) before the array is allocated, pickled objects are refused
(``allow_pickle=False``), and an ids file is bounded in size before it is read.
Writes are atomic (:func:`dolg_tf.fileio.atomic_write`).

Example:

```python
from dolg_tf import embeddings

embeddings.save("gallery.npy", emb, ids=["a.jpg", "b.jpg"])  # + gallery.ids.json
emb, ids = embeddings.load("gallery.npy")                    # ids from gallery.ids.json
```
"""

from __future__ import annotations

import codecs
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dolg_tf.errors import DataError
from dolg_tf.fileio import atomic_write

#: Largest embeddings array read by default (1M x 2048 float32 is 8 GiB).
DEFAULT_MAX_BYTES = 16 << 30
#: Largest ids file read by default (it is text).
DEFAULT_MAX_IDS_BYTES = 1 << 30
# numpy's own bound on a .npy header; a longer one is refused before it is parsed.
_MAX_HEADER_BYTES = 10_000
_NPY_MAGIC = b"\x93NUMPY"

Id = int | str

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_IDS_BYTES",
    "ids_path_for",
    "load",
    "read_embeddings",
    "read_ids",
    "save",
]


def ids_path_for(path: str | os.PathLike) -> str:
    """The ids file that goes with an embeddings file: ``gallery.npy`` -> ``gallery.ids.json``."""
    path = os.fspath(path)
    stem = path[: -len(".npy")] if path.endswith(".npy") else path
    return stem + ".ids.json"


def _sniff(path: str) -> str:
    """``"npy"``, ``"text"`` (JSON or a list of lines), ``"other"`` or ``"unreadable"``, from the first bytes."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError:
        return "unreadable"
    return _kind(head)


def _kind(head: bytes) -> str:
    if head.startswith(_NPY_MAGIC):
        return "npy"
    if head.startswith(b"PK\x03\x04") or b"\0" in head:  # a zip (.npz) or another binary file
        return "other"
    try:  # not final: a character cut by the 64-byte read is still text
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return "other"
    return "text"


def _check_ids(ids: Sequence[Any], where: str) -> list[Id]:
    ids = list(ids)
    for i, value in enumerate(ids):
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise DataError(f"{where}: id {i} is {value!r}; ids must be integers or strings")
    if len(set(ids)) != len(ids):
        seen: set[Id] = set()
        duplicate = next(v for v in ids if v in seen or seen.add(v))
        raise DataError(f"{where}: the id {duplicate!r} appears more than once; ids must be unique")
    return ids


def read_embeddings(
    path: str | os.PathLike,
    *,
    name: str = "embeddings",
    ids_name: str = "ids",
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> np.ndarray:
    """Reads a 2-D numeric ``.npy`` file as float32, checking its header before allocating.

    Args:
        path: the ``.npy`` file.
        name: what the caller calls this file, used in error messages (e.g. a flag).
        ids_name: what the caller calls the ids file, for the hint when the two are swapped.
        max_bytes: largest array accepted.

    Returns:
        float32 ``(N, D)``.

    Raises:
        DataError: not a ``.npy`` file (a text file gets a hint that it is
            probably the ids), pickled objects, a dtype that is not a number,
            not two dimensions, larger than ``max_bytes``, or shorter than its
            header says.
    """
    path = os.fspath(path)
    expected = "(expected a (N, D) float .npy array)"
    try:
        with open(path, "rb") as f:
            kind = _kind(f.read(64))
    except OSError as err:
        raise DataError(f"cannot read {name} {path!r} {expected}: {err.strerror or err}") from err
    if kind == "text":
        raise DataError(
            f"{name} {path!r} is a text file (an id list?), not a .npy array: {name} takes the (N, D) float .npy "
            f"that `dolg embed` writes (e.g. gallery.npy); the ids file beside it (e.g. gallery.ids.json) "
            f"goes to {ids_name}"
        )
    if kind != "npy":
        raise DataError(f"{name} {path!r} is not a .npy file {expected}")
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f, max_header_size=_MAX_HEADER_BYTES)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(f, max_header_size=_MAX_HEADER_BYTES)
            else:
                raise DataError(f"{name} {path!r}: .npy format version {version} is not supported {expected}")
            data_offset = f.tell()
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read {name} {path!r} {expected}: {err}") from err
    if dtype.hasobject or dtype.kind not in "fiu":
        raise DataError(
            f"{name} {path!r} holds {dtype} values (pickled objects are never loaded); embeddings must be numbers"
        )
    if len(shape) != 2:
        raise DataError(f"{name} {path!r}: embeddings must be a 2-D (N, D) array, got shape {shape}")
    size = math.prod(shape) * dtype.itemsize
    if size > max_bytes:
        raise DataError(f"{name} {path!r}: a {shape} {dtype} array is {size} bytes, over max_bytes={max_bytes}")
    available = os.path.getsize(path) - data_offset
    if available < size:
        raise DataError(
            f"{name} {path!r} is truncated: its header says {shape} {dtype} ({size} bytes) but it holds {available}"
        )
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read {name} {path!r} {expected}: {err}") from err
    return np.ascontiguousarray(arr, dtype=np.float32)


def read_ids(
    path: str | os.PathLike,
    *,
    name: str = "ids",
    embeddings_name: str = "embeddings",
    max_bytes: int = DEFAULT_MAX_IDS_BYTES,
) -> list[Id]:
    """Reads unique ids from ``.json`` (a list of ints or strings, or ``{"ids": [...]}``) or ``.txt`` (one per line).

    Args:
        path: the ids file.
        name: what the caller calls this file, used in error messages (e.g. a flag).
        embeddings_name: what the caller calls the embeddings, for the hint when the two are swapped.
        max_bytes: largest file accepted (checked before reading).

    Raises:
        DataError: a ``.npy`` file given as ids, unreadable, over ``max_bytes``,
            not UTF-8, not valid JSON, not a list of integers or strings, a
            repeated id, or another extension than ``.json`` / ``.txt``.
    """
    return _read_ids_document(os.fspath(path), name, embeddings_name, max_bytes)[0]


def _read_ids_document(path: str, name: str, embeddings_name: str, max_bytes: int) -> tuple[list[Id], dict]:
    """The ids of an ids file, and its other JSON keys (empty for a list or a ``.txt`` file)."""
    meta: dict = {}
    if _sniff(path) == "npy":
        raise DataError(
            f"{name} {path!r} is a .npy array (the embeddings?), not an id list: the .npy goes to {embeddings_name}, "
            f"and {name} takes a .json list or a .txt file of ids (e.g. gallery.ids.json)"
        )
    try:
        if os.path.getsize(path) > max_bytes:
            raise DataError(f"{name} {path!r} is larger than {max_bytes} bytes")
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as err:
        raise DataError(f"cannot read ids {path!r}: {err.strerror or err}") from err
    except UnicodeDecodeError as err:
        raise DataError(
            f"{name} {path!r} is not UTF-8 text: ids are a .json list or a .txt file, one id per line"
        ) from err
    if path.endswith(".json"):
        try:
            ids = json.loads(text)
        except ValueError as err:
            raise DataError(f"{path!r} is not valid JSON: {err}") from err
        if isinstance(ids, dict) and "ids" in ids:
            meta, ids = ids, ids["ids"]
        if not isinstance(ids, list) or not all(isinstance(i, (int, str)) and not isinstance(i, bool) for i in ids):
            raise DataError(f"{path!r}: expected a JSON list of integers or strings")
    elif path.endswith(".txt"):
        ids = [line for line in text.splitlines() if line]
    else:
        raise DataError(f"{path!r}: ids must be a .json or .txt file")
    return ids, meta


def load(
    path: str | os.PathLike,
    ids_path: str | os.PathLike | None = None,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> tuple[np.ndarray, list[Id]]:
    """Reads an embeddings file and its ids, checking that they match.

    Args:
        path: the ``.npy`` file.
        ids_path: its ids (default: :func:`ids_path_for`, ``<stem>.ids.json``).
        max_bytes: largest array accepted.

    Returns:
        ``(embeddings, ids)``: float32 ``(N, D)`` and N unique ids.

    Raises:
        DataError: either file is invalid (see :func:`read_embeddings`,
            :func:`read_ids`), or the ids file does not describe the array
            (another count, or another ``dim``).
    """
    ids_path = ids_path_for(path) if ids_path is None else os.fspath(ids_path)
    emb = read_embeddings(path, max_bytes=max_bytes)
    ids, meta = _read_ids_document(ids_path, "ids", "embeddings", DEFAULT_MAX_IDS_BYTES)
    ids = _check_ids(ids, ids_path)
    if len(ids) != emb.shape[0]:
        raise DataError(
            f"{ids_path!r} holds {len(ids)} ids but {os.fspath(path)!r} holds {emb.shape[0]} embeddings; "
            "they must come from the same run"
        )
    if "dim" in meta and meta["dim"] != emb.shape[1]:
        raise DataError(
            f"{ids_path!r} says dim={meta['dim']!r} but {os.fspath(path)!r} holds {emb.shape[1]}-d embeddings; "
            "they must come from the same run"
        )
    return emb, ids


def save(
    path: str | os.PathLike,
    embeddings: np.ndarray,
    ids: Sequence[Id] | None = None,
    *,
    ids_path: str | os.PathLike | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> str | None:
    """Writes ``embeddings`` as float32 ``.npy`` and, with ``ids``, the ids JSON beside it, each atomically.

    Args:
        path: the ``.npy`` file to write (must end in ``.npy``).
        embeddings: ``(N, D)`` numbers.
        ids: N unique integers or strings; None: no ids file.
        ids_path: where the ids go (default: :func:`ids_path_for`).
        metadata: further JSON keys of the ids file (e.g. ``model``, ``version``);
            ``ids``, ``count``, ``dim`` and ``embeddings`` are written by this function.

    Returns:
        The ids file's path, or None without ``ids``.

    Raises:
        DataError: ``path`` is not a ``.npy`` name, the array is not 2-D numbers,
            or the ids are not N unique integers or strings.
    """
    path = os.fspath(path)
    if not path.endswith(".npy"):
        raise DataError(f"an embeddings file must be named *.npy, got {path!r}")
    arr = np.asarray(embeddings)
    if arr.ndim != 2 or arr.dtype.kind not in "fiu":
        raise DataError(f"embeddings must be a 2-D (N, D) array of numbers, got {arr.dtype} {arr.shape}")
    ids_file = None
    if ids is not None:
        ids = _check_ids(ids, "ids")
        if len(ids) != arr.shape[0]:
            raise DataError(f"{len(ids)} ids for {arr.shape[0]} embeddings; give one id per row")
        ids_file = ids_path_for(path) if ids_path is None else os.fspath(ids_path)
        reserved = {"ids", "count", "dim", "embeddings"} & set(metadata or {})
        if reserved:
            raise DataError(f"metadata must not set {', '.join(sorted(reserved))} (written from the array and ids)")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    atomic_write(path, lambda f: np.save(f, arr, allow_pickle=False))
    if ids_file is not None:
        meta = {
            "ids": ids,
            "count": len(ids),
            "dim": int(arr.shape[1]),
            **(metadata or {}),
            "embeddings": os.path.basename(path),
        }
        atomic_write(ids_file, lambda f: f.write(json.dumps(meta, indent=1).encode()))
    return ids_file
