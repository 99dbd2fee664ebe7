"""Nearest-neighbour search at scale: faiss flat vs numpy brute force, IVF and HNSW speed, recall@k, memory.

Synthetic unit-norm vectors (default 1,000,000 x 512, like DOLG descriptors):
``--data clustered`` (default) draws each vector around one of N/100 random
centres, so each query has a neighbourhood to find, as landmark photos do;
``--data uniform`` draws them uniformly on the sphere (the hardest case for
approximate search, with no structure at all). Queries are fresh draws of the
same process. The exact top-k comes from the numpy brute force (chunked
matmul + argpartition), which is also timed against ``Index(kind="flat")``,
interleaved, after a warm-up, median of ``--repeats``. IVF and HNSW (through
:class:`dolg_tf.index.Index`) are built once and searched at several
nprobe / efSearch values. Memory: the process RSS growth while building each
index, and its serialised size. Prints one JSON line and human lines.

    python benchmarks/index.py                       # 1M x 512 (minutes on 2 cores)
    python benchmarks/index.py --n 100000 --out bench_index.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="database vectors (default: 1,000,000)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--data", choices=("clustered", "uniform"), default="clustered")
    parser.add_argument("--kinds", default="flat,ivf,hnsw")
    parser.add_argument("--nlist", type=int, default=None, help="IVF lists (default: the Index rule, 4*sqrt(n))")
    parser.add_argument("--train-size", type=int, default=None, help="IVF training sample (default: min(n, 64*nlist))")
    parser.add_argument("--nprobe", default="8,32,128")
    parser.add_argument("--m", type=int, default=32, help="HNSW M")
    parser.add_argument("--ef-construction", type=int, default=80)
    parser.add_argument("--ef-search", default="64,128,256")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()

    import faiss
    import numpy as np

    from dolg_tf.index import Index, brute_force_search

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
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "faiss": faiss.__version__,
        "faiss_threads": faiss.omp_get_max_threads(),
        "numpy": np.__version__,
        "data_s": round(time.perf_counter() - t0, 1),
        "database_bytes": int(db.nbytes),
    }

    def timed(fn):
        t = time.perf_counter()
        out = fn()
        return time.perf_counter() - t, out

    # --- exact: numpy brute force vs faiss flat, interleaved after a warm-up
    first_numpy_s, (_, exact) = timed(lambda: brute_force_search(queries, db, args.k))
    flat = None
    if "flat" in kinds:
        rss = _rss_bytes()
        build_s, flat = timed(lambda: _build(Index(args.dim, "flat", normalize=False), db))
        flat_rss = _rss_bytes() - rss
        flat.search(queries, args.k)  # warm-up
    # Without flat there is nothing to interleave with: the ground-truth pass is the numpy figure.
    numpy_times, flat_times = ([], []) if flat is not None else ([first_numpy_s], [])
    for _ in range(args.repeats if flat is not None else 0):
        numpy_times.append(timed(lambda: brute_force_search(queries, db, args.k))[0])
        s, (_, ids) = timed(lambda: flat.search(queries, args.k))
        flat_times.append(s)
    result["numpy_bruteforce"] = {"search_s": round(statistics.median(numpy_times), 3), "runs": len(numpy_times)}
    if flat is not None:
        result["flat"] = {
            "build_s": round(build_s, 2),
            "search_s": round(statistics.median(flat_times), 3),
            "speedup_vs_numpy": round(statistics.median(numpy_times) / statistics.median(flat_times), 2),
            f"recall@{args.k}": recall_at(ids, exact),
            "rss_growth_bytes": int(flat_rss),
            "index_bytes": int(faiss.serialize_index(flat._faiss).nbytes),
        }
        del flat
        gc.collect()

    # --- approximate kinds
    for kind in [k for k in kinds if k in ("ivf", "hnsw")]:
        rss = _rss_bytes()
        entry: dict = {}
        if kind == "ivf":
            nlist = args.nlist or int(min(max(1, round(4 * np.sqrt(args.n))), max(1, args.n // 39)))
            index = Index(args.dim, kind, nlist=nlist, normalize=False)
            train_n = min(args.n, args.train_size or 64 * nlist)
            sample = db[np.random.default_rng(1).choice(args.n, train_n, replace=False)]
            train_s, _ = timed(lambda: index.train(sample))
            del sample
            entry.update(nlist=nlist, train_vectors=train_n, train_s=round(train_s, 2))
            knobs, setter = [int(v) for v in args.nprobe.split(",")], "nprobe"
        else:
            index = Index(args.dim, kind, m=args.m, ef_construction=args.ef_construction, normalize=False)
            entry.update(m=args.m, ef_construction=args.ef_construction)
            knobs, setter = [int(v) for v in args.ef_search.split(",")], "ef_search"
        add_s, _ = timed(lambda: index.add(db))
        entry["add_s"] = round(add_s, 2)
        entry["build_s"] = round(add_s + entry.get("train_s", 0.0), 2)
        entry["rss_growth_bytes"] = int(_rss_bytes() - rss)
        entry["index_bytes"] = int(faiss.serialize_index(index._faiss).nbytes)
        sweeps = []
        for value in knobs:
            setattr(index, setter, value)
            index.search(queries, args.k)  # warm-up
            times, ids = [], None
            for _ in range(args.repeats):
                s, (_, ids) = timed(lambda: index.search(queries, args.k))
                times.append(s)
            med = statistics.median(times)
            sweeps.append(
                {
                    setter: value,
                    "search_s": round(med, 4),
                    "queries_per_s": round(args.queries / med, 1),
                    f"recall@{args.k}": round(recall_at(ids, exact), 4),
                }
            )
        entry["search"] = sweeps
        result[kind] = entry
        del index
        gc.collect()

    result["total_s"] = round(time.perf_counter() - t0, 1)
    line = json.dumps(result)
    print(line)
    if args.out:
        with open(args.out, "w") as f:
            f.write(line + "\n")
    q, k = args.queries, args.k
    print(f"{args.n} x {args.dim} {args.data}, {q} queries, top-{k}, {result['faiss_threads']} threads:")
    nb = result["numpy_bruteforce"]["search_s"]
    print(f"  numpy brute force: {nb:.2f} s ({q / nb:.0f} q/s)")
    if "flat" in result:
        f = result["flat"]
        print(f"  faiss flat: {f['search_s']:.2f} s ({q / f['search_s']:.0f} q/s, {f['speedup_vs_numpy']}x numpy), "
              f"recall {f[f'recall@{k}']:.4f}, {f['index_bytes'] / 2**20:.0f} MiB")
    for kind in ("ivf", "hnsw"):
        if kind in result:
            e = result[kind]
            sweep = "; ".join(
                f"{'nprobe' if kind == 'ivf' else 'efSearch'} {s.get('nprobe', s.get('ef_search'))}: "
                f"{s['queries_per_s']:.0f} q/s, recall {s[f'recall@{k}']:.3f}"
                for s in e["search"]
            )
            print(f"  {kind}: build {e['build_s']:.1f} s, {e['index_bytes'] / 2**20:.0f} MiB; {sweep}")


def _build(index, db):
    index.add(db)
    return index


if __name__ == "__main__":
    main()
