"""dolg_tf.index.MilvusIndex on Milvus Lite (a local .db file): the faiss index's search contract, and
`dolg index --backend milvus`.

Milvus Lite runs its server in this process (a gRPC server on 127.0.0.1); every
collection opened here is closed, which stops that server and unlocks the file.
"""

import json
import subprocess
import sys

import numpy as np
import pytest

from dolg_tf.cli import main as dolg_main
from dolg_tf.errors import ConfigError, DataError, IndexFileError, InputShapeError
from dolg_tf.index import Index, MilvusIndex

pytestmark = pytest.mark.integration

DIM = 32


def unit(x):
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    db = unit(rng.normal(size=(2000, DIM)))  # no structure: a partial IVF probe visibly misses neighbours
    queries = unit(db[rng.choice(2000, 40, replace=False)] + 0.05 * rng.normal(size=(40, DIM)))
    sims = queries @ db.T
    exact = np.argsort(-sims, axis=1, kind="stable")[:, :10]
    return db, queries, exact, np.take_along_axis(sims, exact, 1)


@pytest.fixture(scope="module")
def uri(tmp_path_factory):
    return str(tmp_path_factory.mktemp("milvus") / "gallery.db")


@pytest.fixture(scope="module")
def flat(uri, data):
    db, _, _, _ = data
    index = MilvusIndex.create(uri, "flat", DIM, "FLAT")
    index.add(db, ids=np.arange(2000) * 10 + 7)  # ids that are not row numbers
    yield index
    index.close()


def test_flat_top10_equals_numpy(flat, data):
    db, queries, exact, exact_scores = data
    assert flat.count() == 2000 and flat.kind == "FLAT" and flat.dim == DIM
    scores, ids = flat.search(queries, 10)
    np.testing.assert_array_equal(ids, exact * 10 + 7)
    np.testing.assert_allclose(scores, exact_scores, atol=1e-5)
    # unnormalised queries are normalised, as in the faiss index
    np.testing.assert_array_equal(flat.search(queries * 3.0, 10)[1], ids)


def test_ivf_with_every_list_probed_equals_flat_and_its_params_took_effect(uri, data):
    db, queries, exact, _ = data
    with MilvusIndex.create(uri, "ivf", DIM, "ivf", nlist=16) as ivf:
        ivf.add(db, ids=np.arange(2000) * 10 + 7)
        described = ivf.describe()
        assert described["index_type"] == "IVF_FLAT" and described["metric_type"] == "IP"
        assert described["params"] == {"nlist": 16}  # not Milvus' default: the nested form reached it
        ivf.nprobe = 16
        np.testing.assert_array_equal(ivf.search(queries, 10)[1], exact * 10 + 7)
        # one list of 16: the inverted lists are really searched, so neighbours are missed
        ivf.nprobe = 1
        _, ids = ivf.search(queries, 10)
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact * 10 + 7)])
        assert recall < 0.8


def test_hnsw_params_and_string_ids_round_trip_and_delete(uri, data):
    db, queries, exact, _ = data
    names = np.array([f"photos/été {i} \"q\" 'x'.jpg" for i in range(300)])
    sims = queries @ db[:300].T
    want = np.argsort(-sims, axis=1, kind="stable")[:, :6]
    with MilvusIndex.create(uri, "names", DIM, "HNSW", id_type="str", m=8, ef_construction=40) as index:
        assert index.describe()["params"] == {"M": 8, "efConstruction": 40}
        index.add(db[:300], ids=names.tolist())
        _, ids = index.search(queries, 5)
        assert ids.dtype.kind == "U" and ids.tolist() == names[want[:, :5]].tolist()
        gone = names[want[0, 0]]
        assert index.delete([gone, "not there"]) == 1
        assert index.count() == 299
        _, ids = index.search(queries[:1], 5)
        assert gone not in ids[0] and ids[0].tolist() == names[want[0, 1:6]].tolist()
        with pytest.raises(DataError, match="already in"):
            index.add(db[300:301], ids=[names[1]])
        with pytest.raises(DataError, match="string ids"):
            index.add(db[300:301], ids=[5])


def test_reopened_in_another_process_has_the_same_count(uri, flat):
    flat.close()  # Milvus Lite locks the file until its server stops
    # the child counts with pymilvus itself, not with the class under test
    code = (
        "from pymilvus import MilvusClient\n"
        f"c = MilvusClient({uri!r})\n"
        "print(c.query('flat', filter='', output_fields=['count(*)'])[0]['count(*)'], "
        "c.describe_index('flat', 'embedding')['index_type'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["2000", "FLAT"]
    with MilvusIndex.open(uri, "flat") as again:  # and back in this process
        assert again.count() == 2000 and again.id_type == "int"


def test_clear_typed_errors(uri, data):
    db, queries, _, _ = data
    with pytest.raises(IndexFileError, match="'missing' does not exist.*collections there: .*'flat'"):
        MilvusIndex.open(uri, "missing")
    with pytest.raises(ConfigError, match="already exists"):
        MilvusIndex.create(uri, "flat", DIM)
    with pytest.raises(ConfigError, match="IVF_PQ"):
        MilvusIndex.create(uri, "pq", DIM, "IVF_PQ", pq_m=8)
    with pytest.raises(ConfigError, match="kind must be one of"):
        MilvusIndex.create(uri, "x", DIM, "SCANN")
    with pytest.raises(ConfigError, match="neither a Milvus server"):
        MilvusIndex.open("gallery.sqlite", "flat")
    with pytest.raises(ConfigError, match="is the server running"):
        MilvusIndex.open("http://127.0.0.1:9", "flat", timeout=2)
    with MilvusIndex.open(uri, "flat") as index:
        with pytest.raises(InputShapeError, match=f"{DIM} columns"):
            index.add(db[:2, :16], ids=[1, 2])
        with pytest.raises(InputShapeError, match=f"{DIM} columns"):
            index.search(queries[:, :16], 3)
        with pytest.raises(DataError, match="id 17 is already in"):
            index.add(db[:1], ids=[17])
        with pytest.raises(DataError, match="NaN"):
            index.add(np.full((1, DIM), np.nan), ids=[1])
        assert index.count() == 2000  # nothing was added by the refused calls


def test_cli_build_and_search_write_the_faiss_results_format(tmp_path, data, capsys):
    db, queries, _, _ = data
    np.save(tmp_path / "db.npy", db[:400])
    np.save(tmp_path / "q.npy", queries[:4])
    (tmp_path / "ids.json").write_text(json.dumps({"ids": [f"img{i}.jpg" for i in range(400)]}))
    uri = str(tmp_path / "cli.db")
    common = ["--embeddings", str(tmp_path / "db.npy"), "--ids", str(tmp_path / "ids.json")]
    assert (
        dolg_main(
            [
                "index",
                "build",
                "--backend",
                "milvus",
                "--uri",
                uri,
                "--collection",
                "g",
                "--kind",
                "ivf",
                "--nlist",
                "8",
                *common,
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out.splitlines()[0])
    assert summary["ntotal"] == 400 and summary["kind"] == "IVF_FLAT" and summary["params"] == {"nlist": 8}
    assert (
        dolg_main(
            [
                "index",
                "search",
                "--backend",
                "milvus",
                "--uri",
                uri,
                "--collection",
                "g",
                "--nprobe",
                "8",
                "--queries",
                str(tmp_path / "q.npy"),
                "-k",
                "5",
                "--out",
                str(tmp_path / "m.json"),
            ]
        )
        == 0
    )
    assert dolg_main(["index", "build", *common, "--out", str(tmp_path / "g.dolgidx")]) == 0
    assert (
        dolg_main(
            [
                "index",
                "search",
                "--index",
                str(tmp_path / "g.dolgidx"),
                "--queries",
                str(tmp_path / "q.npy"),
                "-k",
                "5",
                "--out",
                str(tmp_path / "f.json"),
            ]
        )
        == 0
    )
    milvus, faiss_ = (json.loads((tmp_path / name).read_text()) for name in ("m.json", "f.json"))
    assert milvus.keys() == faiss_.keys() and milvus["k"] == faiss_["k"] == 5
    assert [r["ids"] for r in milvus["results"]] == [r["ids"] for r in faiss_["results"]]
    np.testing.assert_allclose(
        [r["scores"] for r in milvus["results"]], [r["scores"] for r in faiss_["results"]], atol=1e-5
    )
    # --replace rebuilds; a second plain build refuses, in one line
    assert (
        dolg_main(["index", "build", "--backend", "milvus", "--uri", uri, "--collection", "g", "--replace", *common])
        == 0
    )
    capsys.readouterr()
    assert dolg_main(["index", "build", "--backend", "milvus", "--uri", uri, "--collection", "g", *common]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and len(err.strip().splitlines()) == 1
    assert (
        dolg_main(
            [
                "index",
                "search",
                "--backend",
                "milvus",
                "--uri",
                uri,
                "--queries",
                str(tmp_path / "q.npy"),
                "--out",
                str(tmp_path / "m.json"),
            ]
        )
        == 2
    )
    assert "--backend milvus needs --collection" in capsys.readouterr().err


def test_faiss_and_milvus_answer_alike_and_close_independently(uri, data):
    from dolg_tf.index import SearchIndex

    db, queries, _, _ = data
    faiss_index = Index(DIM)
    faiss_index.add(db, ids=np.arange(2000) * 10 + 7)
    first = MilvusIndex.open(uri, "flat")
    with MilvusIndex.open(uri, "flat") as second:
        for index in (faiss_index, second):
            assert isinstance(index, SearchIndex)
        want_scores, want_ids = faiss_index.search(queries, 20)
        got_scores, got_ids = second.search(queries, 20)
        np.testing.assert_array_equal(got_ids, want_ids)
        np.testing.assert_allclose(got_scores, want_scores, atol=1e-5)
    # closing one client of the file leaves the other working; the last close stops Milvus Lite's server
    assert first.count() == 2000
    first.close()
    with pytest.raises(ConfigError, match="closed"):
        first.count()
