"""``dolg index build`` / ``dolg index search``: a faiss index of embeddings saved as one file."""

from __future__ import annotations

import argparse
import json
import os
import time

from dolg_tf.cli._common import non_negative_float, positive_int
from dolg_tf.errors import DataError

_MAX_IDS_BYTES = 1 << 30  # an id list file is text; refuse anything absurd before reading it


def load_embeddings(path: str):
    """A 2-D float ``.npy`` file (no pickle), as float32."""
    import numpy as np

    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read embeddings {path!r} (expected a .npy array): {err}") from err
    if arr.ndim != 2 or arr.dtype.kind not in "fiu":
        raise DataError(f"{path!r}: embeddings must be a 2-D numeric array, got {arr.dtype} {arr.shape}")
    return arr.astype(np.float32, copy=False)


def load_ids(path: str) -> list:
    """Ids from ``.json`` (a list of ints or strings, or ``{"ids": [...]}``) or ``.txt`` (one string per line)."""
    try:
        if os.path.getsize(path) > _MAX_IDS_BYTES:
            raise DataError(f"{path!r} is larger than {_MAX_IDS_BYTES} bytes")
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as err:
        raise DataError(f"cannot read ids {path!r}: {err.strerror or err}") from err
    if path.endswith(".json"):
        try:
            ids = json.loads(text)
        except ValueError as err:
            raise DataError(f"{path!r} is not valid JSON: {err}") from err
        if isinstance(ids, dict) and "ids" in ids:
            ids = ids["ids"]
        if not isinstance(ids, list) or not all(isinstance(i, (int, str)) and not isinstance(i, bool) for i in ids):
            raise DataError(f"{path!r}: expected a JSON list of integers or strings")
        return ids
    if path.endswith(".txt"):
        return [line for line in text.splitlines() if line]
    raise DataError(f"{path!r}: ids must be a .json or .txt file")


def _cmd_build(args: argparse.Namespace) -> int:
    from dolg_tf.index import Index

    x = load_embeddings(args.embeddings)
    ids = load_ids(args.ids) if args.ids else None
    t0 = time.perf_counter()
    index = Index(
        x.shape[1],
        args.kind,
        nlist=args.nlist,
        nprobe=args.nprobe,
        m=args.m,
        ef_construction=args.ef_construction,
        ef_search=args.ef_search,
    )
    index.add(x, ids)
    if args.dba is not None:
        index = index.augmented(args.dba, args.dba_alpha)
    build_s = time.perf_counter() - t0
    index.save(args.out)
    summary = {
        "out": args.out,
        "kind": index.kind,
        "ntotal": index.ntotal,
        "dim": index.dim,
        "nlist": index.nlist,
        "dba": args.dba,
        "build_s": round(build_s, 3),
        "bytes": os.path.getsize(args.out),
    }
    print(json.dumps(summary))
    print(f"index build: {index.ntotal} x {index.dim} {index.kind} index in {build_s:.2f} s -> {args.out}")
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    from dolg_tf.index import Index, write_search_results

    index = Index.load(args.index)
    if args.nprobe is not None:
        index.nprobe = args.nprobe
    if args.ef_search is not None:
        index.ef_search = args.ef_search
    queries = load_embeddings(args.queries)
    query_ids = load_ids(args.query_ids) if args.query_ids else list(range(queries.shape[0]))
    if len(query_ids) != queries.shape[0]:
        raise DataError(f"{len(query_ids)} query ids for {queries.shape[0]} queries")
    t0 = time.perf_counter()
    scores, ids = index.search(queries, args.k, qe_alpha=args.qe, qe_neighbours=args.qe_n)
    search_s = time.perf_counter() - t0
    write_search_results(
        args.out,
        query_ids,
        ids,
        scores,
        index=args.index,
        query_expansion=None if args.qe is None else {"alpha": args.qe, "neighbours": args.qe_n},
    )
    print(
        f"index search: {queries.shape[0]} queries, top-{scores.shape[1]} of {index.ntotal} "
        f"({index.kind}) in {search_s:.3f} s -> {args.out}"
    )
    return 0


def register(sub) -> None:
    index = sub.add_parser("index", help="build or search a faiss index of embeddings")
    isub = index.add_subparsers(dest="index_command", required=True, metavar="ACTION")

    build = isub.add_parser("build", help="build an index from embeddings (.npy) and ids, save it to one file")
    build.add_argument("--embeddings", required=True, help="(N, D) float .npy file, e.g. from `dolg embed`")
    build.add_argument("--ids", default=None, help=".json list or .txt (one per line) of N unique ids (default 0..N-1)")
    build.add_argument("--kind", choices=("flat", "ivf", "hnsw"), default="flat", help="index kind (default: flat, exact)")
    build.add_argument("--nlist", type=positive_int, default=None, help="IVF lists (default: 4*sqrt(N), <= N/39)")
    build.add_argument("--nprobe", type=positive_int, default=16, help="IVF lists visited per query (default: 16)")
    build.add_argument("--m", type=positive_int, default=32, help="HNSW graph degree M (default: 32)")
    build.add_argument("--ef-construction", type=positive_int, default=100, help="HNSW build effort (default: 100)")
    build.add_argument("--ef-search", type=positive_int, default=128, help="HNSW search effort (default: 128)")
    build.add_argument("--dba", type=positive_int, default=None, metavar="N", help="database-side augmentation with N neighbours")
    build.add_argument("--dba-alpha", type=non_negative_float, default=3.0, help="DBA weight exponent (default: 3)")
    build.add_argument("--out", required=True, help="index file to write (atomically)")
    build.set_defaults(func=_cmd_build)

    search = isub.add_parser("search", help="search an index with query embeddings, write JSON results")
    search.add_argument("--index", required=True, help="a file written by `dolg index build`")
    search.add_argument("--queries", required=True, help="(Q, D) float .npy file")
    search.add_argument("--query-ids", default=None, help=".json or .txt ids of the queries (default 0..Q-1)")
    search.add_argument("-k", type=positive_int, default=10, help="results per query (default: 10)")
    search.add_argument("--qe", type=non_negative_float, default=None, metavar="ALPHA", help="alpha query expansion")
    search.add_argument("--qe-n", type=positive_int, default=2, help="neighbours for query expansion (default: 2)")
    search.add_argument("--nprobe", type=positive_int, default=None, help="override the IVF nprobe saved in the index")
    search.add_argument("--ef-search", type=positive_int, default=None, help="override the HNSW efSearch saved in the index")
    search.add_argument("--out", required=True, help="JSON results file")
    search.set_defaults(func=_cmd_search)
