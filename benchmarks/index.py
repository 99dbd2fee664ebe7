"""Nearest-neighbour search at scale: exact (numpy, faiss flat), IVF, HNSW and compressed IVF-PQ in one run.

Synthetic unit-norm vectors (default 1,000,000 x 512, like DOLG descriptors):
``--data clustered`` (default) draws each vector around one of N/100 random
centres, so each query has a neighbourhood to find, as landmark photos do;
``--data uniform`` draws them uniformly on the sphere (the hardest case for
approximate search, with no structure at all). Queries are fresh draws of the
same process. The exact top-k comes from the numpy brute force (chunked
matmul + argpartition), which is also timed against ``Index(kind="flat")``,
interleaved, after a warm-up, median of ``--repeats``.

Each approximate setting (IVF nprobe, HNSW efSearch, IVF-PQ nprobe x rerank)
is timed after a warm-up, ``--repeats`` times, each run followed by one exact
search with the flat index, so its speed-up over exact search is a ratio of
medians measured interleaved. Per kind: build time, bytes per vector held in
RAM (:meth:`dolg_tf.index.Index.memory_bytes`, faiss' structures + ids, plus
the full vectors unless memory-mapped), RSS growth while building, and
recall@k against the exact top-k. The compressed kind is saved, then loaded
with ``mmap=True``: its full vectors (used only to re-rank) stay in the file,
and the file's size per vector is reported as disk bytes per vector.
Prints one JSON line and human lines.

    python benchmarks/index.py                                  # 1M x 512 (the better part of an hour on 2 cores)
    python benchmarks/index.py --n 100000 --queries 200 --out bench_index.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time
from functools import partial

from _common import cpu_model, rss_bytes


def _unit_rows(x):
    import numpy as np

    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def make_data(n: int, dim: int, queries: int, kind: str, seed: int, chunk: int = 100_000):
    """float32 unit-norm database and queries, generated in chunks (a 1M x 512 float64 draw would need 4 GB)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    db = np.empty((n, dim), np.float32)
    if kind == "uniform":
        for s in range(0, n, chunk):
            db[s : s + chunk] = _unit_rows(rng.standard_normal((min(chunk, n - s), dim), dtype=np.float32))
        q = _unit_rows(rng.standard_normal((queries, dim), dtype=np.float32))
        return db, q
    centres = _unit_rows(rng.standard_normal((max(1, n // 100), dim), dtype=np.float32))
    # noise of norm ~0.8 per vector: same-centre vectors have cosine ~0.6, others ~0
    sigma = np.float32(0.8 / np.sqrt(dim))

    def draw(count):
        x = centres[rng.integers(0, len(centres), count)]
        x += sigma * rng.standard_normal((count, dim), dtype=np.float32)
        return _unit_rows(x)

    for s in range(0, n, chunk):
        db[s : s + chunk] = draw(min(chunk, n - s))
    return db, draw(queries)


def recall_at(found, exact) -> float:
    import numpy as np

    k = exact.shape[1]
    hits = [np.intersect1d(f[:k], e, assume_unique=True).size for f, e in zip(found, exact)]
    return float(np.mean(hits) / k)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="database vectors (default: 1,000,000)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--data", choices=("clustered", "uniform"), default="clustered")
    parser.add_argument("--kinds", default="flat,ivf,hnsw,ivfpq")
    parser.add_argument(
        "--nlist", type=int, default=None, help="IVF / IVF-PQ lists (default: the Index rule, 4*sqrt(n))"
    )
    parser.add_argument("--train-size", type=int, default=None, help="IVF training sample (default: min(n, 64*nlist))")
    parser.add_argument("--nprobe", default="16,32,64", help="IVF nprobe values")
    parser.add_argument("--m", type=int, default=32, help="HNSW M")
    parser.add_argument("--ef-construction", type=int, default=40)
    parser.add_argument("--ef-search", default="128,512")
    parser.add_argument("--pq-m", type=int, default=128, help="IVF-PQ 4-bit sub-quantisers (pq_m / 2 bytes per code)")
    parser.add_argument(
        "--factory", default=None, help="IVF-PQ faiss factory string (default: IVF{nlist},PQ{pq_m}x4fs)"
    )
    parser.add_argument("--pq-nprobe", default="16,64", help="IVF-PQ nprobe values")
    parser.add_argument(
        "--rerank", default="1,4", help="IVF-PQ rerank factors (k * rerank candidates re-scored exactly)"
    )
    parser.add_argument("--threads", type=int, default=None, help="faiss OpenMP threads (default: faiss' own)")
    parser.add_argument("--tmpdir", default=None, help="where the IVF-PQ file is written (default: the system's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()

    import faiss
    import numpy as np

    from dolg_tf.index import Index, brute_force_search

    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    kinds = args.kinds.split(",")
    t0 = time.perf_counter()
    db, queries = make_data(args.n, args.dim, args.queries, args.data, args.seed)
    result: dict = {
        "benchmark": "index",
        "n": args.n,
        "dim": args.dim,
        "queries": args.queries,
        "k": args.k,
        "data": args.data,
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "faiss": faiss.__version__,
        "faiss_threads": faiss.omp_get_max_threads(),
        "numpy": np.__version__,
        "data_s": round(time.perf_counter() - t0, 1),
        "database_bytes": int(db.nbytes),
    }
    n, q, k = args.n, args.queries, args.k

    def timed(fn):
        t = time.perf_counter()
        out = fn()
        return time.perf_counter() - t, out

    # --- exact: numpy brute force vs faiss flat, interleaved after a warm-up
    first_numpy_s, (_, exact) = timed(lambda: brute_force_search(queries, db, k))
    flat = None
    if "flat" in kinds:
        rss = rss_bytes()
        build_s, flat = timed(lambda: _build(Index(args.dim, "flat", normalize=False), db))
        flat_rss = rss_bytes() - rss
        flat.search(queries, k)  # warm-up
    # Without flat there is nothing to interleave with: the ground-truth pass is the numpy figure.
    numpy_times, flat_times = ([], []) if flat is not None else ([first_numpy_s], [])
    for _ in range(args.repeats if flat is not None else 0):
        numpy_times.append(timed(lambda: brute_force_search(queries, db, k))[0])
        s, (_, ids) = timed(lambda: flat.search(queries, k))
        flat_times.append(s)
    result["numpy_bruteforce"] = {"search_s": round(statistics.median(numpy_times), 3), "runs": len(numpy_times)}
    if flat is not None:
        med = statistics.median(flat_times)
        result["flat"] = {
            "build_s": round(build_s, 2),
            "search_s": round(med, 3),
            "queries_per_s": round(q / med, 1),
            "speedup_vs_numpy": round(statistics.median(numpy_times) / med, 2),
            f"recall@{k}": recall_at(ids, exact),
            "bytes_per_vector": round(flat.memory_bytes() / n, 1),
            "rss_growth_bytes": int(flat_rss),
        }

    # --- approximate kinds, each setting interleaved with exact (flat) searches
    tmpdir = tempfile.mkdtemp(prefix="dolg-bench-index-", dir=args.tmpdir)
    for kind in [kd for kd in kinds if kd in ("ivf", "hnsw", "ivfpq")]:
        rss = rss_bytes()
        entry: dict = {}
        if kind in ("ivf", "ivfpq"):
            nlist = args.nlist or int(min(max(1, round(4 * np.sqrt(n))), max(1, n // 39)))
            extra = {"pq_m": args.pq_m, "factory": args.factory} if kind == "ivfpq" else {}
            index = Index(args.dim, kind, nlist=nlist, normalize=False, **extra)
            nlist = index.nlist
            train_n = min(n, args.train_size or 64 * nlist)
            sample = db[np.random.default_rng(1).choice(n, train_n, replace=False)]
            train_s, _ = timed(partial(index.train, sample))
            del sample
            entry.update(nlist=nlist, train_vectors=train_n, train_s=round(train_s, 2))
            if kind == "ivfpq":
                entry.update(factory=args.factory or f"IVF{nlist},PQ{args.pq_m}x4fs")
                settings = [{"nprobe": p, "rerank": r} for p in _ints(args.pq_nprobe) for r in _ints(args.rerank)]
            else:
                settings = [{"nprobe": p} for p in _ints(args.nprobe)]
        else:
            index = Index(args.dim, kind, m=args.m, ef_construction=args.ef_construction, normalize=False)
            entry.update(m=args.m, ef_construction=args.ef_construction)
            settings = [{"ef_search": e} for e in _ints(args.ef_search)]
        add_s, _ = timed(partial(index.add, db))
        entry["add_s"] = round(add_s, 2)
        entry["build_s"] = round(add_s + entry.get("train_s", 0.0), 2)
        entry["rss_growth_bytes"] = int(rss_bytes() - rss)
        if kind == "ivfpq":
            path = os.path.join(tmpdir, "ivfpq.dolgidx")
            save_s, _ = timed(partial(index.save, path))
            del index
            gc.collect()
            rss = rss_bytes()
            load_s, index = timed(partial(Index.load, path, mmap=True))
            entry.update(
                save_s=round(save_s, 2),
                load_mmap_s=round(load_s, 2),
                rss_growth_after_mmap_load_bytes=int(rss_bytes() - rss),
                disk_bytes_per_vector=round(os.path.getsize(path) / n, 1),
            )
        entry["bytes_per_vector"] = round(index.memory_bytes() / n, 1)
        sweeps = []
        for setting in settings:
            for name, value in setting.items():
                setattr(index, name, value)
            index.search(queries, k)  # warm-up
            times, exact_times, ids = [], [], None
            for _ in range(args.repeats):
                s, (_, ids) = timed(partial(index.search, queries, k))
                times.append(s)
                if flat is not None:
                    exact_times.append(timed(lambda: flat.search(queries, k))[0])
            med = statistics.median(times)
            row = {**setting, "search_s": round(med, 4), "queries_per_s": round(q / med, 1)}
            if exact_times:
                row["speedup_vs_flat"] = round(statistics.median(exact_times) / med, 2)
            row[f"recall@{k}"] = round(recall_at(ids, exact), 4)
            sweeps.append(row)
            print(json.dumps({"kind": kind, **row}), flush=True)
        entry["search"] = sweeps
        result[kind] = entry
        del index
        gc.collect()
    for name in os.listdir(tmpdir):
        os.remove(os.path.join(tmpdir, name))
    os.rmdir(tmpdir)

    result["total_s"] = round(time.perf_counter() - t0, 1)
    line = json.dumps(result)
    print(line)
    if args.out:
        with open(args.out, "w") as f:
            f.write(line + "\n")
    print(f"{n} x {args.dim} {args.data}, {q} queries, top-{k}, {result['faiss_threads']} threads, {result['cpu']}:")
    nb = result["numpy_bruteforce"]["search_s"]
    print(f"  numpy brute force: {nb:.2f} s ({q / nb:.0f} q/s)")
    if "flat" in result:
        f = result["flat"]
        print(
            f"  faiss flat: {f['search_s']:.2f} s ({f['queries_per_s']:.0f} q/s, {f['speedup_vs_numpy']}x numpy), "
            f"recall {f[f'recall@{k}']:.4f}, {f['bytes_per_vector']:.0f} B/vector"
        )
    for kind in ("ivf", "hnsw", "ivfpq"):
        if kind in result:
            e = result[kind]
            sweep = "; ".join(
                ", ".join(f"{key} {s[key]}" for key in ("nprobe", "ef_search", "rerank") if key in s)
                + f": {s['queries_per_s']:.0f} q/s"
                + (f" ({s['speedup_vs_flat']}x flat)" if "speedup_vs_flat" in s else "")
                + f", recall {s[f'recall@{k}']:.3f}"
                for s in e["search"]
            )
            disk = f", {e['disk_bytes_per_vector']:.0f} B/vector on disk" if "disk_bytes_per_vector" in e else ""
            print(f"  {kind}: build {e['build_s']:.1f} s, {e['bytes_per_vector']:.0f} B/vector in RAM{disk}; {sweep}")


def _build(index, db):
    index.add(db)
    return index


if __name__ == "__main__":
    main()
