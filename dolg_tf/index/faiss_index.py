"""Nearest-neighbour index of DOLG embeddings on faiss, with alpha-QE and DBA re-ranking.

Pure numpy + faiss: importing this module never imports TensorFlow, Keras or
:mod:`dolg_tf.model`, so a search service stays light.

Similarity is the inner product of L2-normalised vectors (cosine similarity),
the metric DOLG descriptors are trained for. Three kinds of index:

- ``"flat"``: exact search (``faiss.IndexFlatIP``).
- ``"ivf"``: inverted lists over spherical k-means centroids
  (``faiss.IndexIVFFlat``); needs training, see :meth:`Index.train`.
- ``"hnsw"``: a navigable small-world graph (``faiss.IndexHNSWFlat``); no training.

An :class:`Index` maps faiss' sequential positions to user ids (non-negative
integers or non-empty strings, unique) and is saved as one file (see
:meth:`Index.save`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import struct
from collections.abc import Sequence
from typing import Any

import faiss
import numpy as np

from dolg_tf.errors import ConfigError, DataError, IndexFileError, InputShapeError
from dolg_tf.fileio import atomic_write, atomic_write_json

logger = logging.getLogger(__name__)

KINDS = ("flat", "ivf", "hnsw")
FORMAT_VERSION = 1
_MAGIC = b"DOLGIDX\x00"
_DIGEST = 32  # sha256
_PREFIX = struct.Struct("<8sQ")  # magic, header length
# Below ~39 training points per centroid faiss' k-means gives poor centroids (it warns).
_MIN_POINTS_PER_CENTROID = 39
_CHUNK = 16384  # rows per block when searching the database against itself (DBA)


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


def _expand(base: np.ndarray, neighbours: np.ndarray, scores: np.ndarray, alpha: float) -> np.ndarray:
    """normalise(base + sum_j max(s_j, 0)^alpha * neighbour_j): the rule shared by alpha-QE and DBA.

    A score of -inf (no neighbour) gets weight 0, also for ``alpha = 0``.
    """
    if not alpha >= 0:
        raise ConfigError(f"alpha must be >= 0, got {alpha}")
    scores = np.asarray(scores, np.float32)
    present = np.isfinite(scores)
    weights = np.where(present, np.maximum(np.where(present, scores, 0.0), 0.0) ** np.float32(alpha), 0.0)
    out = base.astype(np.float32) + np.einsum("qn,qnd->qd", weights.astype(np.float32), neighbours.astype(np.float32))
    return l2_normalize_rows(out, "expanded vectors")


def alpha_query_expansion(
    queries: np.ndarray, neighbour_vectors: np.ndarray, neighbour_scores: np.ndarray, alpha: float = 3.0
) -> np.ndarray:
    """Alpha query expansion (alpha-QE, Radenović et al., TPAMI 2019).

    Each query is replaced by the normalised sum of itself (weight 1) and its
    top-n database neighbours weighted by ``max(similarity, 0) ** alpha``;
    ``alpha=0`` is plain average QE. Search again with the result.

    Args:
        queries: float ``(Q, D)`` unit-norm queries.
        neighbour_vectors: float ``(Q, n, D)`` database vectors of each query's top-n.
        neighbour_scores: float ``(Q, n)`` their similarities to the query.
        alpha: weighting exponent, >= 0.

    Returns:
        float32 ``(Q, D)`` unit-norm expanded queries.
    """
    queries = np.asarray(queries, np.float32)
    neighbour_vectors = np.asarray(neighbour_vectors, np.float32)
    if neighbour_vectors.ndim != 3 or neighbour_vectors.shape[::2] != queries.shape:
        raise InputShapeError(
            f"neighbour_vectors must be (Q, n, D) for queries {queries.shape}, got {neighbour_vectors.shape}"
        )
    if np.shape(neighbour_scores) != neighbour_vectors.shape[:2]:
        raise InputShapeError(f"neighbour_scores must be {neighbour_vectors.shape[:2]}, got {np.shape(neighbour_scores)}")
    return _expand(queries, neighbour_vectors, neighbour_scores, alpha)


def database_side_augmentation(
    vectors: np.ndarray, neighbour_positions: np.ndarray, neighbour_scores: np.ndarray, alpha: float = 3.0
) -> np.ndarray:
    """Database-side augmentation (alpha-DBA): alpha-QE applied to every database vector.

    Each vector becomes the normalised sum of itself and its neighbours
    weighted by ``max(similarity, 0) ** alpha``. A row's own position in
    ``neighbour_positions`` is ignored (the vector already counts once), and
    so are positions < 0 (faiss' "no result").

    Args:
        vectors: float ``(N, D)`` unit-norm database vectors.
        neighbour_positions: int ``(N, n)`` row numbers (into ``vectors``) of each vector's neighbours.
        neighbour_scores: float ``(N, n)`` their similarities.
        alpha: weighting exponent, >= 0.

    Returns:
        float32 ``(N, D)`` unit-norm augmented vectors.
    """
    vectors = np.asarray(vectors, np.float32)
    positions = np.asarray(neighbour_positions)
    if positions.ndim != 2 or positions.shape[0] != vectors.shape[0] or np.shape(neighbour_scores) != positions.shape:
        raise InputShapeError(
            f"need (N, n) neighbour positions and scores for {vectors.shape[0]} vectors, "
            f"got {positions.shape} and {np.shape(neighbour_scores)}"
        )
    if positions.size and positions.max() >= vectors.shape[0]:
        raise InputShapeError(f"neighbour position {int(positions.max())} is out of range for {vectors.shape[0]} vectors")
    scores = np.asarray(neighbour_scores, np.float32).copy()
    scores[(positions == np.arange(vectors.shape[0])[:, None]) | (positions < 0)] = -np.inf  # weight 0
    safe = np.where(positions < 0, 0, positions)
    out = np.empty_like(vectors)
    for start in range(0, vectors.shape[0], _CHUNK):
        rows = slice(start, start + _CHUNK)
        out[rows] = _expand(vectors[rows], vectors[safe[rows]], scores[rows], alpha)
    return out


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


class Index:
    """A faiss index of L2-normalised embeddings with user ids, save/load and re-ranking.

    Args:
        dim: embedding dimension (512 for DOLG).
        kind: ``"flat"`` (exact), ``"ivf"`` or ``"hnsw"`` (approximate).
        nlist: IVF: number of inverted lists. ``None`` picks, at training time,
            ``round(4 * sqrt(n_train))`` clipped to ``[1, n_train // 39]``.
        nprobe: IVF: lists visited per query (speed/recall trade-off; settable later).
        m: HNSW: graph degree (faiss' ``M``).
        ef_construction: HNSW: candidate-list size while building.
        ef_search: HNSW: candidate-list size while searching (settable later).
        normalize: L2-normalise vectors on :meth:`add` and :meth:`search`
            (default). DOLG embeddings are already unit-norm; turning this off
            keeps raw inner products.

    Training: ``"ivf"`` must learn its centroids. Call :meth:`train` with a
    representative sample, or let the first :meth:`add` train on the vectors
    it is given (it needs at least ``nlist`` of them; fewer than ``39 * nlist``
    is logged as a warning). Later additions reuse those centroids.

    Example:

    >>> index = Index(512, kind="hnsw")
    >>> index.add(gallery_embeddings, ids=["a.jpg", "b.jpg", ...])
    >>> scores, ids = index.search(query_embeddings, k=10)
    >>> index.save("gallery.dolgidx"); index = Index.load("gallery.dolgidx")
    """

    def __init__(
        self,
        dim: int,
        kind: str = "flat",
        *,
        nlist: int | None = None,
        nprobe: int = 16,
        m: int = 32,
        ef_construction: int = 100,
        ef_search: int = 128,
        normalize: bool = True,
    ):
        _positive_int("dim", dim)
        if kind not in KINDS:
            raise ConfigError(f"kind must be one of {KINDS}, got {kind!r}")
        for name, value in (("nprobe", nprobe), ("m", m), ("ef_construction", ef_construction), ("ef_search", ef_search)):
            _positive_int(name, value)
        if nlist is not None:
            _positive_int("nlist", nlist)
        self.dim = int(dim)
        self.kind = kind
        self.normalize = bool(normalize)
        self._nlist = None if nlist is None else int(nlist)
        self._nprobe = int(nprobe)
        self._m = int(m)
        self._ef_construction = int(ef_construction)
        self._ef_search = int(ef_search)
        self._ids = np.zeros(0, np.int64)
        self._faiss: faiss.Index | None = None
        if kind == "flat":
            self._faiss = faiss.IndexFlatIP(self.dim)
        elif kind == "hnsw":
            self._faiss = faiss.IndexHNSWFlat(self.dim, self._m, faiss.METRIC_INNER_PRODUCT)
            self._faiss.hnsw.efConstruction = self._ef_construction
            self._faiss.hnsw.efSearch = self._ef_search
        # "ivf": created by train(), once nlist is known.

    # ------------------------------------------------------------------ properties
    @property
    def ntotal(self) -> int:
        """Number of vectors in the index."""
        return int(self._ids.shape[0])

    def __len__(self) -> int:
        return self.ntotal

    @property
    def is_trained(self) -> bool:
        """False only for an ``"ivf"`` index before :meth:`train` (or the first :meth:`add`)."""
        return self._faiss is not None and bool(self._faiss.is_trained)

    @property
    def ids(self) -> np.ndarray:
        """The ids in insertion order (int64 or str array; read-only view)."""
        view = self._ids.view()
        view.flags.writeable = False
        return view

    @property
    def nlist(self) -> int | None:
        """IVF list count (``None`` until an automatic choice is made at training)."""
        return self._nlist

    @property
    def nprobe(self) -> int:
        return self._nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        self._nprobe = _positive_int("nprobe", value)
        if self.kind == "ivf" and self._faiss is not None:
            self._faiss.nprobe = self._nprobe

    @property
    def ef_search(self) -> int:
        return self._ef_search

    @ef_search.setter
    def ef_search(self, value: int) -> None:
        self._ef_search = _positive_int("ef_search", value)
        if self.kind == "hnsw":
            self._faiss.hnsw.efSearch = self._ef_search

    def options(self) -> dict[str, Any]:
        """The constructor arguments (``Index(**index.options())`` makes an empty twin)."""
        return {
            "dim": self.dim,
            "kind": self.kind,
            "nlist": self._nlist,
            "nprobe": self._nprobe,
            "m": self._m,
            "ef_construction": self._ef_construction,
            "ef_search": self._ef_search,
            "normalize": self.normalize,
        }

    def __repr__(self) -> str:
        return f"Index(dim={self.dim}, kind={self.kind!r}, ntotal={self.ntotal}, trained={self.is_trained})"

    # ------------------------------------------------------------------ building
    def _prepare(self, x: Any, what: str) -> np.ndarray:
        arr = _as_matrix(x, self.dim, what)
        return l2_normalize_rows(arr, what) if self.normalize else arr

    def train(self, embeddings: Any) -> None:
        """Learns the IVF centroids (spherical k-means) from ``embeddings``; a no-op for flat/HNSW.

        Args:
            embeddings: float ``(N, dim)`` representative sample.
        """
        if self.kind != "ivf":
            return
        if self.is_trained:
            raise ConfigError("this IVF index is already trained; make a new Index to retrain")
        x = self._prepare(embeddings, "training vectors")
        n = x.shape[0]
        nlist = self._nlist
        if nlist is None:
            nlist = int(min(max(1, round(4 * math.sqrt(n))), max(1, n // _MIN_POINTS_PER_CENTROID)))
        if n < nlist:
            raise DataError(f"IVF with nlist={nlist} needs at least {nlist} training vectors, got {n}")
        if n < _MIN_POINTS_PER_CENTROID * nlist:
            logger.warning("IVF training on %d vectors for %d lists (< 39 per list): centroids may be poor", n, nlist)
        quantizer = faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.spherical = True  # unit-norm centroids: the right k-means for cosine similarity
        index.train(x)
        # The IVF index must own its quantizer, or the Python-side object frees it.
        index.own_fields = True
        quantizer.this.disown()
        index.nprobe = self._nprobe
        self._faiss = index
        self._nlist = nlist
        logger.info("trained IVF with %d lists on %d vectors", nlist, n)

    def add(self, embeddings: Any, ids: Sequence[int] | Sequence[str] | np.ndarray | None = None) -> None:
        """Adds vectors with their ids.

        Args:
            embeddings: float ``(N, dim)``; finite, non-zero rows.
            ids: N unique ids, all non-negative integers or all non-empty
                strings, not already in the index. ``None`` numbers the rows
                ``ntotal .. ntotal + N - 1`` (integer-id indexes only).

        Raises:
            InputShapeError: wrong dimension or id count.
            DataError: non-finite or zero vectors, duplicate or mixed-type ids.
        """
        x = self._prepare(embeddings, "embeddings")
        n = x.shape[0]
        if ids is None:
            if self.ntotal and self._ids.dtype.kind != "i":
                raise DataError("this index has string ids: pass ids explicitly")
            new_ids = np.arange(self.ntotal, self.ntotal + n, dtype=np.int64)
        else:
            new_ids = _check_ids(ids, n)
        if n == 0:
            return
        if self.ntotal:
            if new_ids.dtype.kind != self._ids.dtype.kind:
                raise DataError(
                    f"ids must all be of one type: the index has {'integer' if self._ids.dtype.kind == 'i' else 'string'} ids"
                )
            clash = np.isin(new_ids, self._ids)
            if clash.any():
                raise DataError(f"id {new_ids[clash][0].item()!r} is already in the index")
        if not self.is_trained:
            self.train(x)
        self._faiss.add(x)
        self._ids = np.concatenate([self._ids, new_ids]) if self.ntotal else new_ids
        if self._faiss.ntotal != self._ids.shape[0]:  # faiss and the id list must never drift apart
            raise IndexFileError(f"faiss holds {self._faiss.ntotal} vectors but {self._ids.shape[0]} ids")

    # ------------------------------------------------------------------ searching
    def _search_positions(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, positions = self._faiss.search(x, k)
        return scores, positions

    def vectors(self, positions: np.ndarray | None = None) -> np.ndarray:
        """The stored (normalised) vectors, all or at the given positions (``(..., dim)`` float32)."""
        if self.ntotal == 0:
            return np.zeros((0, self.dim), np.float32)
        if self.kind == "ivf":
            ivf = faiss.extract_index_ivf(self._faiss)
            if ivf.direct_map.type == faiss.DirectMap.NoMap:
                ivf.make_direct_map()
        if positions is None:
            return self._faiss.reconstruct_n(0, self.ntotal)
        positions = np.asarray(positions, np.int64)
        flat = self._faiss.reconstruct_batch(np.ascontiguousarray(positions.reshape(-1)))
        return flat.reshape(*positions.shape, self.dim)

    def search(
        self, queries: Any, k: int = 10, *, qe_alpha: float | None = None, qe_neighbours: int = 2
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k most similar database vectors of each query.

        Args:
            queries: float ``(Q, dim)``.
            k: results per query; more than ``ntotal`` returns ``ntotal`` columns.
            qe_alpha: if set, alpha query expansion (:func:`alpha_query_expansion`)
                with this exponent: search ``qe_neighbours``, expand, search again.
            qe_neighbours: neighbours used by query expansion.

        Returns:
            ``(scores, ids)``: float32 ``(Q, k')`` similarities, descending, and the
            ids at those ranks (int64 or str array). An approximate index may
            find fewer than ``k'`` results for a query; the missing slots have
            score ``-inf`` and id ``-1`` (integer ids) or ``""`` (string ids).
        """
        k = _positive_int("k", k)
        q = self._prepare(queries, "queries")
        if self.ntotal == 0:
            raise DataError("the index is empty: add vectors before searching")
        k = min(int(k), self.ntotal)
        if qe_alpha is not None:
            n = min(_positive_int("qe_neighbours", qe_neighbours), self.ntotal)
            s, pos = self._search_positions(q, n)
            s = np.where(pos < 0, -np.inf, s)  # missing neighbours get zero weight
            q = alpha_query_expansion(q, self.vectors(np.maximum(pos, 0)), s, float(qe_alpha))
        scores, positions = self._search_positions(q, k)
        missing = positions < 0
        ids = self._ids[np.where(missing, 0, positions)]
        if missing.any():
            scores = np.where(missing, -np.inf, scores).astype(np.float32)
            ids[missing] = -1 if ids.dtype.kind == "i" else ""
        return scores, ids

    def augmented(self, neighbours: int = 2, alpha: float = 3.0) -> Index:
        """A new index of the same kind and ids with database-side augmentation (alpha-DBA) applied.

        Each vector's ``neighbours`` nearest neighbours are found with this
        index (approximate for IVF/HNSW) and combined by
        :func:`database_side_augmentation`. An IVF index is retrained on the
        augmented vectors.

        Args:
            neighbours: neighbours per vector, besides itself.
            alpha: weighting exponent, >= 0.
        """
        neighbours = _positive_int("neighbours", neighbours)
        if self.ntotal == 0:
            raise DataError("the index is empty: nothing to augment")
        x = self.vectors()
        n = min(int(neighbours) + 1, self.ntotal)  # +1: the vector itself is usually its own top hit
        scores = np.empty((self.ntotal, n), np.float32)
        positions = np.empty((self.ntotal, n), np.int64)
        for start in range(0, self.ntotal, _CHUNK):
            scores[start : start + _CHUNK], positions[start : start + _CHUNK] = self._search_positions(
                x[start : start + _CHUNK], n
            )
        # Keep at most `neighbours` others per row when the row itself was not among the hits.
        others = positions != np.arange(self.ntotal)[:, None]
        keep = others & (np.cumsum(others, axis=1) <= neighbours)
        scores = np.where(keep, scores, -np.inf)
        augmented = database_side_augmentation(x, np.where(keep, positions, -1), scores, alpha)
        out = Index(**self.options())
        out.add(augmented, self._ids.copy())
        return out

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> None:
        """Writes the index to one file, atomically (temporary file + ``os.replace``).

        Layout: magic ``DOLGIDX\\0``, the header length (uint64), a JSON header
        (format version, options, ntotal, id type, section sizes), faiss' own
        serialisation of the index, the ids (``.npy`` bytes without pickle for
        integer ids, a JSON list for string ids), and the SHA-256 of everything
        before it. :meth:`load` checks the size and the digest first, so a
        truncated or corrupt file raises :class:`IndexFileError`.
        """
        if self._faiss is None:
            raise DataError("an untrained, empty IVF index has nothing to save")
        faiss_bytes = faiss.serialize_index(self._faiss)
        if self._ids.dtype.kind == "i":
            buf = io.BytesIO()
            np.save(buf, self._ids, allow_pickle=False)
            id_bytes, id_type = buf.getvalue(), "int64"
        else:
            id_bytes, id_type = json.dumps(self._ids.tolist(), ensure_ascii=False).encode("utf-8"), "str"
        header = json.dumps(
            {
                "format": "dolg_tf.index",
                "version": FORMAT_VERSION,
                "options": self.options(),
                "ntotal": self.ntotal,
                "id_type": id_type,
                "faiss_bytes": int(faiss_bytes.nbytes),
                "id_bytes": len(id_bytes),
                "faiss_version": faiss.__version__,
            }
        ).encode("utf-8")
        digest = hashlib.sha256()
        parts = (_PREFIX.pack(_MAGIC, len(header)), header, memoryview(faiss_bytes), id_bytes)

        def write(f):
            for part in parts:
                digest.update(part)
                f.write(part)
            f.write(digest.digest())

        path = atomic_write(path, write)
        logger.info("saved %s to %s (%d bytes)", self, path, os.path.getsize(path))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Index:
        """Reads a file written by :meth:`save`; checks size, digest, version and consistency.

        Raises:
            IndexFileError: the file is missing, not an index file, truncated,
                corrupt, of an unknown version, or inconsistent.
        """
        path = os.fspath(path)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as err:
            raise IndexFileError(f"cannot read index file {path!r}: {err.strerror or err}") from err
        if len(data) < _PREFIX.size + _DIGEST or data[:8] != _MAGIC:
            raise IndexFileError(f"{path!r} is not a dolg_tf index file (bad magic or too short)")
        _, header_len = _PREFIX.unpack_from(data)
        try:
            header = json.loads(data[_PREFIX.size : _PREFIX.size + header_len].decode("utf-8"))
            expected = _PREFIX.size + header_len + int(header["faiss_bytes"]) + int(header["id_bytes"]) + _DIGEST
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
            raise IndexFileError(f"{path!r}: unreadable header ({err}); the file is truncated or corrupt") from err
        if len(data) != expected:
            raise IndexFileError(f"{path!r} is truncated or has trailing data: {len(data)} bytes, expected {expected}")
        if hashlib.sha256(memoryview(data)[:-_DIGEST]).digest() != data[-_DIGEST:]:
            raise IndexFileError(f"{path!r} is corrupt: SHA-256 checksum mismatch")
        if header.get("format") != "dolg_tf.index" or header.get("version") != FORMAT_VERSION:
            raise IndexFileError(
                f"{path!r}: unsupported format {header.get('format')!r} version {header.get('version')!r} "
                f"(this dolg_tf reads version {FORMAT_VERSION})"
            )
        start = _PREFIX.size + header_len
        faiss_end = start + int(header["faiss_bytes"])
        try:
            index = cls(**header["options"])
            fidx = faiss.deserialize_index(np.frombuffer(data, np.uint8, faiss_end - start, start))
            id_bytes = memoryview(data)[faiss_end:-_DIGEST]
            if header["id_type"] == "int64":
                ids = np.load(io.BytesIO(id_bytes), allow_pickle=False)
            else:
                ids = np.asarray(json.loads(bytes(id_bytes).decode("utf-8")), dtype=str)
        except (RuntimeError, ValueError, TypeError, KeyError, ConfigError) as err:
            raise IndexFileError(f"{path!r}: cannot decode the index ({err})") from err
        if fidx.d != index.dim or fidx.ntotal != header["ntotal"] or ids.shape != (header["ntotal"],):
            raise IndexFileError(
                f"{path!r} is inconsistent: faiss d={fidx.d} ntotal={fidx.ntotal}, ids {ids.shape}, header {header['ntotal']}"
            )
        index._faiss = fidx
        index._ids = ids if ids.size else np.zeros(0, np.int64)
        # Runtime search parameters come from the header, whatever faiss serialised.
        index.nprobe = index._nprobe
        index.ef_search = index._ef_search
        return index


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


def brute_force_search(queries: np.ndarray, database: np.ndarray, k: int, chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
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
