"""Nearest-neighbour index of DOLG embeddings on faiss, with alpha-QE and DBA re-ranking.

Pure numpy + faiss: importing this module never imports TensorFlow, Keras or
:mod:`dolg_tf.model`, so a search service stays light.

Similarity is the inner product of L2-normalised vectors (cosine similarity),
the metric DOLG descriptors are trained for. Four kinds of index:

- ``"flat"``: exact search (``faiss.IndexFlatIP``).
- ``"ivf"``: inverted lists over spherical k-means centroids
  (``faiss.IndexIVFFlat``); needs training, see :meth:`Index.train`.
- ``"hnsw"``: a navigable small-world graph (``faiss.IndexHNSWFlat``); no training.
- ``"ivfpq"``: compressed. Product-quantised codes in inverted lists (any
  IVF faiss factory string; the default ``"IVF{nlist},PQ{pq_m}x4fs"`` packs
  ``pq_m`` 4-bit codes per vector, searched with faiss' SIMD fast scan) find
  ``k * rerank`` candidates, which are then re-scored exactly against the
  full vectors. Those are kept in the file and can stay on disk,
  memory-mapped (``Index.load(path, mmap=True)``): in RAM a vector costs its
  ``pq_m / 2``-byte code plus its ids, which is how a 100M x 512 gallery fits
  one machine.

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
from dolg_tf.fileio import atomic_write
from dolg_tf.index.base import _as_matrix, _check_ids, _positive_int, l2_normalize_rows

logger = logging.getLogger(__name__)

KINDS = ("flat", "ivf", "hnsw", "ivfpq")
FORMAT_VERSION = 2  # 2 added the exact-vector section (empty except for "ivfpq"); 1 is still read
_READABLE_VERSIONS = (1, 2)
_MAGIC = b"DOLGIDX\x00"
_DIGEST = 32  # sha256
_PREFIX = struct.Struct("<8sQ")  # magic, header length
_MAX_HEADER = 1 << 20  # the JSON header holds options and sizes only (ids have their own section)
_READ_BLOCK = 1 << 24  # bytes per read while hashing or copying a section
# Below ~39 training points per centroid faiss' k-means gives poor centroids (it warns).
_MIN_POINTS_PER_CENTROID = 39
_CHUNK = 16384  # rows per block when searching the database against itself (DBA)
_RERANK_BYTES = 1 << 25  # candidate vectors gathered at once while re-ranking (32 MiB)


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
        raise InputShapeError(
            f"neighbour_scores must be {neighbour_vectors.shape[:2]}, got {np.shape(neighbour_scores)}"
        )
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
        raise InputShapeError(
            f"neighbour position {int(positions.max())} is out of range for {vectors.shape[0]} vectors"
        )
    scores = np.asarray(neighbour_scores, np.float32).copy()
    scores[(positions == np.arange(vectors.shape[0])[:, None]) | (positions < 0)] = -np.inf  # weight 0
    safe = np.where(positions < 0, 0, positions)
    out = np.empty_like(vectors)
    for start in range(0, vectors.shape[0], _CHUNK):
        rows = slice(start, start + _CHUNK)
        out[rows] = _expand(vectors[rows], vectors[safe[rows]], scores[rows], alpha)
    return out


class Index:
    """A faiss index of L2-normalised embeddings with user ids, save/load and re-ranking.

    Args:
        dim: embedding dimension (512 for DOLG).
        kind: ``"flat"`` (exact), ``"ivf"``, ``"hnsw"`` (approximate) or
            ``"ivfpq"`` (compressed, re-ranked exactly).
        nlist: IVF / IVF-PQ: number of inverted lists. ``None`` picks, at
            training time, ``round(4 * sqrt(n_train))`` clipped to
            ``[1, n_train // 39]``.
        nprobe: IVF / IVF-PQ: lists visited per query (speed/recall trade-off;
            settable later).
        m: HNSW: graph degree (faiss' ``M``).
        ef_construction: HNSW: candidate-list size while building.
        ef_search: HNSW: candidate-list size while searching (settable later).
        normalize: L2-normalise vectors on :meth:`add` and :meth:`search`
            (default). DOLG embeddings are already unit-norm; turning this off
            keeps raw inner products.
        pq_m: IVF-PQ: sub-quantisers of 4 bits each (the code takes
            ``pq_m / 2`` bytes); must divide ``dim``. ``None``: ``dim // 4``
            (128 for 512-d, 64-byte codes). Ignored when ``factory`` is given.
        factory: IVF-PQ: a faiss ``index_factory`` string describing an IVF
            index, e.g. ``"OPQ64,IVF65536,PQ64np"`` (8-bit codes; ``np`` skips
            polysemous training, which takes minutes and only serves Hamming
            filtering). ``None`` builds ``"IVF{nlist},PQ{pq_m}x4fs"``.
        rerank: IVF-PQ: the compressed search returns ``k * rerank``
            candidates, re-scored exactly with the stored full vectors
            (settable later; 1 turns re-ranking off).

    Training: ``"ivf"`` and ``"ivfpq"`` must learn their centroids (and
    codebooks). Call :meth:`train` with a representative sample, or let the
    first :meth:`add` train on the vectors it is given (it needs at least
    ``nlist`` of them, and 16 for 4-bit PQ codebooks; fewer than
    ``39 * nlist`` is logged as a warning). Later additions reuse them.

    Examples:
        >>> index = Index(512, kind="hnsw")
        >>> index.add(gallery_embeddings, ids=["a.jpg", "b.jpg", ...])
        >>> scores, ids = index.search(query_embeddings, k=10)
        >>> index.save("gallery.dolgidx"); index = Index.load("gallery.dolgidx")
        >>> big = Index.load("big.dolgidx", mmap=True)  # "ivfpq": full vectors stay on disk
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
        pq_m: int | None = None,
        factory: str | None = None,
        rerank: int = 4,
    ):
        _positive_int("dim", dim)
        if kind not in KINDS:
            raise ConfigError(f"kind must be one of {KINDS}, got {kind!r}")
        for name, value in (
            ("nprobe", nprobe),
            ("m", m),
            ("ef_construction", ef_construction),
            ("ef_search", ef_search),
            ("rerank", rerank),
        ):
            _positive_int(name, value)
        if nlist is not None:
            _positive_int("nlist", nlist)
        # 4-bit codes for groups of 4 dimensions: 1 bit per dimension, 64 bytes for 512-d DOLG descriptors
        pq_m = max(1, int(dim) // 4) if pq_m is None else _positive_int("pq_m", pq_m)
        self.dim = int(dim)
        self.kind = kind
        self.normalize = bool(normalize)
        self._nlist = None if nlist is None else int(nlist)
        self._nprobe = int(nprobe)
        self._m = int(m)
        self._ef_construction = int(ef_construction)
        self._ef_search = int(ef_search)
        self._pq_m = int(pq_m)
        self._factory = factory
        self._rerank = int(rerank)
        self._ids = np.zeros(0, np.int64)
        # "ivfpq": the exact vectors, in RAM or memory-mapped from the file (np.memmap).
        self._vectors: np.ndarray = np.zeros((0, self.dim), np.float32)
        self._faiss: faiss.Index | None = None
        if kind == "flat":
            self._faiss = faiss.IndexFlatIP(self.dim)
        elif kind == "hnsw":
            self._faiss = faiss.IndexHNSWFlat(self.dim, self._m, faiss.METRIC_INNER_PRODUCT)
            self._faiss.hnsw.efConstruction = self._ef_construction
            self._faiss.hnsw.efSearch = self._ef_search
        elif kind == "ivfpq":
            if factory is not None:
                self._faiss = self._from_factory(factory)
                self._nlist = int(faiss.extract_index_ivf(self._faiss).nlist)
            elif self.dim % self._pq_m:
                raise ConfigError(f"pq_m={self._pq_m} must divide the dimension {self.dim}")
        # "ivf" (and "ivfpq" without a factory string): created by train(), once nlist is known.

    def _from_factory(self, factory: Any) -> faiss.Index:
        """The (untrained) faiss index a factory string describes; ConfigError unless it is an IVF index."""
        if not isinstance(factory, str) or not factory:
            raise ConfigError(f"factory must be a faiss index_factory string, got {factory!r}")
        try:
            index = faiss.index_factory(self.dim, factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as err:
            first = str(err).strip().splitlines()[-1] if str(err).strip() else "rejected"
            raise ConfigError(f"faiss cannot build {factory!r} for dimension {self.dim}: {first}") from err
        try:
            faiss.extract_index_ivf(index)
        except RuntimeError as err:
            raise ConfigError(
                f"factory {factory!r} is not an IVF index: the compressed kind needs inverted lists, "
                "e.g. 'IVF4096,PQ64' or 'OPQ64,IVF65536,PQ64'"
            ) from err
        return index

    # ------------------------------------------------------------------ properties
    @property
    def ntotal(self) -> int:
        """Number of vectors in the index."""
        return int(self._ids.shape[0])

    def __len__(self) -> int:
        return self.ntotal

    @property
    def is_trained(self) -> bool:
        """False only for an ``"ivf"`` / ``"ivfpq"`` index before :meth:`train` (or the first :meth:`add`)."""
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
        if self.kind in ("ivf", "ivfpq") and self._faiss is not None:
            faiss.extract_index_ivf(self._faiss).nprobe = self._nprobe

    @property
    def ef_search(self) -> int:
        return self._ef_search

    @ef_search.setter
    def ef_search(self, value: int) -> None:
        self._ef_search = _positive_int("ef_search", value)
        if self.kind == "hnsw":
            self._faiss.hnsw.efSearch = self._ef_search

    @property
    def rerank(self) -> int:
        """IVF-PQ: candidates per result re-scored exactly (``k * rerank`` per query)."""
        return self._rerank

    @rerank.setter
    def rerank(self, value: int) -> None:
        self._rerank = _positive_int("rerank", value)

    @property
    def is_memory_mapped(self) -> bool:
        """True when the exact vectors of an ``"ivfpq"`` index are read from the file on demand."""
        return isinstance(self._vectors, np.memmap)

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
            "pq_m": self._pq_m,
            "factory": self._factory,
            "rerank": self._rerank,
        }

    def memory_bytes(self) -> int:
        """Bytes this index holds in RAM: faiss' structures, the ids, and the exact vectors unless memory-mapped.

        faiss' part is measured as the size of its serialisation, which is
        what it allocates for codes, lists, graphs and centroids.
        """
        faiss_part = 0 if self._faiss is None else int(faiss.serialize_index(self._faiss).nbytes)
        ids_part = int(self._ids.nbytes)
        vectors_part = 0 if self.is_memory_mapped else int(self._vectors.nbytes)
        return faiss_part + ids_part + vectors_part

    def __repr__(self) -> str:
        return f"Index(dim={self.dim}, kind={self.kind!r}, ntotal={self.ntotal}, trained={self.is_trained})"

    # ------------------------------------------------------------------ building
    def _prepare(self, x: Any, what: str) -> np.ndarray:
        arr = _as_matrix(x, self.dim, what)
        return l2_normalize_rows(arr, what) if self.normalize else arr

    def train(self, embeddings: Any) -> None:
        """Learns the IVF centroids (spherical k-means) and, for ``"ivfpq"``, the PQ codebooks; a no-op for flat/HNSW.

        Args:
            embeddings: float ``(N, dim)`` representative sample.
        """
        if self.kind not in ("ivf", "ivfpq"):
            return
        if self.is_trained:
            raise ConfigError(f"this {self.kind.upper()} index is already trained; make a new Index to retrain")
        x = self._prepare(embeddings, "training vectors")
        n = x.shape[0]
        nlist = self._nlist
        if nlist is None:
            nlist = int(min(max(1, round(4 * math.sqrt(n))), max(1, n // _MIN_POINTS_PER_CENTROID)))
        if n < nlist:
            raise DataError(f"{self.kind.upper()} with nlist={nlist} needs at least {nlist} training vectors, got {n}")
        if n < _MIN_POINTS_PER_CENTROID * nlist:
            logger.warning("IVF training on %d vectors for %d lists (< 39 per list): centroids may be poor", n, nlist)
        if self.kind == "ivf":
            quantizer = faiss.IndexFlatIP(self.dim)
            index = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
            # The IVF index must own its quantizer, or the Python-side object frees it.
            index.own_fields = True
            quantizer.this.disown()
        else:
            index = self._faiss if self._faiss is not None else self._from_factory(f"IVF{nlist},PQ{self._pq_m}x4fs")
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.spherical = True  # unit-norm centroids: the right k-means for cosine similarity
        try:
            index.train(x)
        except RuntimeError as err:
            raise DataError(f"faiss could not train the {self.kind} index on {n} vectors: {err}") from err
        ivf.nprobe = self._nprobe
        self._faiss = index
        self._nlist = nlist
        logger.info("trained %s with %d lists on %d vectors", self.kind.upper(), nlist, n)

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
                    f"ids must all be of one type: the index has "
                    f"{'integer' if self._ids.dtype.kind == 'i' else 'string'} ids"
                )
            clash = np.isin(new_ids, self._ids)
            if clash.any():
                raise DataError(f"id {new_ids[clash][0].item()!r} is already in the index")
        if not self.is_trained:
            self.train(x)
        self._faiss.add(x)
        if self.kind == "ivfpq":
            if self.is_memory_mapped:
                logger.warning(
                    "adding to a memory-mapped IVF-PQ index copies its %d exact vectors into RAM", self.ntotal
                )
            if self.ntotal:
                self._vectors = np.concatenate([self._vectors, x])
            else:  # own the rows without a second copy when normalising already made one
                aliased = isinstance(embeddings, np.ndarray) and np.may_share_memory(x, embeddings)
                self._vectors = x.copy() if aliased else x
        self._ids = np.concatenate([self._ids, new_ids]) if self.ntotal else new_ids
        if self._faiss.ntotal != self._ids.shape[0]:  # faiss and the id list must never drift apart
            raise IndexFileError(f"faiss holds {self._faiss.ntotal} vectors but {self._ids.shape[0]} ids")

    # ------------------------------------------------------------------ searching
    def _search_positions(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.kind != "ivfpq":
            return self._faiss.search(x, k)
        candidates = min(self.ntotal, k * self._rerank)
        approx_scores, positions = self._faiss.search(x, candidates)
        if self._rerank == 1:
            return approx_scores, positions
        return self._rescore(x, positions, k)

    def _rescore(self, x: np.ndarray, positions: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact inner products of each query with its candidates' stored vectors; the top-k of those."""
        q, c = positions.shape
        scores = np.full((q, k), -np.inf, np.float32)
        out = np.full((q, k), -1, np.int64)
        rows = max(1, _RERANK_BYTES // max(1, c * self.dim * 4))
        for start in range(0, q, rows):
            pos = positions[start : start + rows]
            valid = pos >= 0
            safe = np.where(valid, pos, 0)
            # Sorted reads: a memory-mapped file is then read front to back.
            flat = safe.ravel()
            order = np.argsort(flat, kind="stable")
            gathered = np.empty((flat.size, self.dim), np.float32)
            gathered[order] = self._vectors[flat[order]]
            sims = np.einsum("qd,qcd->qc", x[start : start + rows], gathered.reshape(*pos.shape, self.dim))
            sims = np.where(valid, sims, -np.inf).astype(np.float32)
            top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
            best = np.take_along_axis(sims, top, 1)
            scores[start : start + rows, : top.shape[1]] = best
            out[start : start + rows, : top.shape[1]] = np.where(np.isfinite(best), np.take_along_axis(pos, top, 1), -1)
        return scores, out

    def vectors(self, positions: np.ndarray | None = None) -> np.ndarray:
        """The stored (normalised) vectors, all or at the given positions (``(..., dim)`` float32).

        For ``"ivfpq"`` these are the exact vectors kept beside the codes (a
        read-only memory map when loaded with ``mmap=True`` and no positions).
        """
        if self.ntotal == 0:
            return np.zeros((0, self.dim), np.float32)
        if self.kind == "ivfpq":
            if positions is None:
                return self._vectors
            return np.asarray(self._vectors[np.asarray(positions, np.int64)], np.float32)
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
        serialisation of the index, the exact vectors (raw little-endian
        float32, row-major; ``"ivfpq"`` only, empty otherwise), the ids
        (``.npy`` bytes without pickle for integer ids, a JSON list for
        string ids), and the SHA-256 of everything before it. :meth:`load`
        checks the size and the digest first, so a truncated or corrupt file
        raises :class:`IndexFileError`.
        """
        if self._faiss is None or not self.is_trained:
            raise DataError(f"an untrained, empty {self.kind.upper()} index has nothing to save")
        faiss_bytes = faiss.serialize_index(self._faiss)
        vectors = self._vectors if self.kind == "ivfpq" else np.zeros((0, self.dim), np.float32)
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
                "vector_bytes": int(vectors.nbytes),
                "id_bytes": len(id_bytes),
                "faiss_version": faiss.__version__,
            }
        ).encode("utf-8")
        digest = hashlib.sha256()

        def parts():
            yield _PREFIX.pack(_MAGIC, len(header))
            yield header
            yield memoryview(faiss_bytes)
            rows = max(1, _READ_BLOCK // (4 * self.dim))
            for start in range(0, vectors.shape[0], rows):  # blocks: a memory map is never read whole
                yield np.ascontiguousarray(vectors[start : start + rows], dtype="<f4").tobytes()
            yield id_bytes

        def write(f):
            for part in parts():
                digest.update(part)
                f.write(part)
            f.write(digest.digest())

        path = atomic_write(path, write)
        logger.info("saved %s to %s (%d bytes)", self, path, os.path.getsize(path))

    @classmethod
    def load(cls, path: str | os.PathLike, *, mmap: bool = False, verify: bool = True) -> Index:
        """Reads a file written by :meth:`save`; checks size, digest, version and consistency.

        The file is read in blocks (never whole), and each section is copied
        once: peak memory is about the index's own size.

        Args:
            path: the index file.
            mmap: ``"ivfpq"``: leave the exact vectors in the file and read
                them on demand through a read-only memory map (the page cache
                keeps what is used). In RAM stay the codes, the lists and the
                ids. Other kinds have no such section and load whole.
            verify: check the SHA-256 of the whole file first (the default).
                ``False`` skips that pass, which reads every byte once (about
                a minute per 100 GB), and keeps every other check.

        Raises:
            IndexFileError: the file is missing, not an index file, truncated,
                corrupt, of an unknown version, or inconsistent.
        """
        path = os.fspath(path)
        try:
            with open(path, "rb") as f:
                return cls._read(f, path, mmap=mmap, verify=verify)
        except OSError as err:
            raise IndexFileError(f"cannot read index file {path!r}: {err.strerror or err}") from err

    @classmethod
    def _read(cls, f: io.BufferedReader, path: str, *, mmap: bool, verify: bool) -> Index:
        size = os.fstat(f.fileno()).st_size
        prefix = f.read(_PREFIX.size)
        if size < _PREFIX.size + _DIGEST or len(prefix) < _PREFIX.size or prefix[:8] != _MAGIC:
            raise IndexFileError(f"{path!r} is not a dolg_tf index file (bad magic or too short)")
        _, header_len = _PREFIX.unpack(prefix)
        if header_len > min(_MAX_HEADER, size - _PREFIX.size - _DIGEST):
            raise IndexFileError(
                f"{path!r}: header length {header_len} is impossible; the file is truncated or corrupt"
            )
        try:
            header = json.loads(f.read(header_len).decode("utf-8"))
            if not isinstance(header, dict):
                raise TypeError(f"the header is a JSON {type(header).__name__}, not an object")
            # version 1 has no vector section
            sections = [header["faiss_bytes"], header.get("vector_bytes", 0), header["id_bytes"]]
            if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in sections):
                raise TypeError(f"section sizes must be non-negative integers, got {sections}")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
            raise IndexFileError(f"{path!r}: unreadable header ({err}); the file is truncated or corrupt") from err
        faiss_len, vector_len, id_len = sections
        start = _PREFIX.size + header_len
        expected = start + faiss_len + vector_len + id_len + _DIGEST
        if size != expected:
            raise IndexFileError(f"{path!r} is truncated or has trailing data: {size} bytes, expected {expected}")
        if verify:
            digest = hashlib.sha256()
            f.seek(0)
            remaining = size - _DIGEST
            while remaining:
                block = f.read(min(_READ_BLOCK, remaining))
                if not block:
                    raise IndexFileError(f"{path!r} shrank while it was being read")
                digest.update(block)
                remaining -= len(block)
            if digest.digest() != f.read(_DIGEST):
                raise IndexFileError(f"{path!r} is corrupt: SHA-256 checksum mismatch")
        if header.get("format") != "dolg_tf.index" or header.get("version") not in _READABLE_VERSIONS:
            raise IndexFileError(
                f"{path!r}: unsupported format {header.get('format')!r} version {header.get('version')!r} "
                f"(this dolg_tf reads versions {', '.join(map(str, _READABLE_VERSIONS))})"
            )
        try:
            index = cls(**header["options"])
            ntotal = header["ntotal"]
            if not isinstance(ntotal, int) or ntotal < 0:
                raise TypeError(f"ntotal must be a non-negative integer, got {ntotal!r}")
            f.seek(start)
            fidx = _read_faiss_section(f, faiss_len)
            want_vectors = ntotal * index.dim * 4 if index.kind == "ivfpq" else 0
            if vector_len != want_vectors:
                raise ValueError(f"vector section of {vector_len} bytes, expected {want_vectors}")
            vectors_at = start + faiss_len
            if index.kind == "ivfpq" and mmap and ntotal:
                vectors = np.memmap(path, dtype="<f4", mode="r", offset=vectors_at, shape=(ntotal, index.dim))
            elif index.kind == "ivfpq":
                f.seek(vectors_at)
                vectors = np.fromfile(f, dtype="<f4", count=ntotal * index.dim).reshape(ntotal, index.dim)
            if mmap and index.kind != "ivfpq":
                logger.warning(
                    "%r: a %r index has no separate vector section to memory-map; loaded whole", path, index.kind
                )
            f.seek(vectors_at + vector_len)
            id_bytes = f.read(id_len)
            if header["id_type"] == "int64":
                ids = np.load(io.BytesIO(id_bytes), allow_pickle=False)
            else:
                ids = np.asarray(json.loads(id_bytes.decode("utf-8")), dtype=str)
        except (RuntimeError, ValueError, TypeError, KeyError, MemoryError, ConfigError) as err:
            raise IndexFileError(f"{path!r}: cannot decode the index ({err})") from err
        if fidx.d != index.dim or fidx.ntotal != ntotal or ids.shape != (ntotal,):
            raise IndexFileError(
                f"{path!r} is inconsistent: faiss d={fidx.d} ntotal={fidx.ntotal}, ids {ids.shape}, header {ntotal}"
            )
        index._faiss = fidx
        index._ids = ids if ids.size else np.zeros(0, np.int64)
        if index.kind == "ivfpq" and ntotal:
            index._vectors = vectors
        # Runtime search parameters come from the header, whatever faiss serialised.
        index.nprobe = index._nprobe
        index.ef_search = index._ef_search
        return index


def _read_faiss_section(f: io.BufferedReader, length: int) -> faiss.Index:
    """faiss' serialisation of ``length`` bytes at the file's position.

    Read through a bounded callback (no copy of the whole).
    """
    remaining = [length]

    def read(n: int) -> bytes:
        n = min(int(n), remaining[0])
        block = f.read(n)
        remaining[0] -= len(block)
        return block

    index = faiss.read_index(faiss.PyCallbackIOReader(read))
    if remaining[0]:
        raise ValueError(f"faiss read {length - remaining[0]} of the {length} bytes of its section")
    return index
