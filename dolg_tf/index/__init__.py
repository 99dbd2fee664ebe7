"""Nearest-neighbour search of DOLG embeddings: one search contract, two backends.

- :class:`Index` (faiss, in-process, saved as one file): ``"flat"`` (exact),
  ``"ivf"``, ``"hnsw"`` and the compressed ``"ivfpq"`` (product-quantised
  codes re-ranked exactly against the full vectors, which can stay on disk,
  memory-mapped). See :mod:`dolg_tf.index.faiss_index`.
- :class:`MilvusIndex`: a collection in a Milvus server or cluster
  (``http://host:19530``) or in a local Milvus Lite file (``*.db``), with
  FLAT, IVF_FLAT, HNSW or IVF_PQ. See :mod:`dolg_tf.index.milvus`.

Both take ``(N, dim)`` vectors with N unique ids (all non-negative integers or
all non-empty strings) and answer ``search(queries, k) -> (scores, ids)``,
each ``(Q, k)``, scores descending: the inner product of L2-normalised vectors
(:class:`SearchIndex`); :func:`search_shards` merges the answers of several
indexes (shards of one gallery) by score. Importing this package imports numpy and faiss, never
TensorFlow, Keras, :mod:`dolg_tf.model` or pymilvus (loaded on first use).
"""

from dolg_tf.index.base import (
    SearchIndex,
    brute_force_search,
    l2_normalize_rows,
    search_shards,
    write_search_results,
)
from dolg_tf.index.faiss_index import (
    FORMAT_VERSION,
    KINDS,
    Index,
    alpha_query_expansion,
    database_side_augmentation,
)
from dolg_tf.index.milvus import MILVUS_KINDS, MilvusIndex

__all__ = [
    "FORMAT_VERSION",
    "KINDS",
    "MILVUS_KINDS",
    "Index",
    "MilvusIndex",
    "SearchIndex",
    "alpha_query_expansion",
    "brute_force_search",
    "database_side_augmentation",
    "l2_normalize_rows",
    "search_shards",
    "write_search_results",
]
