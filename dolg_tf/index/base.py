"""What every index backend shares: input checks, the search-results file, an exact numpy baseline.

The search contract (:class:`SearchIndex`) is the same for the in-process
faiss :class:`~dolg_tf.index.Index` and the Milvus backend
(:class:`~dolg_tf.index.MilvusIndex`): float ``(N, dim)`` vectors and N unique
ids (all non-negative integers or all non-empty strings) in; for ``(Q, dim)``
queries, ``(scores, ids)`` out, each ``(Q, k)``, scores descending; the
similarity is the inner product of L2-normalised vectors (cosine).

numpy only: importing this module imports neither faiss nor pymilvus.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from dolg_tf.errors import ConfigError, DataError, InputShapeError
from dolg_tf.fileio import atomic_write_json


@runtime_checkable
class SearchIndex(Protocol):
    """The search contract of every backend.

    Implemented by faiss (:class:`~dolg_tf.index.Index`) and Milvus (:class:`~dolg_tf.index.MilvusIndex`).
    """

    dim: int

    @property
    def ntotal(self) -> int:
        """Number of vectors in the index."""

    def add(self, embeddings: Any, ids: Sequence[int] | Sequence[str] | np.ndarray | None = None) -> None:
        """Adds ``(N, dim)`` vectors with N unique ids (L2-normalised first)."""

    def search(self, queries: Any, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, ids)``, each ``(Q, k)``: the top-k by inner product, scores descending."""


def _positive_int(name: str, value: Any) -> int:
    """``value`` as an int, or ConfigError if it is not a positive integer (bools refused)."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _as_matrix(x: Any, dim: int | None, what: str) -> np.ndarray:
    """float32 C-contiguous ``(N, dim)`` copy-if-needed of ``x``; checks shape and finiteness."""
    try:
        arr = np.asarray(x, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise InputShapeError(f"{what} must be a numeric (N, D) array: {err}") from err
    if arr.ndim != 2:
        raise InputShapeError(f"{what} must be a 2-D (N, D) array, got shape {arr.shape}")
    if dim is not None and arr.shape[1] != dim:
        raise InputShapeError(f"{what} must have {dim} columns (the index dimension), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        bad = int(np.flatnonzero(~np.isfinite(arr).all(axis=1))[0])
        raise DataError(f"{what} contain NaN or infinite values (first in row {bad})")
    return np.ascontiguousarray(arr)


def l2_normalize_rows(x: np.ndarray, what: str = "vectors") -> np.ndarray:
    """Rows of ``x`` divided by their L2 norm (float32); a zero row is an error.

    Args:
        x: ``(N, D)`` array.
        what: name used in the error message.

    Returns:
        float32 ``(N, D)`` array of unit rows.
    """
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        raise DataError(f"{what}: row {int(np.flatnonzero(norms[:, 0] == 0)[0])} has zero norm")
    return np.ascontiguousarray(x / norms)


def _check_ids(ids: Any, n: int) -> np.ndarray:
    """ids as an int64 (non-negative) or str numpy array of length ``n``, unique."""
    if isinstance(ids, (str, bytes)):
        raise DataError("ids must be a sequence of ids, not a single string")
    if not isinstance(ids, np.ndarray):
        ids = list(ids)
        # numpy would silently turn [1, "a"] into strings: check the Python types first.
        all_str = all(isinstance(i, str) for i in ids)
        all_int = all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in ids)
        if not (all_str or all_int):
            raise DataError("ids must be all integers or all strings")
    arr = np.asarray(ids)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise InputShapeError(f"need one id per vector: {n} vectors but ids of shape {arr.shape}")
    if n == 0:
        return arr.astype(np.int64)
    if arr.dtype.kind in "iu":
        if (arr < 0).any():
            raise DataError(f"integer ids must be >= 0 (-1 marks 'no result'), got {int(arr.min())}")
        arr = arr.astype(np.int64)
    elif arr.dtype.kind == "U":
        if (np.char.str_len(arr) == 0).any():
            raise DataError("string ids must be non-empty ('' marks 'no result')")
    else:
        raise DataError(f"ids must be all integers or all strings, got numpy dtype {arr.dtype}")
    uniq, counts = np.unique(arr, return_counts=True)
    if (counts > 1).any():
        raise DataError(f"duplicate id {uniq[counts > 1][0].item()!r} ({int(counts.max())} times)")
    return arr


def write_search_results(
    path: str | os.PathLike,
    query_ids: Sequence[Any],
    ids: np.ndarray,
    scores: np.ndarray,
    *,
    index: str | None = None,
    query_expansion: dict[str, Any] | None = None,
) -> str:
    """Writes search results as the JSON ``dolg index search`` writes and ``dolg show`` reads, atomically.

    ``{"index", "k", "query_expansion", "results": [{"query", "ids", "scores"}, ...]}``, one entry per
    query in order; ``ids`` / ``scores`` are the ``(Q, k)`` arrays of :meth:`Index.search`.
    """
    payload = {
        "index": index,
        "k": int(scores.shape[1]),
        "query_expansion": query_expansion,
        "results": [
            {"query": q, "ids": row_ids.tolist(), "scores": [round(float(s), 6) for s in row_scores]}
            for q, row_ids, row_scores in zip(query_ids, ids, scores)
        ],
    }
    return atomic_write_json(path, payload)


def brute_force_search(
    queries: np.ndarray, database: np.ndarray, k: int, chunk: int = 65536
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner-product search in numpy: chunked matmul + ``argpartition``.

    The numpy baseline of ``benchmarks/index.py``. Equal scores at the k-th
    place may come back in any order, as with faiss.

    Args:
        queries: float32 ``(Q, D)``.
        database: float32 ``(N, D)``.
        k: results per query (clipped to N).
        chunk: database rows per matmul block (bounds memory to ``Q * chunk`` floats).

    Returns:
        ``(scores, positions)``: float32 and int64 ``(Q, k)``, scores descending.
    """
    queries = _as_matrix(queries, None, "queries")
    database = _as_matrix(database, queries.shape[1], "database")
    k = min(int(k), database.shape[0])
    best_s = np.full((queries.shape[0], 0), -np.inf, np.float32)
    best_p = np.zeros((queries.shape[0], 0), np.int64)
    for start in range(0, database.shape[0], chunk):
        sims = queries @ database[start : start + chunk].T
        kk = min(k, sims.shape[1])
        part = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]
        cand_s = np.concatenate([best_s, np.take_along_axis(sims, part, 1)], axis=1)
        cand_p = np.concatenate([best_p, part + start], axis=1)
        # Sort by (-score, position): the merge keeps the top-k and a deterministic tie order.
        order = np.lexsort((cand_p, -cand_s), axis=1)[:, :k]
        best_s, best_p = np.take_along_axis(cand_s, order, 1), np.take_along_axis(cand_p, order, 1)
    return best_s, best_p


def search_shards(shards: Sequence[SearchIndex], queries: Any, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Top-k over several indexes (shards of one gallery), merged by score.

    Each shard answers its own top-k; the union is ranked by score. With exact
    scores (``"flat"``, or ``"ivfpq"`` after re-ranking) the merge is what one
    index over the whole gallery would return (ids must be unique across
    shards, and of one type). A 100M gallery can so be built and held as ten
    10M shards, each built within one machine's RAM, searched on one machine
    or one per machine.

    Args:
        shards: indexes following :class:`SearchIndex` (faiss or Milvus, mixed freely).
        queries: float ``(Q, dim)``.
        k: results per query.

    Returns:
        ``(scores, ids)``, each ``(Q, k')`` with ``k' = min(k, sum of shard sizes)``, scores descending;
        missing results as in :meth:`dolg_tf.index.Index.search`.
    """
    if not shards:
        raise ConfigError("search_shards needs at least one index")
    k = _positive_int("k", k)
    parts = [shard.search(queries, k) for shard in shards]
    kinds = {ids.dtype.kind for _, ids in parts}
    if len(kinds) > 1:
        raise DataError("the shards mix integer and string ids: give every shard ids of one type")
    scores = np.concatenate([s for s, _ in parts], axis=1)
    ids = np.concatenate([i for _, i in parts], axis=1)
    k = min(k, scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
