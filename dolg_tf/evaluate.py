"""Retrieval metrics and the Revisited Oxford / Paris and GLDv2 protocols, pure numpy.

Importing this module never imports TensorFlow, Keras or :mod:`dolg_tf.model`
(Pillow is imported only to read images). Embeddings come from a caller's
``embed_fn``, so the same evaluation runs on an in-process model, a
SavedModel or a TF Serving client.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import logging
import os
import pickle
import pickletools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dolg_tf.errors import ConfigError, DataError, InputShapeError

logger = logging.getLogger(__name__)


def rank_by_similarity(queries: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """Gallery indices sorted by descending inner product, shape (num_queries, num_gallery)."""
    queries, gallery = np.asarray(queries, np.float32), np.asarray(gallery, np.float32)
    if queries.ndim != 2 or gallery.ndim != 2 or queries.shape[1] != gallery.shape[1]:
        raise InputShapeError(f"need (Q, D) queries and (N, D) gallery, got {queries.shape} and {gallery.shape}")
    # A stable sort keeps ties in gallery order, so results are reproducible.
    return np.argsort(-(queries @ gallery.T), axis=1, kind="stable")


def label_retrieval_metrics(
    ranks: np.ndarray, query_labels: np.ndarray, gallery_labels: np.ndarray, ks=(1, 5)
) -> dict[str, float]:
    """mAP (non-interpolated, over all positives) and recall@k for label-defined relevance.

    Queries with no positive in the gallery are left out of every mean.
    """
    ranks = np.asarray(ranks)
    relevant = np.asarray(gallery_labels)[ranks] == np.asarray(query_labels)[:, None]
    has_pos = relevant.any(axis=1)
    if not has_pos.any():
        raise InputShapeError("no query has a positive in the gallery")
    relevant = relevant[has_pos]
    hits = np.cumsum(relevant, axis=1)
    positions = np.arange(1, relevant.shape[1] + 1)
    ap = (relevant * hits / positions).sum(axis=1) / relevant.sum(axis=1)
    out = {"mAP": float(ap.mean()), "num_queries": int(has_pos.sum())}
    for k in ks:
        out[f"recall@{k}"] = float(relevant[:, :k].any(axis=1).mean())
    return out


# ---------------------------------------------------------------------------
# Revisited Oxford / Paris (Radenović et al., CVPR 2018): the revisitop protocol
# ---------------------------------------------------------------------------

SETUPS = ("easy", "medium", "hard")
REVISITED_DATASETS = ("roxford5k", "rparis6k")
_GND_MAX_BYTES = 64 << 20  # the official ground-truth files are well under 1 MB


def _id_array(values: Any, what: str) -> np.ndarray:
    try:
        return np.asarray(values if values is not None else [], dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as err:
        raise DataError(f"gnd {what!r} must be a list of integer indices: {err}") from err


def compute_map(
    ranks: np.ndarray, gnd: Sequence[Mapping[str, Any]], kappas: Sequence[int] = (1, 5, 10)
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """Mean average precision and mean precision@k, exactly as revisitop's ``compute_map``.

    For each query, the database images listed in ``gnd[i]["junk"]`` are
    removed from its ranking (each positive moves up by the number of junk
    images ranked before it); AP is the trapezoid rule over the positives'
    ranks: for the j-th positive (0-based) at rank r (0-based, junk removed),
    ``(p0 + p1) / 2 / n_ok`` with ``p0 = 1 if r == 0 else j / r`` and
    ``p1 = (j + 1) / (r + 1)``, where ``n_ok = len(gnd[i]["ok"])`` also counts
    positives missing from a truncated ranking. Precision@k uses
    ``kq = min(last positive's 1-based rank, k)`` and ``#(ranks <= kq) / kq``.
    A query without positives gets AP and P@k NaN and is left out of the
    means. Sums run in query order, so the results equal revisitop's
    bit-for-bit.

    Beyond the reference (which raises there): a query whose positives are
    all missing from a truncated ranking gets AP 0 and P@k 0, and if no query
    has positives the means are NaN.

    Args:
        ranks: int ``(db_size, num_queries)`` 0-based database indices, best
            first, one column per query (revisitop's layout; the transpose of
            :func:`rank_by_similarity`'s output). Fewer rows than the database
            (a truncated ranking) is allowed.
        gnd: one mapping per query with ``"ok"`` (positive database indices)
            and optionally ``"junk"`` (indices to ignore).
        kappas: the k of mP@k.

    Returns:
        ``(mAP, APs, mP@k, P@k)``: float, float64 ``(num_queries,)``,
        float64 ``(len(kappas),)``, float64 ``(num_queries, len(kappas))``.
    """
    ranks = np.asarray(ranks)
    if ranks.ndim != 2 or ranks.dtype.kind not in "iu":
        raise InputShapeError(
            f"ranks must be a 2-D integer array (db_size, num_queries), got {ranks.dtype} {ranks.shape}"
        )
    nq = len(gnd)
    if ranks.shape[1] != nq:
        raise InputShapeError(
            f"ranks must have one column per query: {nq} queries in gnd but ranks of shape {ranks.shape} "
            "(revisitop layout is (db_size, num_queries); transpose a (num_queries, db_size) ranking)"
        )
    kappas = tuple(int(k) for k in kappas)
    if any(k <= 0 for k in kappas):
        raise ConfigError(f"kappas must be positive integers, got {kappas}")
    aps = np.zeros(nq)
    prs = np.zeros((nq, len(kappas)))
    empty = np.zeros(nq, bool)
    for i in range(nq):
        ok = _id_array(gnd[i].get("ok"), "ok")
        if ok.shape[0] == 0:
            aps[i] = np.nan
            prs[i] = np.nan
            empty[i] = True
            continue
        junk = _id_array(gnd[i].get("junk"), "junk")
        column = ranks[:, i]
        pos = np.flatnonzero(np.isin(column, ok))
        if junk.size:
            # Junk ranked strictly before a positive shifts it up by one.
            pos = pos - np.searchsorted(np.flatnonzero(np.isin(column, junk)), pos, side="left")
        j = np.arange(pos.shape[0])
        p0 = np.ones(pos.shape[0])
        np.divide(j, pos, out=p0, where=pos != 0)
        p1 = (j + 1) / (pos + 1)
        terms = (p0 + p1) * (1.0 / ok.shape[0]) / 2.0
        # cumsum adds left to right like the reference loop (np.sum's pairwise order differs in the last bit).
        aps[i] = np.cumsum(terms)[-1] if terms.size else 0.0
        if pos.size:
            pos1 = pos + 1
            for c, k in enumerate(kappas):
                kq = min(int(pos1.max()), k)
                prs[i, c] = (pos1 <= kq).sum() / kq
    valid = ~empty
    count = int(valid.sum())
    if count == 0:
        return float("nan"), aps, np.full(len(kappas), np.nan), prs
    mean_ap = float(np.cumsum(aps[valid])[-1] / count)
    mean_pr = np.cumsum(prs[valid], axis=0)[-1] / count if kappas else np.zeros(0)
    return mean_ap, aps, mean_pr, prs


def revisited_gnd(gnd: Sequence[Mapping[str, Any]], setup: str) -> list[dict[str, np.ndarray]]:
    """The ``ok``/``junk`` ground truth of one revisited setup.

    easy: ok = easy, junk = junk + hard; medium: ok = easy + hard, junk = junk;
    hard: ok = hard, junk = junk + easy.

    Args:
        gnd: per query, mappings with ``"easy"``, ``"hard"`` and ``"junk"`` index lists.
        setup: ``"easy"``, ``"medium"`` or ``"hard"``.
    """
    parts = {
        "easy": (("easy",), ("junk", "hard")),
        "medium": (("easy", "hard"), ("junk",)),
        "hard": (("hard",), ("junk", "easy")),
    }
    if setup not in parts:
        raise ConfigError(f"setup must be one of {SETUPS}, got {setup!r}")
    ok_keys, junk_keys = parts[setup]
    return [
        {
            "ok": np.concatenate([_id_array(g.get(key), key) for key in ok_keys]),
            "junk": np.concatenate([_id_array(g.get(key), key) for key in junk_keys]),
        }
        for g in gnd
    ]


def revisited_map(
    ranks: np.ndarray, gnd: Sequence[Mapping[str, Any]], kappas: Sequence[int] = (1, 5, 10)
) -> dict[str, dict[str, float]]:
    """Easy / Medium / Hard mAP and mP@k of a ranking (revisitop's ``example_evaluate``).

    Args:
        ranks: int ``(db_size, num_queries)``, see :func:`compute_map`.
        gnd: per query, ``"easy"``, ``"hard"``, ``"junk"`` index lists.
        kappas: the k of mP@k.

    Returns:
        ``{"easy": {"mAP": ..., "mP@1": ..., ...}, "medium": {...}, "hard": {...}}``
        with fractions in [0, 1] (revisitop prints them x100).
    """
    out = {}
    for setup in SETUPS:
        mean_ap, _, mean_pr, _ = compute_map(ranks, revisited_gnd(gnd, setup), kappas)
        out[setup] = {"mAP": mean_ap, **{f"mP@{k}": float(p) for k, p in zip(kappas, mean_pr)}}
    return out


def ranks_from_embeddings(query_embeddings: np.ndarray, db_embeddings: np.ndarray) -> np.ndarray:
    """revisitop-layout ranking ``(db_size, num_queries)`` by descending inner product (stable ties)."""
    return np.ascontiguousarray(rank_by_similarity(query_embeddings, db_embeddings).T)


# Bounds on the work a ground-truth pickle may ask for, checked on its opcodes before anything is
# built. The official files: ~5-6k image names, 70 queries, nesting depth ~10, a few dozen KB.
_GND_MAX_DEPTH = 48  # containers inside containers (a numpy array counts ~6 levels)
_GND_MAX_MEMO = 1 << 20  # memo entries, and the largest memo index (the C unpickler sizes its table by it)
_GND_EXPANSION = 8  # a fully expanded object may weigh this many times the file ...
_GND_EXPANSION_SLACK = 1 << 20  # ... plus this much


class _Node:
    """One object of a pickle under inspection: its expanded weight and depth, and whether it is shared."""

    __slots__ = ("weight", "depth", "shared")

    def __init__(self, weight: int, depth: int):
        self.weight, self.depth, self.shared = weight, depth, False


def _check_pickle_bounds(raw: bytes, path: str) -> None:
    """Refuses a pickle whose objects would expand far beyond its size ("billion laughs").

    Pickle can refer to an object again through its memo, so a few hundred
    bytes can describe a list holding two references to a list holding two
    references to ... : 2**30 leaves, which reading, validating or printing
    expands. The opcodes are walked once, without building anything, keeping
    for each object its expanded weight (1 per object plus the length of
    every string, counted again at every reference) and its nesting depth.
    The file is refused when any object weighs more than
    ``_GND_EXPANSION * len(raw) + _GND_EXPANSION_SLACK``, nests deeper than
    ``_GND_MAX_DEPTH``, uses more than ``_GND_MAX_MEMO`` memo slots, or
    changes an object after referring to it a second time (which would make
    the weights already counted stale; a pickler never does that except for
    self-referencing objects, which a ground truth has none of). The walk is
    linear in the file's size.

    Raises:
        DataError: over a bound, or not a well-formed pickle.
    """
    budget = _GND_EXPANSION * len(raw) + _GND_EXPANSION_SLACK
    mark = object()
    stack: list[Any] = []  # _Node and mark
    memo: dict[int, _Node] = {}
    in_place = {"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"}

    def refuse(why: str) -> DataError:
        return DataError(f"{path!r} is refused as a ground-truth file: {why}")

    def pop_to_mark() -> list[_Node]:
        for k in range(len(stack) - 1, -1, -1):
            if stack[k] is mark:
                items = stack[k + 1 :]
                del stack[k:]
                return items
        raise refuse("malformed pickle (no MARK on the stack)")

    def pop() -> _Node:
        if not stack or stack[-1] is mark:
            raise refuse("malformed pickle (stack underflow)")
        return stack.pop()

    def check(node: _Node) -> _Node:
        if node.weight > budget:
            raise refuse(
                f"its objects expand to over {budget} units from {len(raw)} bytes "
                "(shared references nested into an exponential structure)"
            )
        if node.depth > _GND_MAX_DEPTH:
            raise refuse(f"objects nested deeper than {_GND_MAX_DEPTH} levels")
        return node

    try:
        for opcode, arg, _ in pickletools.genops(raw):
            name = opcode.name
            if name == "STOP":
                break
            if name in ("PROTO", "FRAME"):
                continue
            if name == "MARK":
                stack.append(mark)
            elif name == "POP":
                if stack and stack[-1] is mark:
                    stack.pop()
                else:
                    pop()
            elif name == "POP_MARK":
                pop_to_mark()
            elif name == "DUP":
                top = pop()
                top.shared = True
                stack += [top, top]
            elif name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                index = len(memo) if name == "MEMOIZE" else int(arg)
                if index >= _GND_MAX_MEMO or len(memo) >= _GND_MAX_MEMO:
                    raise refuse(f"memo index {index} is over the limit of {_GND_MAX_MEMO}")
                if not stack or stack[-1] is mark:
                    raise refuse("malformed pickle (memo of an empty stack)")
                memo[index] = stack[-1]
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                node = memo.get(int(arg))
                if node is None:
                    raise refuse(f"malformed pickle (memo index {arg} was never stored)")
                node.shared = True
                stack.append(node)
            else:
                before = opcode.stack_before
                popped: list[_Node] = []
                if pickletools.markobject in before:
                    popped = pop_to_mark()
                    for _ in range(before.index(pickletools.markobject)):
                        popped.insert(0, pop())
                else:
                    for _ in range(len(before)):
                        popped.insert(0, pop())
                own = 1 + (len(arg) if isinstance(arg, (str, bytes, bytearray)) else 0)
                if name in in_place and popped:
                    target, added = popped[0], popped[1:]
                    if target.shared:
                        raise refuse(f"{name} changes an object after it was referred to again")
                    target.weight += own + sum(n.weight for n in added)
                    target.depth = max([target.depth] + [n.depth + 1 for n in added])
                    stack.append(check(target))
                else:
                    depth = 1 + max((n.depth for n in popped), default=0)
                    node = check(_Node(own + sum(n.weight for n in popped), depth))
                    stack += [node] * len(opcode.stack_after)
    except DataError:
        raise
    except ValueError as err:  # pickletools: unknown opcode, truncated argument, ...
        raise refuse(f"malformed pickle: {err}") from err


class _GroundTruthUnpickler(pickle.Unpickler):
    """Unpickles only plain containers, numbers, strings and numpy arrays.

    Plain ``dict``/``list``/``tuple``/``str``/``int``/``float`` need no global
    lookup at all; the only globals allowed are the ones numpy uses to
    rebuild an array or a scalar, and ``_codecs.encode`` (bytes in protocol 2).
    Anything else (the way a malicious pickle runs code) raises. Run it after :func:`_check_pickle_bounds`.
    """

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        # Protocol 5 rebuilds an array from its buffer (a copy; object dtypes are refused by numpy).
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        # Protocol-2 pickles (Python 2 era) spell bytes as _codecs.encode(str, "latin1").
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a ground-truth file")
        if module == "numpy":
            return getattr(np, name)
        if module == "_codecs":
            import _codecs

            return _codecs.encode
        import importlib

        submodule = module.rsplit(".", 1)[1]  # numpy 2 moved numpy.core to numpy._core
        for candidate in (f"numpy._core.{submodule}", f"numpy.core.{submodule}"):
            try:
                return getattr(importlib.import_module(candidate), name)
            except (ImportError, AttributeError):
                continue
        raise pickle.UnpicklingError(f"numpy has no {module}.{name}")


def read_ground_truth(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a revisitop ground-truth file, ``gnd_<dataset>.pkl`` or a ``.json`` conversion of it.

    The official files are pickles. Unpickling runs code named by the file,
    so a ``.pkl`` is read with a restricted unpickler that accepts only
    dicts, lists, tuples, strings, numbers and numpy arrays and fails on
    anything else. A ``.json`` file with the same keys is read as JSON.

    Returns:
        ``{"imlist": [str], "qimlist": [str], "gnd": [{"bbx": (x1, y1, x2, y2)
        or None, "easy", "hard", "junk": int64 arrays}]}``, validated: every
        index is inside ``imlist``.

    Raises:
        DataError: missing, oversized, unsafe or malformed file.
    """
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        if size > _GND_MAX_BYTES:
            raise DataError(f"{path!r} is {size} bytes; a ground-truth file is expected under {_GND_MAX_BYTES}")
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as err:
        raise DataError(f"cannot read ground truth {path!r}: {err.strerror or err}") from err
    if not path.endswith(".json"):
        _check_pickle_bounds(raw, path)
    try:
        if path.endswith(".json"):
            data = json.loads(raw.decode("utf-8"))
        else:
            # latin1: the revisitop files may come from Python 2 (byte strings).
            data = _GroundTruthUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except (pickle.UnpicklingError, ValueError, EOFError, UnicodeDecodeError, TypeError, AttributeError) as err:
        raise DataError(f"{path!r} is not a valid revisitop ground-truth file: {err}") from err
    return _validate_ground_truth(data, path)


def _names(values: Any, key: str, path: str) -> list[str]:
    if not isinstance(values, (list, tuple, np.ndarray)):
        raise DataError(f"{path!r}: {key!r} must be a list of image names, got {type(values).__name__}")
    names = []
    for i, name in enumerate(values):
        if isinstance(name, bytes):
            name = name.decode("latin1")
        if not isinstance(name, str):
            raise DataError(f"{path!r}: {key}[{i}] must be an image name (a string), got {type(name).__name__}")
        names.append(name)
    return names


def _validate_ground_truth(data: Any, path: str) -> dict[str, Any]:
    if not isinstance(data, Mapping) or not all(key in data for key in ("imlist", "qimlist", "gnd")):
        raise DataError(f"{path!r}: expected a dict with 'imlist', 'qimlist' and 'gnd'")
    imlist = _names(data["imlist"], "imlist", path)
    qimlist = _names(data["qimlist"], "qimlist", path)
    if len(data["gnd"]) != len(qimlist):
        raise DataError(f"{path!r}: {len(qimlist)} queries but {len(data['gnd'])} ground-truth entries")
    gnd = []
    for i, g in enumerate(data["gnd"]):
        if not isinstance(g, Mapping):
            raise DataError(f"{path!r}: gnd[{i}] is not a dict")
        entry: dict[str, Any] = {}
        for key in ("easy", "hard", "junk"):
            try:
                ids = np.asarray(g.get(key, []), dtype=np.int64).reshape(-1)
            except (TypeError, ValueError) as err:
                raise DataError(f"{path!r}: gnd[{i}][{key!r}] is not a list of indices") from err
            if ids.size and (ids.min() < 0 or ids.max() >= len(imlist)):
                raise DataError(f"{path!r}: gnd[{i}][{key!r}] has index {int(ids.max())} outside 0..{len(imlist) - 1}")
            entry[key] = ids
        bbx = g.get("bbx")
        if bbx is not None:
            try:
                bbx = tuple(float(v) for v in np.asarray(bbx, dtype=np.float64).reshape(-1))
            except (TypeError, ValueError) as err:
                raise DataError(f"{path!r}: gnd[{i}]['bbx'] is not 4 numbers") from err
            if len(bbx) != 4 or not bbx[0] < bbx[2] or not bbx[1] < bbx[3]:
                raise DataError(f"{path!r}: gnd[{i}]['bbx'] must be (x1, y1, x2, y2) with x1 < x2, y1 < y2, got {bbx}")
        entry["bbx"] = bbx
        gnd.append(entry)
    return {"imlist": imlist, "qimlist": qimlist, "gnd": gnd}


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


@dataclass(frozen=True)
class RevisitedDataset:
    """A revisitop-layout dataset: Revisited Oxford or Paris, or one of your own in the same layout.

    ``<root>/<name>/jpg/<image>.jpg`` and ``<root>/<name>/gnd_<name>.pkl``
    (or ``gnd_<name>.json``). An image name that already ends with an image
    suffix (``.jpg``, ``.png``, ...) is used as is; otherwise ``.jpg`` is
    appended, as in revisitop. Load with :func:`load_revisited`.
    """

    name: str
    directory: Path
    imlist: list[str]
    qimlist: list[str]
    gnd: list[dict[str, Any]]

    def _path(self, name: str) -> Path:
        return self.directory / "jpg" / (name if name.lower().endswith(IMAGE_SUFFIXES) else f"{name}.jpg")

    def image_path(self, i: int) -> Path:
        return self._path(self.imlist[i])

    def query_path(self, i: int) -> Path:
        return self._path(self.qimlist[i])


def load_revisited(root: str | os.PathLike, dataset: str) -> RevisitedDataset:
    """Reads the ground truth of ``roxford5k``, ``rparis6k`` or a dataset of your own under ``root``.

    ``gnd_<dataset>.json`` is preferred when present (no unpickling at all);
    otherwise ``gnd_<dataset>.pkl`` (the revisitop download) is read with
    :func:`read_ground_truth`. Any folder name is accepted for a dataset of
    your own in the same layout (see :class:`RevisitedDataset`).

    Raises:
        ConfigError: ``dataset`` is not a plain folder name.
        DataError: no ground-truth file, or a malformed one.
    """
    name = dataset.lower() if dataset.lower() in REVISITED_DATASETS else dataset
    if not name or name in (".", "..") or any(c in name for c in "/\\\0") or name != name.strip():
        raise ConfigError(f"dataset must be a folder name such as {REVISITED_DATASETS[0]!r}, got {dataset!r}")
    directory = Path(root) / name
    candidates = [directory / f"gnd_{name}.json", directory / f"gnd_{name}.pkl"]
    gnd_path = next((p for p in candidates if p.is_file()), None)
    if gnd_path is None:
        origin = "the revisitop download" if name in REVISITED_DATASETS else "a revisitop-format pickle"
        raise DataError(
            f"no ground truth for dataset {name!r}: expected {os.path.abspath(candidates[0])} "
            f"(JSON, schema in docs/evaluation.md) or {os.path.abspath(candidates[1])} ({origin})"
        )
    data = read_ground_truth(gnd_path)
    return RevisitedDataset(name, directory, data["imlist"], data["qimlist"], data["gnd"])


def load_image(
    path: str | os.PathLike,
    bbox: Sequence[float] | None = None,
    max_side: int | None = None,
    max_pixels: int = 89_478_485,
) -> np.ndarray:
    """RGB uint8 ``(H, W, 3)`` pixels of an image file, optionally cropped and shrunk.

    Args:
        path: image file.
        bbox: ``(x1, y1, x2, y2)`` crop in pixels, applied with PIL's
            ``Image.crop`` (coordinates rounded), as revisitop crops queries.
        max_side: if set, shrink (never enlarge) so the longer side is at most
            this, after cropping, keeping the aspect ratio (bilinear).
        max_pixels: refuse larger images before decoding them (decompression
            bombs); the default is Pillow's own limit.

    Raises:
        DataError: missing, unreadable or oversized image.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.width * im.height > max_pixels:
                raise DataError(f"{path}: {im.width}x{im.height} pixels is over the limit of {max_pixels}")
            im = im.convert("RGB")
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot read image {path}: {err}") from err
    if bbox is not None:
        im = im.crop(tuple(bbox))
    if max_side is not None and max(im.size) > max_side:
        scale = max_side / max(im.size)
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BILINEAR)
    return np.asarray(im, dtype=np.uint8)


EmbedFn = Callable[[list[np.ndarray]], np.ndarray]


def _embed_files(
    loaders: Sequence[Callable[[], np.ndarray]], embed_fn: EmbedFn, batch_size: int, desc: str, progress: bool
) -> np.ndarray:
    """Embeds images loaded lazily, ``batch_size`` at a time (a dataset never sits in memory whole)."""
    if batch_size <= 0:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(loaders), desc=desc, unit="img")
        except ImportError:
            bar = None
    out = []
    for start in range(0, len(loaders), batch_size):
        batch = [load() for load in loaders[start : start + batch_size]]
        emb = np.asarray(embed_fn(batch), dtype=np.float32)
        if emb.ndim != 2 or emb.shape[0] != len(batch):
            raise InputShapeError(f"embed_fn must return ({len(batch)}, D) for {len(batch)} images, got {emb.shape}")
        if not np.isfinite(emb).all():
            raise DataError(f"embed_fn returned non-finite values for {desc} images {start}..{start + len(batch) - 1}")
        out.append(emb)
        if bar is not None:
            bar.update(len(batch))
        else:
            logger.info("%s: embedded %d / %d", desc, start + len(batch), len(loaders))
    if bar is not None:
        bar.close()
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def embed_revisited(
    data: RevisitedDataset,
    embed_fn: EmbedFn,
    *,
    batch_size: int = 8,
    max_side: int | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Embeds the queries (cropped to their bounding box) and the database images.

    Args:
        data: from :func:`load_revisited`.
        embed_fn: list of RGB uint8 ``(H, W, 3)`` arrays (sizes differ) ->
            float ``(n, D)`` embeddings. Build one from a model, a SavedModel or
            a TF Serving client (``dolg evaluate`` does).
        batch_size: images per ``embed_fn`` call.
        max_side: optional shrink of each image's longer side (see :func:`load_image`).
        progress: show a tqdm progress bar.

    Returns:
        ``(query_embeddings (num_queries, D), db_embeddings (db_size, D))``.
    """
    queries = [
        functools.partial(load_image, data.query_path(i), data.gnd[i]["bbx"], max_side)
        for i in range(len(data.qimlist))
    ]
    database = [functools.partial(load_image, data.image_path(i), None, max_side) for i in range(len(data.imlist))]
    query_emb = _embed_files(queries, embed_fn, batch_size, f"{data.name} queries", progress)
    db_emb = _embed_files(database, embed_fn, batch_size, f"{data.name} database", progress)
    return query_emb, db_emb


def evaluate_revisited(
    root: str | os.PathLike,
    dataset: str,
    embed_fn: EmbedFn,
    *,
    kappas: Sequence[int] = (1, 5, 10),
    batch_size: int = 8,
    max_side: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Revisited Oxford / Paris evaluation end to end: embed, rank by inner product, E/M/H mAP and mP@k.

    Args:
        root: folder holding ``<dataset>/jpg`` and ``<dataset>/gnd_<dataset>.pkl`` (or ``.json``).
        dataset: ``"roxford5k"``, ``"rparis6k"`` or the folder name of a dataset of your own.
        embed_fn: see :func:`embed_revisited`.
        kappas: see :func:`compute_map`.
        batch_size: see :func:`embed_revisited`.
        max_side: see :func:`embed_revisited`.
        progress: see :func:`embed_revisited`.

    Returns:
        ``{"dataset", "num_queries", "num_images", "easy", "medium", "hard"}``,
        each setup a dict of ``mAP`` and ``mP@k`` fractions.
    """
    data = load_revisited(root, dataset)
    query_emb, db_emb = embed_revisited(data, embed_fn, batch_size=batch_size, max_side=max_side, progress=progress)
    return {
        "dataset": data.name,
        "num_queries": len(data.qimlist),
        "num_images": len(data.imlist),
        **revisited_map(ranks_from_embeddings(query_emb, db_emb), data.gnd, kappas),
    }


# ---------------------------------------------------------------------------
# Google Landmarks v2 retrieval: mAP@100 (the Kaggle metric)
# ---------------------------------------------------------------------------


def gldv2_map_at_k(
    predictions: Mapping[str, Sequence[str]], solution: Mapping[str, Sequence[str]], k: int = 100
) -> float:
    """Mean average precision @k of the Google Landmark Retrieval challenges (GLDv2, k = 100).

    For a query with m relevant index images and predictions p_1..p_n:
    ``AP@k = sum_{i <= min(n, k), p_i relevant and not repeated} P(i) / min(m, k)``,
    P(i) the precision at i; a repeated prediction counts as a miss but
    keeps its place. The mean runs over every query of ``solution`` with at
    least one relevant image (a query without predictions scores 0). Queries
    with no relevant image are the challenge's "Ignored" ones and are left
    out, also from the mean.

    Args:
        predictions: query id -> ranked index image ids.
        solution: query id -> relevant index image ids.
        k: cut-off (100 for the challenge).

    Raises:
        DataError: a predicted query is not in ``solution``.
    """
    if k <= 0:
        raise ConfigError(f"k must be positive, got {k}")
    scored = {q: set(rel) for q, rel in solution.items() if len(rel)}
    unknown = [q for q in predictions if q not in solution]
    if unknown:
        raise DataError(f"query {unknown[0]!r} is predicted but not in the solution")
    if not scored:
        raise DataError("the solution has no query with relevant images")
    total = 0.0
    for query, relevant in scored.items():
        seen: set[str] = set()
        hits = 0
        ap = 0.0
        for i, image in enumerate(list(predictions.get(query, ()))[:k]):
            if image in seen:
                continue
            seen.add(image)
            if image in relevant:
                hits += 1
                ap += hits / (i + 1)
        total += ap / min(len(relevant), k)
    return total / len(scored)


def read_gldv2_retrieval_solution(
    path: str | os.PathLike, usage: Sequence[str] = ("Public", "Private")
) -> dict[str, list[str]]:
    """Reads a GLDv2 retrieval solution CSV (``id,images,Usage``; images space-separated).

    Args:
        path: e.g. ``retrieval_solution_v2.1.csv``.
        usage: which ``Usage`` rows to keep; ``Ignored`` rows are always dropped.

    Returns:
        query id -> list of relevant index image ids.
    """
    out: dict[str, list[str]] = {}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None or [h.strip() for h in header[:3]] != ["id", "images", "Usage"]:
                raise DataError(f"{path}: expected the header 'id,images,Usage', got {header}")
            for line, row in enumerate(reader, start=2):
                if not row:
                    continue
                if len(row) < 3:
                    raise DataError(f"{path}:{line}: expected 3 columns, got {row}")
                if row[2] not in ("Public", "Private", "Ignored"):
                    raise DataError(f"{path}:{line}: unknown Usage {row[2]!r}")
                if row[2] in usage and row[2] != "Ignored":
                    out[row[0]] = row[1].split()
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from err
    return out
