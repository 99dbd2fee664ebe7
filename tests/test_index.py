"""dolg_tf.index: exact and approximate search, ids, files, alpha-QE / DBA, and `dolg index`."""

import json
import os

import numpy as np
import pytest

from dolg_tf.cli import main as dolg_main
from dolg_tf.errors import ConfigError, DataError, IndexFileError, InputShapeError
from dolg_tf.index import (
    Index,
    alpha_query_expansion,
    brute_force_search,
    database_side_augmentation,
    l2_normalize_rows,
)


def unit(x):
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def clustered(n, dim, clusters, seed, noise=0.35):
    """Unit vectors around random cluster centres, like embeddings of many views of few landmarks."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.normal(size=(clusters, dim)))
    x = centres[rng.integers(0, clusters, n)] + noise / np.sqrt(dim) * rng.normal(size=(n, dim))
    return unit(x)


@pytest.fixture(scope="module")
def data():
    db = clustered(6000, 64, 60, seed=0)
    rng = np.random.default_rng(1)
    queries = unit(db[rng.choice(len(db), 150, replace=False)] + 0.02 * rng.normal(size=(150, 64)))
    exact = np.argsort(-(queries @ db.T), axis=1, kind="stable")
    return db, queries, exact


def recall(found, exact, k):
    return float(np.mean([len(set(f[:k]) & set(e[:k])) / k for f, e in zip(found, exact)]))


# --------------------------------------------------------------------------- search
def test_flat_search_equals_numpy_argsort(data):
    db, queries, exact = data
    index = Index(64, "flat")
    index.add(db)
    scores, ids = index.search(queries, 10)
    np.testing.assert_array_equal(ids, exact[:, :10])
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ db.T, exact[:, :10], 1), atol=1e-5)
    assert (np.diff(scores, axis=1) <= 1e-7).all()


def test_brute_force_numpy_baseline_equals_argsort(data):
    db, queries, exact = data
    scores, positions = brute_force_search(queries, db, 25, chunk=1000)  # several chunks to merge
    np.testing.assert_array_equal(positions, exact[:, :25])
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ db.T, exact[:, :25], 1), atol=1e-6)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_recall_at_10(data, kind):
    db, queries, exact = data
    index = Index(64, kind)
    index.add(db)
    _, ids = index.search(queries, 10)
    assert recall(ids, exact, 10) >= 0.95
    if kind == "ivf":  # the documented automatic rule: round(4 sqrt(6000)) = 310, capped at 6000 // 39 = 153
        assert index.nlist == 153


def test_ivf_training_rules(data):
    db, _, _ = data
    index = Index(64, "ivf", nlist=50)
    assert not index.is_trained
    with pytest.raises(DataError, match="at least 50"):
        index.add(db[:20])  # the first add trains, and 20 vectors cannot make 50 lists
    index.train(db[:3000])
    assert index.is_trained and index.ntotal == 0
    index.add(db[3000:])
    index.add(db[:3000])  # later adds reuse the centroids
    assert len(index) == 6000
    with pytest.raises(ConfigError, match="already trained"):
        index.train(db)


def test_k_beyond_ntotal_and_missing_results():
    index = Index(4, "flat")
    index.add(np.eye(4)[:3], ids=["a", "b", "c"])
    scores, ids = index.search([[1.0, 0.5, 0.2, 0.0]], 10)
    assert ids.tolist() == [["a", "b", "c"]] and scores.shape == (1, 3)
    # IVF visiting 1 of 2 lists can find fewer than k: -inf / "" fill the gaps
    x = np.concatenate([np.tile([[1, 0, 0, 0]], (40, 1)), np.tile([[0, 0, 0, 1]], (40, 1))]).astype(np.float32)
    x += 0.01 * np.random.default_rng(0).normal(size=x.shape).astype(np.float32)
    ivf = Index(4, "ivf", nlist=2, nprobe=1)
    ivf.add(x, [f"v{i}" for i in range(80)])
    scores, ids = ivf.search(x[:1], 60)
    assert (ids[0, 40:] == "").all() and np.isneginf(scores[0, 40:]).all()
    assert (ids[0, :40] != "").all()


def test_string_and_integer_ids_and_vectors():
    x = unit(np.random.default_rng(0).normal(size=(5, 8)))
    index = Index(8)
    index.add(x[:3], ids=[10, 20, 30])
    index.add(x[3:], ids=np.array([40, 50]))
    assert index.ids.tolist() == [10, 20, 30, 40, 50]
    _, ids = index.search(x[[4, 1]], 1)
    assert ids.tolist() == [[50], [20]]
    np.testing.assert_allclose(index.vectors(), x, atol=1e-6)
    with pytest.raises(ValueError):
        index.ids[0] = 3  # read-only view


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda i: i.add(np.ones((2, 5))), InputShapeError, "8 columns"),
        (lambda i: i.add(np.ones(8)), InputShapeError, "2-D"),
        (lambda i: i.add(np.full((1, 8), np.nan)), DataError, "NaN"),
        (lambda i: i.add(np.zeros((1, 8))), DataError, "zero norm"),
        (lambda i: i.add(np.ones((2, 8)), ids=[1]), InputShapeError, "one id per vector"),
        (lambda i: i.add(np.ones((2, 8)), ids=[1, 1]), DataError, "duplicate id"),
        (lambda i: i.add(np.ones((1, 8)), ids=[0]), DataError, "already in the index"),
        (lambda i: i.add(np.ones((1, 8)), ids=["a"]), DataError, "one type"),
        (lambda i: i.add(np.ones((1, 8)), ids=[-3]), DataError, ">= 0"),
        (lambda i: i.add(np.ones((1, 8)), ids=[1.5]), DataError, "integers or all strings"),
        (lambda i: i.search(np.ones((1, 7)), 3), InputShapeError, "8 columns"),
        (lambda i: i.search(np.full((1, 8), np.inf), 3), DataError, "infinite"),
        (lambda i: i.search(np.ones((1, 8)), 0), ConfigError, "k must be"),
        (lambda i: i.search(np.ones((1, 8)), 2, qe_alpha=-1), ConfigError, "alpha"),
    ],
)
def test_bad_input_raises_typed_errors(call, error, match):
    index = Index(8)
    index.add(unit(np.random.default_rng(0).normal(size=(3, 8))))
    with pytest.raises(error, match=match):
        call(index)
    assert index.ntotal == 3  # a rejected call changes nothing


def test_mixed_id_types_in_one_call():
    with pytest.raises(DataError, match="all integers or all strings"):
        Index(4).add(np.eye(4)[:2], ids=[1, "a"])
    with pytest.raises(DataError, match="all integers or all strings"):
        Index(4).add(np.eye(4)[:2], ids=[True, False])


def test_bad_options():
    with pytest.raises(ConfigError, match="kind"):
        Index(8, "lsh")
    with pytest.raises(ConfigError, match="dim"):
        Index(0)
    with pytest.raises(ConfigError, match="nprobe"):
        Index(8, "ivf", nprobe=0)
    with pytest.raises(DataError, match="empty"):
        Index(8).search(np.ones((1, 8)), 1)


# --------------------------------------------------------------------------- files
@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_save_load_round_trip(tmp_path, data, kind):
    db, queries, _ = data
    index = Index(64, kind, nprobe=8, ef_search=64)
    index.add(db[:2000], ids=[f"img_{i:05d}.jpg" for i in range(2000)])
    path = tmp_path / "g.dolgidx"
    index.save(path)
    loaded = Index.load(path)
    assert loaded.options() == index.options() and loaded.ntotal == 2000
    assert loaded.ids.tolist() == index.ids.tolist()
    for a, b in zip(index.search(queries, 7), loaded.search(queries, 7)):
        np.testing.assert_array_equal(a, b)
    assert [p.name for p in tmp_path.iterdir()] == ["g.dolgidx"]  # no temporary file left


def test_truncated_or_corrupt_file_raises_index_file_error(tmp_path):
    index = Index(16, "hnsw")
    index.add(unit(np.random.default_rng(0).normal(size=(200, 16))), ids=list(range(100, 300)))
    path = tmp_path / "g.dolgidx"
    index.save(path)
    raw = path.read_bytes()
    for cut in (len(raw) - 1, len(raw) // 2, 40, 10, 0):
        (tmp_path / "t").write_bytes(raw[:cut])
        with pytest.raises(IndexFileError):
            Index.load(tmp_path / "t")
    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 0xFF
    (tmp_path / "c").write_bytes(bytes(flipped))
    with pytest.raises(IndexFileError, match="checksum"):
        Index.load(tmp_path / "c")
    with pytest.raises(IndexFileError, match="cannot read"):
        Index.load(tmp_path / "missing")
    (tmp_path / "x.npy").write_bytes(b"\x93NUMPY" + b"\x00" * 100)
    with pytest.raises(IndexFileError, match="not a dolg_tf index"):
        Index.load(tmp_path / "x.npy")


def test_unknown_version_is_refused(tmp_path):
    import hashlib
    import struct

    index = Index(4)
    index.add(np.eye(4))
    index.save(tmp_path / "g")
    raw = (tmp_path / "g").read_bytes()
    (hlen,) = struct.unpack_from("<Q", raw, 8)
    header = json.loads(raw[16 : 16 + hlen])
    header["version"] = 99
    new_header = json.dumps(header).encode()
    body = raw[:8] + struct.pack("<Q", len(new_header)) + new_header + raw[16 + hlen : -32]
    (tmp_path / "v").write_bytes(body + hashlib.sha256(body).digest())
    with pytest.raises(IndexFileError, match="version 99"):
        Index.load(tmp_path / "v")


def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    index = Index(4)
    index.add(np.eye(4))
    path = tmp_path / "g"
    index.save(path)
    before = path.read_bytes()
    index.add(unit(np.ones((1, 4))))

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        index.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before and Index.load(path).ntotal == 4
    assert [p.name for p in tmp_path.iterdir()] == ["g"]


# --------------------------------------------------------------------------- re-ranking
def _landmark_case():
    """q matches A; B is another view of A's landmark but looks less like q than distractor D does.

    E is another view of D's landmark, unrelated to q.
    """
    q = unit([[1.0, 0.0, 0.0]])
    a = unit([1.0, 0.2, 0.0])
    b = unit([0.5, 1.5, 0.0])
    d = unit([0.4, 0.0, 1.0])
    e = unit([0.0, 0.0, 1.0])
    return q, np.stack([a, b, d, e])


def test_alpha_qe_pulls_in_the_landmarks_other_view():
    q, db = _landmark_case()
    index = Index(3)
    index.add(db, ids=["A", "B", "D", "E"])
    assert index.search(q, 3)[1].tolist() == [["A", "D", "B"]]
    scores, ids = index.search(q, 3, qe_alpha=3.0, qe_neighbours=1)
    assert ids.tolist() == [["A", "B", "D"]]
    # the expanded query is q + sim(q, A)^3 A, normalised
    s = float(q[0] @ db[0])
    expanded = unit(q[0] + s**3 * db[0])
    np.testing.assert_allclose(scores[0], np.sort(db @ expanded)[::-1][:3], atol=1e-6)


def test_alpha_qe_function_matches_formula():
    rng = np.random.default_rng(0)
    q, nb = unit(rng.normal(size=(3, 5))), unit(rng.normal(size=(3, 4, 5)))
    s = np.einsum("qd,qnd->qn", q, nb)
    want = unit(q + np.einsum("qn,qnd->qd", np.maximum(s, 0) ** 2, nb))
    np.testing.assert_allclose(alpha_query_expansion(q, nb, s, alpha=2), want, atol=1e-6)
    # alpha = 0: plain average QE (negative similarities included with weight 1)
    np.testing.assert_allclose(alpha_query_expansion(q, nb, s, alpha=0), unit(q + nb.sum(1)), atol=1e-6)
    with pytest.raises(InputShapeError):
        alpha_query_expansion(q, nb[:, :, :4], s)


def test_dba_moves_views_of_one_landmark_together():
    q, db = _landmark_case()
    index = Index(3)
    index.add(db, ids=["A", "B", "D", "E"])
    assert index.search(q, 3)[1].tolist() == [["A", "D", "B"]]
    augmented = index.augmented(neighbours=1, alpha=3.0)
    assert augmented.ids.tolist() == ["A", "B", "D", "E"] and augmented.kind == "flat"
    before, after = index.vectors(), augmented.vectors()
    # each view moves towards its landmark's other view; the query now ranks B before D
    assert after[0] @ after[1] > before[0] @ before[1]
    assert after[2] @ after[3] > before[2] @ before[3]
    assert augmented.search(q, 3)[1].tolist() == [["A", "B", "D"]]


def test_dba_function_ignores_self_and_missing_neighbours():
    x = unit(np.random.default_rng(0).normal(size=(4, 6)))
    positions = np.array([[0, 1], [1, -1], [2, 3], [3, 0]])
    scores = np.array([[1.0, 0.5], [1.0, 0.9], [1.0, -0.2], [1.0, 0.4]], np.float32)
    out = database_side_augmentation(x, positions, scores, alpha=1.0)
    np.testing.assert_allclose(out[1], x[1], atol=1e-6)  # only itself and "no result"
    np.testing.assert_allclose(out[2], x[2], atol=1e-6)  # a negative similarity weighs 0
    np.testing.assert_allclose(out[0], unit(x[0] + 0.5 * x[1]), atol=1e-6)
    with pytest.raises(InputShapeError, match="out of range"):
        database_side_augmentation(x, positions + 4, scores)


def test_l2_normalize_rows():
    np.testing.assert_allclose(l2_normalize_rows(np.array([[3.0, 4.0]])), [[0.6, 0.8]])
    with pytest.raises(DataError, match="row 1"):
        l2_normalize_rows(np.array([[1.0, 0.0], [0.0, 0.0]]))


# --------------------------------------------------------------------------- CLI
def test_cli_build_and_search(tmp_path, data, capsys):
    db, queries, exact = data
    np.save(tmp_path / "db.npy", db[:1000])
    np.save(tmp_path / "q.npy", queries[:5])
    (tmp_path / "ids.txt").write_text("\n".join(f"img{i}.jpg" for i in range(1000)) + "\n")
    (tmp_path / "qids.json").write_text(json.dumps([f"query{i}" for i in range(5)]))
    out_index = tmp_path / "g.dolgidx"
    assert (
        dolg_main(
            [
                "index",
                "build",
                "--embeddings",
                str(tmp_path / "db.npy"),
                "--ids",
                str(tmp_path / "ids.txt"),
                "--kind",
                "hnsw",
                "--out",
                str(out_index),
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out.splitlines()[0])["ntotal"] == 1000
    results = tmp_path / "r.json"
    assert (
        dolg_main(
            [
                "index",
                "search",
                "--index",
                str(out_index),
                "--queries",
                str(tmp_path / "q.npy"),
                "--query-ids",
                str(tmp_path / "qids.json"),
                "-k",
                "5",
                "--out",
                str(results),
            ]
        )
        == 0
    )
    got = json.loads(results.read_text())
    want = np.argsort(-(queries[:5] @ db[:1000].T), axis=1)[:, :5]
    assert [r["query"] for r in got["results"]] == [f"query{i}" for i in range(5)]
    assert [r["ids"] for r in got["results"]] == [[f"img{i}.jpg" for i in row] for row in want]
    # with query expansion and a flat index with DBA
    assert (
        dolg_main(
            [
                "index",
                "build",
                "--embeddings",
                str(tmp_path / "db.npy"),
                "--kind",
                "flat",
                "--dba",
                "2",
                "--out",
                str(out_index),
            ]
        )
        == 0
    )
    assert (
        dolg_main(
            [
                "index",
                "search",
                "--index",
                str(out_index),
                "--queries",
                str(tmp_path / "q.npy"),
                "-k",
                "3",
                "--qe",
                "3",
                "--out",
                str(results),
            ]
        )
        == 0
    )
    got = json.loads(results.read_text())
    assert got["query_expansion"] == {"alpha": 3.0, "neighbours": 2} and len(got["results"][0]["ids"]) == 3
    capsys.readouterr()


def test_cli_errors_are_one_line(tmp_path, capsys):
    np.save(tmp_path / "db.npy", np.ones((3, 4), np.float32))
    (tmp_path / "ids.json").write_text(json.dumps(["a", "a", "b"]))
    assert (
        dolg_main(
            [
                "index",
                "build",
                "--embeddings",
                str(tmp_path / "db.npy"),
                "--ids",
                str(tmp_path / "ids.json"),
                "--out",
                str(tmp_path / "g"),
            ]
        )
        == 2
    )
    assert "duplicate id 'a'" in capsys.readouterr().err
    (tmp_path / "bad").write_bytes(b"junk")
    assert (
        dolg_main(
            [
                "index",
                "search",
                "--index",
                str(tmp_path / "bad"),
                "--queries",
                str(tmp_path / "db.npy"),
                "--out",
                str(tmp_path / "r.json"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "not a dolg_tf index file" in err and len(err.strip().splitlines()) == 1


def test_ivf_query_expansion_then_more_adds_then_reload(tmp_path):
    x = clustered(3000, 16, 30, seed=5)
    index = Index(16, "ivf", nlist=20)
    index.add(x[:2000])
    index.search(x[:5], 3, qe_alpha=3.0)  # reads stored vectors (builds IVF's direct map)
    index.add(x[2000:])
    assert index.search(x[2990:2995], 1)[1].ravel().tolist() == list(range(2990, 2995))
    index.save(tmp_path / "g")
    loaded = Index.load(tmp_path / "g")
    np.testing.assert_allclose(loaded.vectors()[2500], x[2500], atol=1e-6)
    assert loaded.augmented(3).nlist == 20


# ------------------------------------------------------------------------- compressed kind (IVF-PQ + exact re-ranking)
@pytest.fixture(scope="module", autouse=True)
def one_faiss_thread():
    """faiss' OpenMP k-means on tiny data crawls when its threads outnumber free cores; one thread does not."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture(scope="module")
def ivfpq(data):
    db, _, _ = data
    # 8-byte codes (1/32 of the float32 vector); these tight clusters need 100 candidates for the top 10
    index = Index(64, "ivfpq", nlist=32, nprobe=32, pq_m=16, rerank=10)
    index.add(db, ids=[f"img{i}" for i in range(len(db))])
    return index


def test_ivfpq_reranking_restores_exact_scores_and_recall(ivfpq, data):
    db, queries, exact = data
    scores, ids = ivfpq.search(queries, 10)
    positions = np.array([[int(s[3:]) for s in row] for row in ids])
    assert recall(positions, exact, 10) >= 0.97
    # the returned scores are the exact inner products with the returned vectors (numpy, not the index)
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", queries, db[positions]), atol=1e-5)
    ivfpq.rerank = 1  # the PQ codes alone: approximate scores, fewer true neighbours
    try:
        approx_scores, approx_ids = ivfpq.search(queries, 10)
    finally:
        ivfpq.rerank = 10
    approx_positions = np.array([[int(s[3:]) for s in row] for row in approx_ids])
    assert recall(approx_positions, exact, 10) < recall(positions, exact, 10)
    assert np.abs(approx_scores - np.einsum("qd,qkd->qk", queries, db[approx_positions])).max() > 1e-3
    # the full vectors are kept exactly (QE and DBA read them)
    np.testing.assert_allclose(ivfpq.vectors(), db, atol=1e-6)


@pytest.mark.parametrize("mmap", [False, True])
def test_ivfpq_save_load_and_memory_map(tmp_path, ivfpq, data, mmap):
    _, queries, _ = data
    path = tmp_path / "g.dolgidx"
    ivfpq.save(path)
    loaded = Index.load(path, mmap=mmap)
    assert loaded.options() == ivfpq.options() and loaded.is_memory_mapped is mmap
    for a, b in zip(ivfpq.search(queries, 10), loaded.search(queries, 10)):
        np.testing.assert_array_equal(a, b)
    if mmap:  # the vectors are a read-only view of the file's bytes, not a copy in RAM
        vectors = loaded.vectors()
        assert isinstance(vectors, np.memmap) and os.path.samefile(vectors.filename, path)
        assert not vectors.flags.writeable
        # in RAM: 8-byte codes, lists, centroids and the ids, well under the 256-byte vectors
        assert loaded.memory_bytes() < vectors.nbytes / 4
        assert Index.load(path).memory_bytes() > vectors.nbytes


def test_ivfpq_from_a_faiss_factory_string(data):
    db, queries, exact = data
    index = Index(64, "ivfpq", factory="IVF16,PQ32x4fs", nprobe=16, rerank=10)
    assert index.nlist == 16 and not index.is_trained
    index.add(db[:3000])
    _, ids = index.search(queries, 10)
    want = np.argsort(-(queries @ db[:3000].T), axis=1, kind="stable")
    assert recall(ids, want, 10) >= 0.95
    twin = Index(**index.options())
    assert twin.nlist == 16 and twin.options()["factory"] == "IVF16,PQ32x4fs" and not twin.is_trained
    with pytest.raises(ConfigError, match="not an IVF index"):
        Index(64, "ivfpq", factory="HNSW32")
    with pytest.raises(ConfigError, match="faiss cannot build"):
        Index(64, "ivfpq", factory="IVF16,PQ7")  # 7 does not divide 64
    with pytest.raises(ConfigError, match="pq_m=24 must divide"):
        Index(64, "ivfpq", pq_m=24)
    assert Index(512, "ivfpq").options()["pq_m"] == 128
    with pytest.raises(DataError, match="could not train"):
        Index(64, "ivfpq", nlist=1).add(
            db[:8]
        )  # default pq_m: 64 // 4 = 16  # 8 vectors cannot make 16-centroid codebooks


def _rewrite(raw: bytes, header_change=None, body_change=None) -> bytes:
    """A copy of an index file with its header and/or body changed, and a valid SHA-256 again."""
    import hashlib
    import struct

    (hlen,) = struct.unpack_from("<Q", raw, 8)
    header = json.loads(raw[16 : 16 + hlen])
    body = raw[16 + hlen : -32]
    if header_change:
        header = header_change(header)
    if body_change:
        body = body_change(body)
    new_header = json.dumps(header).encode()
    out = raw[:8] + struct.pack("<Q", len(new_header)) + new_header + body
    return out + hashlib.sha256(out).digest()


def test_sixteen_kinds_of_corrupt_file_raise_index_file_error(tmp_path, ivfpq):
    import struct

    path = tmp_path / "g.dolgidx"
    ivfpq.save(path)
    raw = path.read_bytes()
    (hlen,) = struct.unpack_from("<Q", raw, 8)
    header = json.loads(raw[16 : 16 + hlen])
    vectors_at = 16 + hlen + header["faiss_bytes"]

    def flip(at):
        b = bytearray(raw)
        b[at] ^= 0x01
        return bytes(b)

    def put(key, value):
        return lambda h: {**h, key: value}

    cases = {
        "empty": b"",
        "magic only": raw[:8],
        "cut in the header": raw[: 16 + hlen // 2],
        "cut in the faiss section": raw[: vectors_at - 100],
        "cut in the vectors": raw[: vectors_at + 1000],
        "cut before the digest": raw[:-1],
        "trailing byte": raw + b"\x00",
        "bit flip in the vectors": flip(vectors_at + 12345),
        "bit flip in the ids": flip(len(raw) - 40),
        "digest flipped": flip(len(raw) - 1),
        "huge header length": raw[:8] + struct.pack("<Q", 1 << 62) + raw[16:],
        "header not JSON": _rewrite(raw, header_change=lambda h: h, body_change=None)[:16]
        + b"{" * hlen
        + raw[16 + hlen :],
        "header a list": _rewrite(raw, header_change=lambda h: [h]),
        "negative section size": _rewrite(raw, header_change=put("id_bytes", -5)),
        "vector section of the wrong size": _rewrite(
            raw, header_change=lambda h: {**h, "vector_bytes": h["vector_bytes"] - 256, "id_bytes": h["id_bytes"] + 256}
        ),
        "garbage faiss section": _rewrite(raw, body_change=lambda b: b"\x07" * 64 + b[64:]),
        "ids of another length": _rewrite(raw, header_change=put("ntotal", header["ntotal"] - 1)),
        "unknown kind": _rewrite(raw, header_change=lambda h: {**h, "options": {**h["options"], "kind": "lsh"}}),
        "unknown version": _rewrite(raw, header_change=put("version", 99)),
    }
    assert len(cases) >= 16
    for name, content in cases.items():
        bad = tmp_path / "bad"
        bad.write_bytes(content)
        with pytest.raises(IndexFileError):
            Index.load(bad)
        if name.startswith(("cut", "trailing", "huge", "empty", "magic")):
            with pytest.raises(IndexFileError):  # structural checks hold without the checksum pass
                Index.load(bad, mmap=True, verify=False)


def test_format_version_1_files_still_load(tmp_path):
    """A file in the previous layout (no vector section), written here by hand from faiss and numpy."""
    import hashlib
    import io
    import struct

    import faiss

    x = unit(np.random.default_rng(3).normal(size=(20, 8)))
    flat = faiss.IndexFlatIP(8)
    flat.add(x)
    faiss_bytes = faiss.serialize_index(flat).tobytes()
    buf = io.BytesIO()
    np.save(buf, np.arange(100, 120, dtype=np.int64), allow_pickle=False)
    options = {
        "dim": 8,
        "kind": "flat",
        "nlist": None,
        "nprobe": 16,
        "m": 32,
        "ef_construction": 100,
        "ef_search": 128,
        "normalize": True,
    }
    header = json.dumps(
        {
            "format": "dolg_tf.index",
            "version": 1,
            "options": options,
            "ntotal": 20,
            "id_type": "int64",
            "faiss_bytes": len(faiss_bytes),
            "id_bytes": len(buf.getvalue()),
        }
    ).encode()
    body = b"DOLGIDX\x00" + struct.pack("<Q", len(header)) + header + faiss_bytes + buf.getvalue()
    (tmp_path / "v1").write_bytes(body + hashlib.sha256(body).digest())
    index = Index.load(tmp_path / "v1")
    assert index.ntotal == 20 and index.kind == "flat"
    assert index.search(x[[7]], 1)[1].tolist() == [[107]]


def test_cli_ivfpq_build_and_memory_mapped_search(tmp_path, data, capsys):
    db, queries, exact = data
    np.save(tmp_path / "db.npy", db[:2000])
    np.save(tmp_path / "q.npy", queries[:5])
    out_index = tmp_path / "g.dolgidx"
    assert (
        dolg_main(
            [
                "index",
                "build",
                "--embeddings",
                str(tmp_path / "db.npy"),
                "--kind",
                "ivfpq",
                "--pq-m",
                "16",
                "--nlist",
                "16",
                "--out",
                str(out_index),
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out.splitlines()[0])["kind"] == "ivfpq"
    results = tmp_path / "r.json"
    assert (
        dolg_main(
            [
                "index",
                "search",
                "--index",
                str(out_index),
                "--mmap",
                "--nprobe",
                "16",
                "--rerank",
                "8",
                "--queries",
                str(tmp_path / "q.npy"),
                "-k",
                "5",
                "--out",
                str(results),
            ]
        )
        == 0
    )
    got = [r["ids"] for r in json.loads(results.read_text())["results"]]
    want = np.argsort(-(queries[:5] @ db[:2000].T), axis=1, kind="stable")[:, :5]
    assert recall(np.array(got), want, 5) >= 0.95
    capsys.readouterr()


def test_cli_says_which_file_goes_where(tmp_path, capsys):
    np.save(tmp_path / "gallery.npy", np.ones((3, 4), np.float32))
    (tmp_path / "gallery.ids.json").write_text(json.dumps({"ids": ["a", "b", "c"]}))
    assert (
        dolg_main(["index", "build", "--embeddings", str(tmp_path / "gallery.ids.json"), "--out", str(tmp_path / "g")])
        == 2
    )
    err = capsys.readouterr().err
    assert "--embeddings" in err and "gallery.ids.json" in err and "goes to --ids" in err
    assert "pickle" not in err and len(err.strip().splitlines()) == 1
    assert (
        dolg_main(
            [
                "index",
                "build",
                "--embeddings",
                str(tmp_path / "gallery.npy"),
                "--ids",
                str(tmp_path / "gallery.npy"),
                "--out",
                str(tmp_path / "g"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "--ids" in err and "goes to --embeddings" in err and len(err.strip().splitlines()) == 1
    assert (
        dolg_main(
            [
                "index",
                "search",
                "--index",
                str(tmp_path / "g"),
                "--queries",
                str(tmp_path / "gallery.ids.json"),
                "--out",
                str(tmp_path / "r.json"),
            ]
        )
        == 2
    )
    assert "--queries" in capsys.readouterr().err


def test_search_shards_equals_one_index_over_the_whole_gallery(data):
    from dolg_tf.index import search_shards

    db, queries, exact = data
    shards = []
    for rows in np.array_split(np.arange(len(db)), 3):
        shard = Index(64)
        shard.add(db[rows], ids=rows)
        shards.append(shard)
    scores, ids = search_shards(shards, queries, 10)
    np.testing.assert_array_equal(ids, exact[:, :10])
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ db.T, exact[:, :10], 1), atol=1e-5)
    named = Index(64)
    named.add(db[:5], ids=list("abcde"))
    with pytest.raises(DataError, match="mix integer and string ids"):
        search_shards([shards[0], named], queries, 3)


def test_ivfpq_keeps_its_own_copy_of_the_callers_vectors(data):
    db, _, _ = data
    x = db[:1000].copy()
    index = Index(64, "ivfpq", nlist=4, normalize=False)
    index.add(x)
    x[:] = 0.0  # the caller reuses its buffer
    np.testing.assert_allclose(index.vectors(), db[:1000], atol=0)
