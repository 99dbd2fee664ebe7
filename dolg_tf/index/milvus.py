"""A Milvus collection behind the search contract of :class:`dolg_tf.index.Index`.

For galleries that outgrow one process: vectors live in a Milvus server or
cluster (``http://host:19530``), or, for development and tests, in a local
Milvus Lite database (a path ending in ``.db``; pip packages ``pymilvus`` and
``milvus-lite``, the ``milvus`` extra). The contract is the faiss index's:
float ``(N, dim)`` vectors with N unique ids (all non-negative integers or all
non-empty strings) in, ``search(queries, k) -> (scores, ids)`` out, ``(Q, k)``
each, scores descending, the inner product of L2-normalised vectors.

A collection made here has two fields, ``id`` (the primary key: INT64, or
VARCHAR for string ids) and ``embedding`` (FLOAT_VECTOR), one vector index
with metric IP, and strong consistency, so a search sees every add before it.
Index kinds (Milvus' names, or this package's):

=========== ========= =================================================
Milvus      ours      parameters (defaults)
=========== ========= =================================================
FLAT        flat      none (exact)
IVF_FLAT    ivf       ``nlist`` (1024); search ``nprobe`` (16)
HNSW        hnsw      ``m`` (32), ``ef_construction`` (100); search ``ef_search`` (128, at least k)
IVF_PQ      ivfpq     ``nlist``, ``pq_m`` (64 sub-quantisers), ``nbits`` (8); search ``nprobe``
=========== ========= =================================================

Index parameters are sent in the nested form ``{"params": {...}}`` (one
``params`` key holding JSON, which Milvus servers also parse), the only form
Milvus Lite 3.2.2 reads (it ignores them passed flat, silently). After creating the index, the parameters
Milvus reports (``describe_index``) are compared with the requested ones, and
a mismatch is an error rather than a silently different index. Milvus Lite
3.2.2 does not build IVF_PQ (it would search exhaustively without saying so),
so IVF_PQ is refused on a ``.db`` URI. Milvus Lite keeps its file locked until
:meth:`MilvusIndex.close` (or the process's exit).

pymilvus is imported on first use, so importing :mod:`dolg_tf.index` stays light.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from dolg_tf.errors import ConfigError, DataError, IndexFileError
from dolg_tf.index.base import _as_matrix, _check_ids, _positive_int, l2_normalize_rows

logger = logging.getLogger(__name__)

MILVUS_KINDS = ("FLAT", "IVF_FLAT", "HNSW", "IVF_PQ")
KIND_NAMES = {"flat": "FLAT", "ivf": "IVF_FLAT", "hnsw": "HNSW", "ivfpq": "IVF_PQ"}
ID_FIELD = "id"
VECTOR_FIELD = "embedding"
_MAX_TOPK = 16384  # Milvus' limit on k (and on queries per request)
_QUERY_BATCH = 1024  # queries per search request
_ID_BATCH = 1000  # ids per "id in [...]" filter
_INSERT_BYTES = 16 << 20  # rows per insert request: well under gRPC's 64 MiB message limit


def _is_lite(uri: str) -> bool:
    return uri.endswith(".db")


def _milvus():
    """pymilvus, or ConfigError saying how to install it."""
    try:
        import pymilvus
    except ImportError as err:
        raise ConfigError(
            "the Milvus backend needs pymilvus (and milvus-lite for a local .db file): pip install 'dolg-tf[milvus]'"
        ) from err
    return pymilvus


def _message(err: Exception) -> str:
    return str(getattr(err, "message", "") or err).strip()


# Milvus Lite runs one in-process server per file, shared by every client of that file in this process:
# it is stopped (and the file unlocked) when the last of them closes.
_lite_users: dict[str, int] = {}
_lite_lock = threading.Lock()


def _release_lite(uri: str) -> None:
    """Forgets one user of Milvus Lite's server for ``uri``; the last one stops it, which unlocks the file."""
    path = os.path.abspath(uri)
    with _lite_lock:
        _lite_users[path] = _lite_users.get(path, 1) - 1
        if _lite_users[path] > 0:
            return
        del _lite_users[path]
    try:
        from milvus_lite.server_manager import server_manager_instance
    except ImportError:  # another Milvus Lite layout: the file is released at exit
        return
    server_manager_instance.release_server(uri)


def _wait_for_lite_background(uri: str, collection: str, timeout: float = 300.0) -> None:
    """Waits for Milvus Lite's background compaction and index build of ``collection`` (best effort).

    Milvus Lite 3.2.2 offers no call for it; this reaches its in-process engine, and does nothing
    (with a debug log) where that layout differs.
    """
    try:
        from milvus_lite.server_manager import server_manager_instance

        entry = server_manager_instance._servers.get(os.path.abspath(uri))
        if entry is not None:
            entry[1].get_collection(collection)._wait_for_bg(timeout=timeout)
    except Exception as err:
        logger.debug("could not wait for Milvus Lite's background index build: %s", err)


def _close_client(client: Any, uri: str) -> None:
    client.close()
    if _is_lite(uri):
        _release_lite(uri)


class MilvusIndex:
    """A Milvus collection of L2-normalised embeddings with user ids.

    Make one with :meth:`create` or :meth:`open`, not with the constructor.

    Examples:
        >>> index = MilvusIndex.create("gallery.db", "landmarks", 512, "HNSW", id_type="str")
        >>> index.add(gallery_embeddings, ids=["a.jpg", "b.jpg", ...])
        >>> scores, ids = index.search(query_embeddings, k=10)
        >>> index.delete(["b.jpg"]); index.count()
        >>> index.close()
        >>> index = MilvusIndex.open("http://milvus:19530", "landmarks")  # a server: the same calls
    """

    def __init__(
        self,
        client: Any,
        uri: str,
        collection: str,
        *,
        dim: int,
        kind: str,
        id_type: str,
        params: dict[str, int],
        nprobe: int,
        ef_search: int,
        normalize: bool,
    ):
        self._client = client
        self.uri = uri
        self.collection = collection
        self.dim = dim
        self.kind = kind
        self.id_type = id_type
        self.params = dict(params)
        self.normalize = normalize
        self._nprobe = _positive_int("nprobe", nprobe)
        self._ef_search = _positive_int("ef_search", ef_search)

    # ------------------------------------------------------------------ connecting
    @staticmethod
    def _connect(uri: Any, token: str | None, timeout: float) -> Any:
        if not isinstance(uri, str) or not uri:
            raise ConfigError(
                f"uri must be http(s)://host:port of a Milvus server or a path ending in .db, got {uri!r}"
            )
        if not _is_lite(uri) and not uri.startswith(("http://", "https://", "tcp://", "unix:")):
            raise ConfigError(
                f"uri {uri!r} is neither a Milvus server address (http://host:19530) "
                "nor a Milvus Lite database file (a path ending in .db)"
            )
        if _is_lite(uri):
            parent = os.path.dirname(os.path.abspath(uri))
            if not os.path.isdir(parent):
                raise ConfigError(f"cannot create Milvus Lite database {uri!r}: folder {parent!r} does not exist")
            try:
                importlib.import_module("milvus_lite")
            except ImportError as err:
                raise ConfigError(
                    f"{uri!r} is a Milvus Lite database, which needs milvus-lite: pip install 'dolg-tf[milvus]'"
                ) from err
        pymilvus = _milvus()
        try:
            client = pymilvus.MilvusClient(uri=uri, token=token or "", timeout=timeout)
            if _is_lite(uri):
                with _lite_lock:
                    path = os.path.abspath(uri)
                    _lite_users[path] = _lite_users.get(path, 0) + 1
            return client
        except pymilvus.exceptions.MilvusException as err:
            if _is_lite(uri):
                raise ConfigError(
                    f"cannot open Milvus Lite database {uri!r} ({_message(err)}): another process probably has it "
                    "open; Milvus Lite locks its file until the process that opened it closes it or exits"
                ) from err
            raise ConfigError(
                f"cannot reach Milvus at {uri!r} ({_message(err)}): is the server running there? "
                "(a local Milvus Lite database is a path ending in .db)"
            ) from err

    @classmethod
    def create(
        cls,
        uri: str,
        collection: str,
        dim: int,
        kind: str = "FLAT",
        *,
        id_type: str = "int",
        nlist: int = 1024,
        nprobe: int = 16,
        m: int = 32,
        ef_construction: int = 100,
        ef_search: int = 128,
        pq_m: int = 64,
        nbits: int = 8,
        max_id_length: int = 512,
        normalize: bool = True,
        token: str | None = None,
        timeout: float = 10.0,
    ) -> MilvusIndex:
        """Creates a collection with its vector index; ConfigError if it already exists.

        Args:
            uri: ``http://host:19530`` (server, cluster) or a path ending in
                ``.db`` (Milvus Lite, created if missing).
            collection: the collection's name (letters, digits, ``_``).
            dim: embedding dimension.
            kind: ``FLAT``, ``IVF_FLAT``, ``HNSW`` or ``IVF_PQ`` (or ``flat``,
                ``ivf``, ``hnsw``, ``ivfpq``).
            id_type: ``"int"`` (INT64 primary key) or ``"str"`` (VARCHAR).
            nlist: IVF_FLAT / IVF_PQ lists.
            nprobe: IVF_*: lists visited per query (a search parameter).
            m: HNSW graph degree ``M``.
            ef_construction: HNSW build effort.
            ef_search: HNSW search effort ``ef`` (raised to k when smaller).
            pq_m: IVF_PQ sub-quantisers (must divide ``dim``).
            nbits: IVF_PQ bits per sub-quantiser code.
            max_id_length: VARCHAR length of string ids.
            normalize: L2-normalise vectors on add and search.
            token: Milvus credentials (``"user:password"`` or an API key).
            timeout: seconds to wait for the server when connecting.
        """
        kind = KIND_NAMES.get(kind, kind)
        if kind not in MILVUS_KINDS:
            raise ConfigError(f"kind must be one of {MILVUS_KINDS} (or {tuple(KIND_NAMES)}), got {kind!r}")
        dim = _positive_int("dim", dim)
        if id_type not in ("int", "str"):
            raise ConfigError(f"id_type must be 'int' or 'str', got {id_type!r}")
        _positive_int("max_id_length", max_id_length)
        params: dict[str, int] = {}
        if kind in ("IVF_FLAT", "IVF_PQ"):
            params["nlist"] = _positive_int("nlist", nlist)
        if kind == "HNSW":
            params.update(M=_positive_int("m", m), efConstruction=_positive_int("ef_construction", ef_construction))
        if kind == "IVF_PQ":
            params.update(m=_positive_int("pq_m", pq_m), nbits=_positive_int("nbits", nbits))
            if dim % pq_m:
                raise ConfigError(f"pq_m={pq_m} must divide the dimension {dim}")
            if _is_lite(uri):
                raise ConfigError(
                    "Milvus Lite does not build IVF_PQ indexes (version 3.2.2 would silently search every vector): "
                    "use FLAT, IVF_FLAT or HNSW with a .db file, or a Milvus server for IVF_PQ"
                )
        if not isinstance(collection, str) or not collection:
            raise ConfigError(f"collection must be a non-empty name, got {collection!r}")
        client = cls._connect(uri, token, timeout)
        pymilvus = _milvus()
        try:
            if client.has_collection(collection):
                raise ConfigError(
                    f"Milvus collection {collection!r} already exists at {uri!r}: "
                    "open it to add to it, or drop it first"
                )
            DataType = pymilvus.DataType
            schema = pymilvus.MilvusClient.create_schema(
                auto_id=False, enable_dynamic_field=False, description="dolg_tf embeddings"
            )
            if id_type == "int":
                schema.add_field(ID_FIELD, DataType.INT64, is_primary=True)
            else:
                schema.add_field(ID_FIELD, DataType.VARCHAR, is_primary=True, max_length=int(max_id_length))
            schema.add_field(VECTOR_FIELD, DataType.FLOAT_VECTOR, dim=dim)
            index_params = client.prepare_index_params()
            # Nested: Milvus Lite ignores index parameters passed flat (servers read both forms).
            index_params.add_index(
                field_name=VECTOR_FIELD, index_type=kind, metric_type="IP", params={"params": params}
            )
            client.create_collection(collection, schema=schema, consistency_level="Strong")
            # sync=False: waiting for the build asks for a timestamp, which Milvus Lite does not implement
            # (its server logs a traceback); a server builds the index as segments are flushed anyway.
            client.create_index(collection, index_params, sync=False)
        except pymilvus.exceptions.MilvusException as err:
            _close_client(client, uri)
            raise ConfigError(f"Milvus could not create collection {collection!r} at {uri!r}: {_message(err)}") from err
        except BaseException:
            _close_client(client, uri)
            raise
        try:
            index = cls._opened(client, uri, collection, nprobe=nprobe, ef_search=ef_search, normalize=normalize)
        except BaseException:
            _close_client(client, uri)
            raise
        if index.kind != kind or index.params != params:
            got = (index.kind, index.params)
            index.close()
            raise ConfigError(
                f"Milvus at {uri!r} built {got[0]} {got[1]} for collection {collection!r}, not the requested "
                f"{kind} {params}: this Milvus ignored the index parameters"
            )
        logger.info("created Milvus collection %r at %s: dim %d, %s %s", collection, uri, dim, kind, params)
        return index

    @classmethod
    def open(
        cls,
        uri: str,
        collection: str,
        *,
        nprobe: int = 16,
        ef_search: int = 128,
        normalize: bool = True,
        token: str | None = None,
        timeout: float = 10.0,
    ) -> MilvusIndex:
        """Opens an existing collection made by :meth:`create`; IndexFileError if there is none."""
        client = cls._connect(uri, token, timeout)
        try:
            return cls._opened(client, uri, collection, nprobe=nprobe, ef_search=ef_search, normalize=normalize)
        except BaseException:
            _close_client(client, uri)
            raise

    @classmethod
    def _opened(cls, client: Any, uri: str, collection: str, **kwargs: Any) -> MilvusIndex:
        pymilvus = _milvus()
        try:
            if not client.has_collection(collection):
                names = sorted(client.list_collections())
                raise IndexFileError(
                    f"Milvus collection {collection!r} does not exist at {uri!r} "
                    f"(collections there: {', '.join(map(repr, names)) or 'none'}); "
                    "build it with `dolg index build --backend milvus`"
                )
            info = client.describe_collection(collection)
            fields = {f["name"]: f for f in info["fields"]}
            id_field, vec_field = fields.get(ID_FIELD), fields.get(VECTOR_FIELD)
            if (
                id_field is None
                or vec_field is None
                or vec_field["type"] != pymilvus.DataType.FLOAT_VECTOR
                or id_field["type"] not in (pymilvus.DataType.INT64, pymilvus.DataType.VARCHAR)
            ):
                raise IndexFileError(
                    f"Milvus collection {collection!r} at {uri!r} was not made by dolg_tf: it needs a primary key "
                    f"{ID_FIELD!r} (INT64 or VARCHAR) and a FLOAT_VECTOR field {VECTOR_FIELD!r}, "
                    f"it has {sorted(fields)}"
                )
            described = client.describe_index(collection, VECTOR_FIELD) or {}
            client.load_collection(collection)
        except pymilvus.exceptions.MilvusException as err:
            raise IndexFileError(f"cannot open Milvus collection {collection!r} at {uri!r}: {_message(err)}") from err
        if described.get("metric_type") != "IP":
            raise IndexFileError(
                f"Milvus collection {collection!r} at {uri!r} indexes with metric {described.get('metric_type')!r}, "
                "not IP (inner product): its scores would not be cosine similarities"
            )
        params = {key: int(value) for key, value in (described.get("params") or {}).items()}
        return cls(
            client,
            uri,
            collection,
            dim=int(vec_field["params"]["dim"]),
            kind=str(described.get("index_type")),
            id_type="int" if id_field["type"] == pymilvus.DataType.INT64 else "str",
            params=params,
            **kwargs,
        )

    def close(self) -> None:
        """Closes the connection; for Milvus Lite also stops its in-process server, which unlocks the file."""
        if self._client is None:
            return
        client, self._client = self._client, None
        _close_client(client, self.uri)

    def __enter__(self) -> MilvusIndex:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def drop(self) -> None:
        """Deletes the collection and everything in it, then closes."""
        self._call("drop the collection", self._live().drop_collection, self.collection)
        self.close()

    # ------------------------------------------------------------------ properties
    def _live(self) -> Any:
        if self._client is None:
            raise ConfigError(f"Milvus collection {self.collection!r} was closed: open it again")
        return self._client

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        pymilvus = _milvus()
        try:
            return fn(*args, **kwargs)
        except pymilvus.exceptions.MilvusException as err:
            raise DataError(
                f"Milvus could not {what} in collection {self.collection!r} at {self.uri!r}: {_message(err)}"
            ) from err

    def count(self) -> int:
        """Number of vectors in the collection (deleted ones excluded)."""
        rows = self._call("count", self._live().query, self.collection, filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    @property
    def ntotal(self) -> int:
        """Number of vectors in the collection (:meth:`count`)."""
        return self.count()

    def __len__(self) -> int:
        return self.count()

    @property
    def nprobe(self) -> int:
        return self._nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        self._nprobe = _positive_int("nprobe", value)

    @property
    def ef_search(self) -> int:
        return self._ef_search

    @ef_search.setter
    def ef_search(self, value: int) -> None:
        self._ef_search = _positive_int("ef_search", value)

    def describe(self) -> dict[str, Any]:
        """What Milvus reports about the vector index (type, metric, parameters, indexed rows)."""
        return dict(self._call("describe the index", self._live().describe_index, self.collection, VECTOR_FIELD))

    def __repr__(self) -> str:
        return f"MilvusIndex(uri={self.uri!r}, collection={self.collection!r}, dim={self.dim}, kind={self.kind!r})"

    # ------------------------------------------------------------------ data
    def _prepare(self, x: Any, what: str) -> np.ndarray:
        arr = _as_matrix(x, self.dim, what)
        return l2_normalize_rows(arr, what) if self.normalize else arr

    def _check_id_values(self, ids: np.ndarray) -> None:
        if ids.size == 0:
            return
        if (ids.dtype.kind == "i") != (self.id_type == "int"):
            raise DataError(
                f"ids must all be of one type: the collection has "
                f"{'integer' if self.id_type == 'int' else 'string'} ids"
            )

    def _id_filter(self, ids: list[Any]) -> str:
        """``id in [...]`` for Milvus' expression parser; string ids as escaped double-quoted literals."""
        if self.id_type == "int":
            return f"{ID_FIELD} in [{', '.join(str(int(i)) for i in ids)}]"
        # JSON's escapes (\", \\, \n, \uXXXX) are the parser's; pymilvus' own get/delete do not escape.
        return f"{ID_FIELD} in [{', '.join(json.dumps(i, ensure_ascii=False) for i in ids)}]"

    def _existing(self, ids: np.ndarray) -> list[Any]:
        """The ids among ``ids`` that the collection already holds."""
        found: list[Any] = []
        for start in range(0, ids.size, _ID_BATCH):
            expr = self._id_filter(ids[start : start + _ID_BATCH].tolist())
            rows = self._call("look up ids", self._live().query, self.collection, filter=expr, output_fields=[ID_FIELD])
            found.extend(row[ID_FIELD] for row in rows)
        return found

    def add(self, embeddings: Any, ids: Sequence[int] | Sequence[str] | np.ndarray | None = None) -> None:
        """Inserts vectors with their ids, then flushes.

        Args:
            embeddings: float ``(N, dim)``; finite, non-zero rows.
            ids: N unique ids of the collection's type, not already in it.
                ``None`` numbers the rows ``count() .. count() + N - 1``
                (integer-id collections only).

        Raises:
            InputShapeError: wrong dimension or id count.
            DataError: non-finite or zero vectors; duplicate, present or wrongly typed ids.
        """
        x = self._prepare(embeddings, "embeddings")
        n = x.shape[0]
        if ids is None:
            if self.id_type != "int":
                raise DataError("this collection has string ids: pass ids explicitly")
            start = self.count()
            new_ids = np.arange(start, start + n, dtype=np.int64)
        else:
            new_ids = _check_ids(ids, n)
        if n == 0:
            return
        self._check_id_values(new_ids)
        if new_ids.dtype.kind == "U":
            longest = int(np.char.str_len(new_ids).max())
            # VARCHAR max_length counts bytes; measure the longest id's UTF-8 size
            limit = self._max_id_length()
            too_long = [s for s in new_ids.tolist() if len(s.encode("utf-8")) > limit]
            if too_long:
                raise DataError(
                    f"string id {too_long[0]!r} is longer than the collection's {limit} bytes "
                    f"(longest: {longest} chars)"
                )
        present = self._existing(new_ids)
        if present:
            raise DataError(f"id {present[0]!r} is already in Milvus collection {self.collection!r}")
        rows_per_request = max(1, _INSERT_BYTES // (4 * self.dim))
        id_list = new_ids.tolist()
        for start in range(0, n, rows_per_request):
            rows = [
                {ID_FIELD: i, VECTOR_FIELD: v}
                for i, v in zip(id_list[start : start + rows_per_request], x[start : start + rows_per_request])
            ]
            self._call("insert", self._live().insert, self.collection, rows)
        self._call("flush", self._live().flush, self.collection)
        if _is_lite(self.uri):
            # Milvus Lite searches rows added after load_collection exhaustively until the next load, and
            # compacts and indexes flushed segments in a background thread (describe_index says "Finished"
            # regardless): wait for that thread, then reload. A server hands segments to its index itself.
            _wait_for_lite_background(self.uri, self.collection)
            self._call("release the collection", self._live().release_collection, self.collection)
            self._call("load the collection", self._live().load_collection, self.collection)

    def _max_id_length(self) -> int:
        info = self._call("describe the collection", self._live().describe_collection, self.collection)
        field = next(f for f in info["fields"] if f["name"] == ID_FIELD)
        return int(field.get("params", {}).get("max_length", 65535))

    def delete(self, ids: Sequence[int] | Sequence[str] | np.ndarray) -> int:
        """Deletes the vectors with these ids; returns how many of them were in the collection."""
        arr = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids)
        if arr.size == 0:
            return 0
        arr = _check_ids(arr, arr.shape[0])
        self._check_id_values(arr)
        present = self._existing(arr)
        if present:
            for start in range(0, len(present), _ID_BATCH):
                expr = self._id_filter(present[start : start + _ID_BATCH])
                self._call("delete", self._live().delete, self.collection, filter=expr)
            self._call("flush", self._live().flush, self.collection)
        return len(present)

    def search(self, queries: Any, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Top-k most similar vectors of each query.

        Args:
            queries: float ``(Q, dim)``.
            k: results per query (at most 16384, Milvus' limit); more than
                :meth:`count` returns ``count()`` columns.

        Returns:
            ``(scores, ids)``: float32 ``(Q, k')`` inner products, descending,
            and the ids at those ranks (int64 or str array). Missing results
            (an approximate index may find fewer) have score ``-inf`` and id
            ``-1`` or ``""``.
        """
        k = _positive_int("k", k)
        if k > _MAX_TOPK:
            raise ConfigError(f"k={k} is above Milvus' limit of {_MAX_TOPK} results per query")
        q = self._prepare(queries, "queries")
        total = self.count()
        if total == 0:
            raise DataError(f"Milvus collection {self.collection!r} is empty: add vectors before searching")
        k = min(k, total)
        params: dict[str, int] = {}
        if self.kind in ("IVF_FLAT", "IVF_PQ"):
            params["nprobe"] = self._nprobe
        elif self.kind == "HNSW":
            params["ef"] = max(self._ef_search, k)  # Milvus requires ef >= k
        scores = np.full((q.shape[0], k), -np.inf, np.float32)
        ids = (
            np.full((q.shape[0], k), -1, np.int64)
            if self.id_type == "int"
            else np.full((q.shape[0], k), "", dtype=object)
        )
        for start in range(0, q.shape[0], _QUERY_BATCH):
            hits = self._call(
                "search",
                self._live().search,
                self.collection,
                data=q[start : start + _QUERY_BATCH],
                limit=k,
                anns_field=VECTOR_FIELD,
                search_params={"metric_type": "IP", "params": params},
                output_fields=[ID_FIELD],
            )
            for row, found in enumerate(hits, start):
                for col, hit in enumerate(found):
                    scores[row, col] = hit["distance"]
                    ids[row, col] = hit[ID_FIELD] if ID_FIELD in hit else hit["entity"][ID_FIELD]
        if self.id_type == "str":
            ids = ids.astype(str)
        return scores, ids


def drop_collection(uri: str, collection: str, *, token: str | None = None, timeout: float = 10.0) -> bool:
    """Drops ``collection`` at ``uri`` if it exists; returns whether it did."""
    client = MilvusIndex._connect(uri, token, timeout)
    pymilvus = _milvus()
    try:
        if not client.has_collection(collection):
            return False
        client.drop_collection(collection)
        return True
    except pymilvus.exceptions.MilvusException as err:
        raise DataError(f"Milvus could not drop collection {collection!r} at {uri!r}: {_message(err)}") from err
    finally:
        _close_client(client, uri)
