"""``dolg index build`` / ``dolg index search``: a faiss index saved as one file, or a Milvus collection."""

from __future__ import annotations

import argparse
import json
import os
import time

from dolg_tf.cli._common import non_negative_float, positive_int
from dolg_tf.errors import ConfigError, DataError


def _need(args: argparse.Namespace, backend: str, *names: str) -> None:
    missing = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) is None]
    if missing:
        raise ConfigError(f"--backend {backend} needs {' and '.join(missing)}")


def _refuse(args: argparse.Namespace, backend: str, **flags: bool) -> None:
    used = [f"--{name.replace('_', '-')}" for name, present in flags.items() if present]
    if used:
        verb = "applies" if len(used) == 1 else "apply"
        raise ConfigError(f"{', '.join(used)} {verb} to the other backend, not --backend {backend}")


def _build_milvus(args: argparse.Namespace, x, ids) -> int:
    import math

    from dolg_tf.index import MilvusIndex

    _need(args, "milvus", "uri", "collection")
    _refuse(
        args,
        "milvus",
        out=args.out is not None,
        dba=args.dba is not None,
        factory=args.factory is not None,
        rerank=args.rerank is not None,
    )
    id_type = "str" if ids and isinstance(ids[0], str) else "int"
    n = x.shape[0]
    nlist = args.nlist or int(min(max(1, round(4 * math.sqrt(n))), max(1, n // 39)))
    t0 = time.perf_counter()
    if args.append:
        index = MilvusIndex.open(args.uri, args.collection)
    else:
        if args.replace:
            from dolg_tf.index.milvus import drop_collection

            drop_collection(args.uri, args.collection)
        index = MilvusIndex.create(
            args.uri,
            args.collection,
            x.shape[1],
            args.kind,
            id_type=id_type,
            nlist=nlist,
            m=args.m,
            ef_construction=args.ef_construction,
            pq_m=args.pq_m or 64,
        )
    with index:
        index.add(x, ids)
        build_s = time.perf_counter() - t0
        summary = {
            "backend": "milvus",
            "uri": args.uri,
            "collection": args.collection,
            "kind": index.kind,
            "params": index.params,
            "ntotal": index.count(),
            "dim": index.dim,
            "build_s": round(build_s, 3),
        }
    print(json.dumps(summary))
    print(
        f"index build: {summary['ntotal']} x {summary['dim']} {summary['kind']} Milvus collection {args.collection!r} "
        f"at {args.uri} in {build_s:.2f} s"
    )
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
    from dolg_tf.embeddings import read_embeddings, read_ids

    x = read_embeddings(args.embeddings, name="--embeddings", ids_name="--ids")
    ids = read_ids(args.ids, name="--ids", embeddings_name="--embeddings") if args.ids else None
    if args.backend == "milvus":
        return _build_milvus(args, x, ids)
    from dolg_tf.index import Index

    _need(args, "faiss", "out")
    _refuse(
        args,
        "faiss",
        uri=args.uri is not None,
        collection=args.collection is not None,
        append=args.append,
        replace=args.replace,
    )
    t0 = time.perf_counter()
    extra = {"pq_m": args.pq_m, "factory": args.factory, "rerank": args.rerank}
    index = Index(
        x.shape[1],
        args.kind,
        nlist=args.nlist,
        nprobe=args.nprobe,
        m=args.m,
        ef_construction=args.ef_construction,
        ef_search=args.ef_search,
        **{k: v for k, v in extra.items() if v is not None},
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
    from dolg_tf.embeddings import read_embeddings, read_ids
    from dolg_tf.index import write_search_results

    queries = read_embeddings(args.queries, name="--queries", ids_name="--query-ids")
    if args.query_ids:
        query_ids = read_ids(args.query_ids, name="--query-ids", embeddings_name="--queries")
    else:
        query_ids = list(range(queries.shape[0]))
    if len(query_ids) != queries.shape[0]:
        raise DataError(f"{len(query_ids)} query ids for {queries.shape[0]} queries")
    if args.backend == "milvus":
        from dolg_tf.index import MilvusIndex

        _need(args, "milvus", "uri", "collection")
        _refuse(
            args,
            "milvus",
            index=args.index is not None,
            qe=args.qe is not None,
            rerank=args.rerank is not None,
            mmap=args.mmap,
        )
        with MilvusIndex.open(args.uri, args.collection) as index:
            if args.nprobe is not None:
                index.nprobe = args.nprobe
            if args.ef_search is not None:
                index.ef_search = args.ef_search
            t0 = time.perf_counter()
            scores, ids = index.search(queries, args.k)
            search_s = time.perf_counter() - t0
            total, kind = index.count(), index.kind
        source = f"{args.uri}#{args.collection}"
    else:
        from dolg_tf.index import Index

        _need(args, "faiss", "index")
        _refuse(args, "faiss", uri=args.uri is not None, collection=args.collection is not None)
        index = Index.load(args.index, mmap=args.mmap)
        if args.nprobe is not None:
            index.nprobe = args.nprobe
        if args.ef_search is not None:
            index.ef_search = args.ef_search
        if args.rerank is not None:
            index.rerank = args.rerank
        t0 = time.perf_counter()
        scores, ids = index.search(queries, args.k, qe_alpha=args.qe, qe_neighbours=args.qe_n)
        search_s = time.perf_counter() - t0
        total, kind, source = index.ntotal, index.kind, args.index
    write_search_results(
        args.out,
        query_ids,
        ids,
        scores,
        index=source,
        query_expansion=None if args.qe is None else {"alpha": args.qe, "neighbours": args.qe_n},
    )
    print(
        f"index search: {queries.shape[0]} queries, top-{scores.shape[1]} of {total} "
        f"({kind}) in {search_s:.3f} s -> {args.out}"
    )
    return 0


def register(sub) -> None:
    index = sub.add_parser(
        "index",
        help="build or search a nearest-neighbour index of embeddings (faiss file or Milvus collection)",
        description="Build or search a nearest-neighbour index of embeddings: a faiss index saved as one file "
        "(--backend faiss, the default) or a Milvus collection (--backend milvus: a server at http://host:19530, "
        "or a local Milvus Lite file *.db).",
    )
    isub = index.add_subparsers(dest="index_command", required=True, metavar="ACTION")

    build = isub.add_parser("build", help="build an index from embeddings (.npy) and ids")
    build.add_argument("--embeddings", required=True, help="(N, D) float .npy file, e.g. from `dolg embed`")
    build.add_argument("--ids", default=None, help=".json list or .txt (one per line) of N unique ids (default 0..N-1)")
    build.add_argument("--backend", choices=("faiss", "milvus"), default="faiss", help="faiss file (default) or Milvus")
    build.add_argument(
        "--kind",
        choices=("flat", "ivf", "hnsw", "ivfpq"),
        default="flat",
        help="flat (exact, default), ivf, hnsw, or ivfpq (compressed; Milvus: IVF_PQ)",
    )
    build.add_argument("--nlist", type=positive_int, default=None, help="IVF lists (default: 4*sqrt(N), <= N/39)")
    build.add_argument(
        "--nprobe", type=positive_int, default=16, help="faiss: IVF lists visited per query (default: 16)"
    )
    build.add_argument("--m", type=positive_int, default=32, help="HNSW graph degree M (default: 32)")
    build.add_argument("--ef-construction", type=positive_int, default=100, help="HNSW build effort (default: 100)")
    build.add_argument("--ef-search", type=positive_int, default=128, help="faiss: HNSW search effort (default: 128)")
    build.add_argument(
        "--pq-m",
        type=positive_int,
        default=None,
        help="ivfpq sub-quantisers (faiss: 4-bit, default 128; Milvus IVF_PQ: 8-bit, default 64)",
    )
    build.add_argument(
        "--factory", default=None, help="faiss ivfpq: a faiss index_factory string, e.g. OPQ64,IVF65536,PQ64np"
    )
    build.add_argument(
        "--rerank",
        type=positive_int,
        default=None,
        help="faiss ivfpq: k * RERANK candidates re-scored exactly (default: 4)",
    )
    build.add_argument(
        "--dba",
        type=positive_int,
        default=None,
        metavar="N",
        help="faiss: database-side augmentation with N neighbours",
    )
    build.add_argument("--dba-alpha", type=non_negative_float, default=3.0, help="DBA weight exponent (default: 3)")
    build.add_argument("--out", default=None, help="faiss: index file to write (atomically)")
    build.add_argument("--uri", default=None, help="milvus: http://host:19530, or a Milvus Lite file ending in .db")
    build.add_argument("--collection", default=None, help="milvus: collection name (created; must not exist)")
    exists = build.add_mutually_exclusive_group()
    exists.add_argument("--append", action="store_true", help="milvus: add to an existing collection")
    exists.add_argument("--replace", action="store_true", help="milvus: drop an existing collection of that name first")
    build.set_defaults(func=_cmd_build)

    search = isub.add_parser("search", help="search an index with query embeddings, write JSON results")
    search.add_argument("--index", default=None, help="faiss: a file written by `dolg index build`")
    search.add_argument(
        "--backend", choices=("faiss", "milvus"), default="faiss", help="faiss file (default) or Milvus"
    )
    search.add_argument("--uri", default=None, help="milvus: http://host:19530, or a Milvus Lite file ending in .db")
    search.add_argument("--collection", default=None, help="milvus: collection name")
    search.add_argument("--queries", required=True, help="(Q, D) float .npy file")
    search.add_argument("--query-ids", default=None, help=".json or .txt ids of the queries (default 0..Q-1)")
    search.add_argument("-k", type=positive_int, default=10, help="results per query (default: 10)")
    search.add_argument(
        "--qe", type=non_negative_float, default=None, metavar="ALPHA", help="faiss: alpha query expansion"
    )
    search.add_argument("--qe-n", type=positive_int, default=2, help="neighbours for query expansion (default: 2)")
    search.add_argument(
        "--nprobe",
        type=positive_int,
        default=None,
        help="override the IVF nprobe (faiss: saved in the index; Milvus: 16)",
    )
    search.add_argument(
        "--ef-search", type=positive_int, default=None, help="override the HNSW efSearch (faiss: saved; Milvus: 128)"
    )
    search.add_argument("--rerank", type=positive_int, default=None, help="faiss ivfpq: override the re-ranking factor")
    search.add_argument(
        "--mmap", action="store_true", help="faiss ivfpq: leave the full vectors on disk (memory-mapped)"
    )
    search.add_argument("--out", required=True, help="JSON results file")
    search.set_defaults(func=_cmd_search)
