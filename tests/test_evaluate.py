"""Retrieval metrics: revisitop compute_map, the E/M/H setups, the dataset reader, GLDv2 mAP@100, `dolg evaluate`."""

import json
import os
import pickle
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from dolg_tf.cli import main as dolg_main
from dolg_tf.errors import ConfigError, DataError, InputShapeError
from dolg_tf.evaluate import (
    compute_map,
    evaluate_revisited,
    gldv2_map_at_k,
    load_image,
    load_revisited,
    ranks_from_embeddings,
    read_gldv2_retrieval_solution,
    read_ground_truth,
    revisited_gnd,
    revisited_map,
)


def _column(*ids):
    """A ranking of one query in revisitop layout (db, 1)."""
    return np.array(ids, dtype=np.int64)[:, None]


def straightforward_map(ranks, gnd, kappas):
    """A second implementation, written from the protocol text: walk each ranked list with junk deleted."""
    aps, prs = [], []
    for i, g in enumerate(gnd):
        ok = set(np.asarray(g["ok"]).tolist())
        junk = set(np.asarray(g.get("junk", [])).tolist())
        if not ok:
            aps.append(float("nan"))
            prs.append([float("nan")] * len(kappas))
            continue
        kept = [d for d in ranks[:, i].tolist() if d not in junk]
        ap, found, hit_ranks = 0.0, 0, []
        for r, d in enumerate(kept):
            if d in ok:
                prec_before = 1.0 if r == 0 else found / r
                prec_after = (found + 1) / (r + 1)
                ap += (prec_before + prec_after) * (1.0 / len(g["ok"])) / 2.0
                found += 1
                hit_ranks.append(r + 1)
        aps.append(ap)
        row = []
        for k in kappas:
            if not hit_ranks:
                row.append(0.0)
                continue
            kq = min(hit_ranks[-1], k)
            row.append(sum(1 for h in hit_ranks if h <= kq) / kq)
        prs.append(row)
    aps, prs = np.array(aps), np.array(prs)
    valid = ~np.isnan(aps)
    m, p = 0.0, np.zeros(len(kappas))
    for i in np.flatnonzero(valid):
        m += aps[i]
        p = p + prs[i]
    return m / valid.sum(), aps, p / valid.sum(), prs


# --------------------------------------------------------------------------- compute_map, hand-computed
def test_compute_map_hand_computed_no_junk():
    # positives at ranks 0 and 2 of 5: AP = (1+1)/2/2 + (1/2+2/3)/2/2 = 19/24
    mean_ap, aps, mpr, prs = compute_map(_column(7, 1, 8, 2, 3), [{"ok": [7, 8]}], kappas=(1, 2, 5))
    assert mean_ap == pytest.approx(19 / 24, abs=1e-15)
    assert aps.tolist() == pytest.approx([19 / 24])
    # P@1: kq=1 -> 1; P@2: kq=2 -> 1/2; P@5 beyond the last positive: kq=3 -> 2/3
    assert prs[0].tolist() == pytest.approx([1.0, 0.5, 2 / 3])
    assert mpr.tolist() == pytest.approx([1.0, 0.5, 2 / 3])


def test_compute_map_junk_before_positives_is_removed():
    # junk at ranks 0 and 3 is deleted: positives move from 1 and 4 to 0 and 2 -> same as above
    ranks = _column(9, 7, 1, 5, 8, 2)
    mean_ap, _, mpr, _ = compute_map(ranks, [{"ok": [7, 8], "junk": [9, 5]}], kappas=(1, 5))
    assert mean_ap == pytest.approx(19 / 24, abs=1e-15)
    assert mpr.tolist() == pytest.approx([1.0, 2 / 3])
    # without declaring junk, the positives stay at 1 and 4: AP = (1/1... ) computed by hand
    ap_no_junk = ((0 + 1 / 2) + (1 / 4 + 2 / 5)) / 2 / 2  # p0(j=0,r=1)=0/1, p1=1/2; j=1,r=4: 1/4, 2/5
    assert compute_map(ranks, [{"ok": [7, 8]}])[0] == pytest.approx(ap_no_junk, abs=1e-15)


def test_compute_map_query_without_positives_is_excluded():
    ranks = np.stack([[7, 1, 8, 2], [1, 2, 7, 8]], axis=1)
    mean_ap, aps, mpr, prs = compute_map(ranks, [{"ok": [7, 8]}, {"ok": [], "junk": [1]}], kappas=(1,))
    assert np.isnan(aps[1]) and np.isnan(prs[1]).all()
    assert mean_ap == pytest.approx(aps[0]) and mpr[0] == pytest.approx(prs[0, 0])
    # no query with positives at all: NaN means (the reference divides by zero)
    assert np.isnan(compute_map(ranks, [{"ok": []}, {"ok": []}])[0])


def test_compute_map_counts_positives_missing_from_a_truncated_ranking():
    # 3 positives, only one ranked (at 0): AP = (1+1)/2/3
    mean_ap, _, mpr, _ = compute_map(_column(4, 5), [{"ok": [4, 6, 7]}], kappas=(1, 10))
    assert mean_ap == pytest.approx(1 / 3)
    assert mpr.tolist() == [1.0, 1.0]  # kq = min(1, k) = 1
    # none ranked: AP 0, P@k 0 (the reference raises on max([]))
    mean_ap, _, mpr, _ = compute_map(_column(4, 5), [{"ok": [6]}], kappas=(1,))
    assert mean_ap == 0.0 and mpr.tolist() == [0.0]


def test_ties_rank_by_database_order():
    # db 0 and 2 tie for the top; the stable order puts 0 first. Positive = 2 -> rank 1: AP = (0 + 1/2)/2
    q = np.array([[1.0, 0.0]], np.float32)
    db = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], np.float32)
    ranks = ranks_from_embeddings(q, db)
    assert ranks[:, 0].tolist() == [0, 2, 1]
    assert compute_map(ranks, [{"ok": [2]}])[0] == pytest.approx(0.25)
    assert compute_map(ranks, [{"ok": [0]}])[0] == pytest.approx(1.0)


def test_compute_map_rejects_bad_input():
    with pytest.raises(InputShapeError, match="one column per query"):
        compute_map(np.zeros((4, 3), np.int64), [{"ok": [1]}])
    with pytest.raises(InputShapeError, match="integer"):
        compute_map(np.zeros((4, 1), np.float32), [{"ok": [1]}])
    with pytest.raises(ConfigError, match="kappas"):
        compute_map(np.zeros((4, 1), np.int64), [{"ok": [1]}], kappas=(0,))
    with pytest.raises(DataError, match="ok"):
        compute_map(np.zeros((4, 1), np.int64), [{"ok": ["x"]}])


def test_compute_map_equals_independent_implementation_on_random_data():
    rng = np.random.default_rng(3)
    for trial in range(20):
        db, nq = int(rng.integers(5, 80)), int(rng.integers(1, 12))
        ranks = np.stack([rng.permutation(db) for _ in range(nq)], axis=1)
        if trial % 4 == 3:  # truncated rankings
            ranks = ranks[: max(1, db // 2)]
        gnd = []
        for _ in range(nq):
            perm = rng.permutation(db)
            n_ok, n_junk = int(rng.integers(0, max(1, db // 3))), int(rng.integers(0, max(1, db // 3)))
            gnd.append({"ok": perm[:n_ok], "junk": perm[n_ok : n_ok + n_junk]})
        if all(len(g["ok"]) == 0 for g in gnd):
            gnd[0]["ok"] = np.array([0])
        kappas = (1, 5, 10, 200)
        got = compute_map(ranks, gnd, kappas)
        want = straightforward_map(ranks, gnd, kappas)
        # Identical, not just close: both sum in the reference's order.
        assert got[0] == want[0]
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[2], want[2])
        np.testing.assert_array_equal(got[3], want[3])


# --------------------------------------------------------------------------- revisited setups
GND = [
    {"easy": [0, 1], "hard": [2], "junk": [3]},
    {"easy": [], "hard": [4], "junk": [0]},
]


def test_revisited_setups_move_the_right_lists():
    easy, medium, hard = (revisited_gnd(GND, s) for s in ("easy", "medium", "hard"))
    assert sorted(easy[0]["ok"]) == [0, 1] and sorted(easy[0]["junk"]) == [2, 3]
    assert sorted(medium[0]["ok"]) == [0, 1, 2] and sorted(medium[0]["junk"]) == [3]
    assert sorted(hard[0]["ok"]) == [2] and sorted(hard[0]["junk"]) == [0, 1, 3]
    assert len(easy[1]["ok"]) == 0  # query 1 has no easy positive: excluded from Easy
    with pytest.raises(ConfigError):
        revisited_gnd(GND, "extreme")


def test_revisited_map_by_hand():
    ranks = np.array([[2, 4], [3, 0], [0, 1], [1, 2], [4, 3]])  # (db=5, nq=2)
    out = revisited_map(ranks, GND, kappas=(1,))
    # Easy, q0: ok {0,1}, junk {2,3} -> kept order [0, 1, 4]: AP 1; q1 excluded.
    assert out["easy"]["mAP"] == pytest.approx(1.0)
    # Medium, q0: ok {0,1,2}, junk {3}: kept [2,0,1,4] -> AP 1. q1: ok {4} at rank 0 -> 1.
    assert out["medium"]["mAP"] == pytest.approx(1.0)
    # Hard, q0: ok {2}, junk {0,1,3}: kept [2,4] -> 1. q1: ok {4}, junk {0}: first -> 1.
    assert out["hard"]["mAP"] == pytest.approx(1.0)
    worse = revisited_map(ranks[::-1].copy(), GND)
    # Reversed q0 medium: kept [4,1,0,2] -> positives at 1,2,3: ((0+1/2)+(1/2+2/3)+(2/3+3/4))/2/3
    q0 = ((0 + 1 / 2) + (1 / 2 + 2 / 3) + (2 / 3 + 3 / 4)) / 2 / 3
    # q1 reversed: [3,2,1,0,4], junk {0} removed -> 4 at rank 3: (1/3... ) = (0/3 + 1/4)/2
    q1 = (0 + 1 / 4) / 2
    assert worse["medium"]["mAP"] == pytest.approx((q0 + q1) / 2)


# --------------------------------------------------------------------------- ground-truth files
def _write_dataset(root, name="roxford5k", fmt="pkl"):
    """A tiny revisitop layout: 6 database images of 3 colours, 2 queries with a bbox inside a coloured patch."""
    directory = root / name / "jpg"
    directory.mkdir(parents=True)
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
    imlist = []
    for i in range(6):
        im = np.full((40 + i, 60, 3), colours[i % 3], np.uint8)
        Image.fromarray(im).save(directory / f"db{i}.jpg", quality=95)
        imlist.append(f"db{i}")
    qimlist = []
    for q, colour in enumerate([0, 1]):
        im = np.full((50, 70, 3), 128, np.uint8)
        im[10:30, 20:50] = colours[colour]  # only the bbox region has the landmark's colour
        Image.fromarray(im).save(directory / f"q{q}.jpg", quality=95)
        qimlist.append(f"q{q}")
    gnd = [
        {"bbx": [20.0, 10.0, 50.0, 30.0], "easy": [0], "hard": [3], "junk": [1]},
        {"bbx": [20.0, 10.0, 50.0, 30.0], "easy": [1, 4], "hard": [], "junk": []},
    ]
    data = {"imlist": imlist, "qimlist": qimlist, "gnd": gnd}
    if fmt == "pkl":
        with open(root / name / f"gnd_{name}.pkl", "wb") as f:
            pickle.dump(data, f)
    else:
        (root / name / f"gnd_{name}.json").write_text(json.dumps(data))
    return data


def mean_colour(images):
    return np.stack([im.reshape(-1, 3).mean(0) for im in images]).astype(np.float32)


def test_read_ground_truth_pickle_with_numpy_arrays_and_json(tmp_path):
    data = {
        "imlist": ["a", "b", "c"],
        "qimlist": ["q"],
        "gnd": [{"bbx": np.array([1.0, 2.0, 3.0, 4.0]), "easy": np.array([0, 2]), "hard": [], "junk": [1]}],
    }
    (tmp_path / "g.pkl").write_bytes(pickle.dumps(data, protocol=2))
    gt = read_ground_truth(tmp_path / "g.pkl")
    assert gt["gnd"][0]["easy"].tolist() == [0, 2] and gt["gnd"][0]["bbx"] == (1.0, 2.0, 3.0, 4.0)
    data["gnd"][0]["bbx"] = [1, 2, 3, 4]
    data["gnd"][0]["easy"] = [0, 2]
    (tmp_path / "g.json").write_text(json.dumps(data))
    assert read_ground_truth(tmp_path / "g.json")["gnd"][0]["junk"].tolist() == [1]


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_read_ground_truth_refuses_code_in_pickles(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "g.pkl").write_bytes(pickle.dumps({"imlist": [_Exploit(marker)], "qimlist": [], "gnd": []}))
    with pytest.raises(DataError, match="not allowed"):
        read_ground_truth(tmp_path / "g.pkl")
    assert not marker.exists()


def _revisitop_shaped(rng, num_images=4993, num_queries=70):
    """Ground truth the size of ROxford5k's: 4993 image names, 70 queries, lists of up to a few hundred ids."""
    imlist = [f"landmark_{i // 100:03d}_{i:06d}" for i in range(num_images)]
    gnd = []
    for _ in range(num_queries):
        ids = rng.permutation(num_images)
        easy, hard, junk = rng.integers(1, 150), rng.integers(0, 250), rng.integers(0, 400)
        gnd.append({
            "bbx": [float(v) for v in (10.5, 20.0, 300.25, 410.0)],
            "easy": ids[:easy].tolist(), "hard": ids[easy:easy + hard].tolist(),
            "junk": ids[easy + hard:easy + hard + junk].tolist(),
        })  # fmt: skip
    return {"imlist": imlist, "qimlist": [imlist[i] for i in range(0, 700, 10)], "gnd": gnd}


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_read_ground_truth_loads_revisitop_sized_files(tmp_path, protocol):
    data = _revisitop_shaped(np.random.default_rng(protocol))
    if protocol == 5:  # lists as numpy arrays, as some conversions write them
        for g in data["gnd"]:
            g["easy"], g["bbx"] = np.asarray(g["easy"]), np.asarray(g["bbx"])
    path = tmp_path / "gnd_roxford5k.pkl"
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    gt = read_ground_truth(path)
    assert gt["imlist"] == data["imlist"] and len(gt["gnd"]) == 70
    for got, want in zip(gt["gnd"], data["gnd"]):
        for key in ("easy", "hard", "junk"):
            assert got[key].tolist() == np.asarray(want[key]).tolist()
        assert got["bbx"] == (10.5, 20.0, 300.25, 410.0)


def _nested_shared(levels: int):
    """The "billion laughs" structure: each list holds its predecessor twice (2**levels leaves)."""
    item = ["lol"]
    for _ in range(levels):
        item = [item, item]
    return item


def test_read_ground_truth_refuses_exponential_and_deep_pickles_quickly(tmp_path):
    path = tmp_path / "g.pkl"
    # ~300 bytes that unpickle into 2**30 references: expanding them (printing, validating) would take hours.
    path.write_bytes(pickle.dumps({"imlist": _nested_shared(30), "qimlist": [], "gnd": []}, protocol=2))
    assert path.stat().st_size < 400
    t0 = time.perf_counter()
    with pytest.raises(DataError, match="expand to over"):
        read_ground_truth(path)
    assert time.perf_counter() - t0 < 0.5
    # Wide instead of deep: 1000 references to 1000 references to a 1000-int list (10**9 ints in ~8 KB).
    row = list(range(1000))
    path.write_bytes(pickle.dumps({"imlist": [[row] * 1000] * 1000, "qimlist": [], "gnd": []}, protocol=4))
    with pytest.raises(DataError, match="expand to over"):
        read_ground_truth(path)
    # Deep without sharing (small, but recursion in every reader).
    deep: list = []
    for _ in range(200):
        deep = [deep]
    path.write_bytes(pickle.dumps({"imlist": deep, "qimlist": [], "gnd": []}, protocol=2))
    with pytest.raises(DataError, match="nested deeper than"):
        read_ground_truth(path)
    # A memo index near 2**32 would make the C unpickler size its memo table by it.
    path.write_bytes(b"\x80\x02]r\xff\xff\xff\x7f.")  # PROTO 2, EMPTY_LIST, LONG_BINPUT 2**31 - 1, STOP
    with pytest.raises(DataError, match="memo index"):
        read_ground_truth(path)
    # Sharing empty lists first and filling the shared one afterwards would hide the expansion from the count.
    levels = b"".join(b"(h" + bytes([i]) + b"h" + bytes([i]) + b"lq" + bytes([i + 1]) + b"0" for i in range(5))
    path.write_bytes(b"\x80\x02]q\x000" + levels + b"h\x00(K\x01K\x02e.")  # ... BINGET 0, MARK, 1, 2, APPENDS
    with pytest.raises(DataError, match="changes an object after it was referred to again"):
        read_ground_truth(path)
    # The same structure small enough is fine, and names must be strings.
    path.write_bytes(pickle.dumps({"imlist": _nested_shared(3), "qimlist": [], "gnd": []}, protocol=2))
    with pytest.raises(DataError, match=r"imlist\[0\] must be an image name"):
        read_ground_truth(path)


def test_read_ground_truth_rejects_malformed(tmp_path):
    bad = {"imlist": ["a"], "qimlist": ["q"], "gnd": [{"easy": [3], "hard": [], "junk": []}]}
    (tmp_path / "g.json").write_text(json.dumps(bad))
    with pytest.raises(DataError, match="outside"):
        read_ground_truth(tmp_path / "g.json")
    (tmp_path / "h.pkl").write_bytes(b"\x80\x04garbage")
    with pytest.raises(DataError):
        read_ground_truth(tmp_path / "h.pkl")
    with pytest.raises(DataError, match="no ground truth"):
        load_revisited(tmp_path, "rparis6k")


def test_load_image_crops_and_bounds(tmp_path):
    im = np.zeros((30, 40, 3), np.uint8)
    im[5:15, 10:30] = 255
    Image.fromarray(im).save(tmp_path / "a.png")
    crop = load_image(tmp_path / "a.png", bbox=(10, 5, 30, 15))
    assert crop.shape == (10, 20, 3) and crop.min() == 255
    assert load_image(tmp_path / "a.png", max_side=20).shape == (15, 20, 3)
    with pytest.raises(DataError, match="over the limit"):
        load_image(tmp_path / "a.png", max_pixels=100)
    (tmp_path / "b.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError, match="cannot read image"):
        load_image(tmp_path / "b.jpg")


@pytest.mark.parametrize("fmt", ["pkl", "json"])
def test_evaluate_revisited_end_to_end(tmp_path, fmt):
    data = _write_dataset(tmp_path, fmt=fmt)
    seen = []

    def embed(images):
        seen.extend(im.shape for im in images)
        return mean_colour(images)

    out = evaluate_revisited(tmp_path, "roxford5k", embed, batch_size=4)
    # queries first, cropped to their bbox (30 x 20), then the 6 database images at full size
    assert seen[:2] == [(20, 30, 3), (20, 30, 3)]
    assert seen[2:] == [(40 + i, 60, 3) for i in range(6)]
    # the cropped query is pure red / green: its colour's images come first (JPEG noise aside)
    assert out["medium"]["mAP"] == pytest.approx(1.0) and out["medium"]["mP@1"] == 1.0
    assert out["num_queries"] == 2 and out["num_images"] == 6
    # metrics equal compute_map on the same ranking
    q = mean_colour([load_image(tmp_path / "roxford5k/jpg/q0.jpg", data["gnd"][0]["bbx"])])
    assert q[0, 0] > 150 and q[0, 1] < 80


def test_evaluate_rejects_bad_embed_fn(tmp_path):
    _write_dataset(tmp_path)
    with pytest.raises(InputShapeError, match="embed_fn"):
        evaluate_revisited(tmp_path, "roxford5k", lambda images: np.zeros((1, 3)))
    with pytest.raises(DataError, match="no ground truth for dataset 'oxford105k'"):
        evaluate_revisited(tmp_path, "oxford105k", mean_colour)
    with pytest.raises(ConfigError, match="folder name"):
        evaluate_revisited(tmp_path, "../roxford5k", mean_colour)


# --------------------------------------------------------------------------- GLDv2
def test_gldv2_map_at_100_hand_computed():
    solution = {"q1": ["a", "b", "c"], "q2": ["a", "b"], "q3": ["z"], "ignored": []}
    predictions = {
        "q1": ["a", "x", "b"],  # (1/1 + 2/3) / 3
        "q2": ["a", "a", "b"],  # repeat is a miss that keeps its place: (1 + 2/3) / 2
        "ignored": ["a"],  # left out
    }  # q3 not predicted: 0
    want = ((1 + 2 / 3) / 3 + (1 + 2 / 3) / 2 + 0) / 3
    assert gldv2_map_at_k(predictions, solution) == pytest.approx(want)
    # cut-off: k=1 keeps only the first prediction; min(m, k) = 1 in the denominator
    assert gldv2_map_at_k(predictions, solution, k=1) == pytest.approx((1 + 1 + 0) / 3)
    with pytest.raises(DataError, match="not in the solution"):
        gldv2_map_at_k({"q9": ["a"]}, solution)


def test_gldv2_map_denominator_caps_at_k():
    solution = {"q": [f"r{i}" for i in range(150)]}
    predictions = {"q": [f"r{i}" for i in range(100)]}
    assert gldv2_map_at_k(predictions, solution) == pytest.approx(1.0)


def test_read_gldv2_solution(tmp_path):
    path = tmp_path / "sol.csv"
    path.write_text("id,images,Usage\nq1,a b c,Public\nq2,d,Private\nq3,None,Ignored\n")
    assert read_gldv2_retrieval_solution(path) == {"q1": ["a", "b", "c"], "q2": ["d"]}
    assert read_gldv2_retrieval_solution(path, usage=("Private",)) == {"q2": ["d"]}
    path.write_text("a,b\n")
    with pytest.raises(DataError, match="header"):
        read_gldv2_retrieval_solution(path)


# --------------------------------------------------------------------------- import weight, CLI
@pytest.mark.integration
def test_evaluate_and_index_do_not_import_tensorflow():
    code = (
        "import sys, dolg_tf.evaluate, dolg_tf.index\n"
        "heavy = [m for m in ('tensorflow', 'keras', 'dolg_tf.model') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_evaluate_with_saved_embeddings(tmp_path, capsys):
    _write_dataset(tmp_path)
    data = load_revisited(tmp_path, "roxford5k")
    from dolg_tf.evaluate import embed_revisited

    q, db = embed_revisited(data, mean_colour)
    emb = tmp_path / "emb"
    emb.mkdir()
    np.save(emb / "queries.npy", q)
    np.save(emb / "db.npy", db)
    out = tmp_path / "m.json"
    argv = ["evaluate", "--data", str(tmp_path), "--dataset", "roxford5k", "--embeddings", str(emb), "--out", str(out)]
    assert dolg_main(argv) == 0
    metrics = json.loads(out.read_text())
    want = revisited_map(ranks_from_embeddings(q, db), data.gnd)
    assert metrics["hard"]["mAP"] == pytest.approx(want["hard"]["mAP"], abs=1e-6)
    assert "mAP E" in capsys.readouterr().out
    # with alpha-QE and DBA the command still runs through the exact index
    assert dolg_main(argv + ["--qe", "3", "--dba", "2"]) == 0
    assert json.loads(out.read_text())["query_expansion"] == {"alpha": 3.0, "neighbours": 2}
    # wrong counts -> one-line error, exit 2
    np.save(emb / "db.npy", db[:3])
    assert dolg_main(argv) == 2
    assert "3 database embeddings" in capsys.readouterr().err


def test_cli_evaluate_a_dataset_of_your_own_with_a_json_ground_truth(tmp_path, capsys):
    # The JSON schema of docs/evaluation.md, images named with their own suffix (PNG here).
    folder = tmp_path / "shops" / "jpg"
    folder.mkdir(parents=True)
    colours = {"red": (220, 20, 20), "green": (20, 220, 20), "blue": (20, 20, 220)}
    for name, colour in colours.items():
        for k in range(2):
            Image.fromarray(np.full((30 + k, 40, 3), colour, np.uint8)).save(folder / f"{name}{k}.png")
    im = np.full((40, 40, 3), 127, np.uint8)
    im[5:25, 10:30] = colours["green"]
    Image.fromarray(im).save(folder / "query.png")
    gnd = {
        "imlist": [f"{name}{k}.png" for name in colours for k in range(2)],
        "qimlist": ["query.png"],
        "gnd": [{"bbx": [10, 5, 30, 25], "easy": [2], "hard": [3], "junk": [0]}],
    }
    (tmp_path / "shops" / "gnd_shops.json").write_text(json.dumps(gnd))
    out = evaluate_revisited(tmp_path, "shops", mean_colour)
    assert out["dataset"] == "shops" and out["num_images"] == 6
    assert out["medium"]["mAP"] == 1.0 and out["hard"]["mAP"] == 1.0  # both green images first
    save = tmp_path / "emb"
    data = load_revisited(tmp_path, "shops")
    from dolg_tf.evaluate import embed_revisited

    q, db = embed_revisited(data, mean_colour)
    save.mkdir()
    np.save(save / "queries.npy", q)
    np.save(save / "db.npy", db)
    argv = ["evaluate", "--data", str(tmp_path), "--dataset", "shops", "--embeddings", str(save)]
    assert dolg_main(argv) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[0])
    assert summary["dataset"] == "shops" and summary["medium"]["mAP"] == 1.0
    assert dolg_main(["evaluate", "--data", str(tmp_path), "--dataset", "nowhere", "--embeddings", str(save)]) == 2
    err = capsys.readouterr().err
    assert "no ground truth for dataset 'nowhere'" in err and str(tmp_path / "nowhere" / "gnd_nowhere.json") in err


def test_cli_evaluate_in_process_keras_model(tmp_path):
    from dolg_tf.model import build_dolg

    _write_dataset(tmp_path)
    model_path = tmp_path / "tiny.keras"
    build_dolg("tiny").save(model_path)
    out = tmp_path / "m.json"
    save = tmp_path / "emb"
    argv = [
        "evaluate",
        "--data",
        str(tmp_path),
        "--dataset",
        "roxford5k",
        "--model",
        str(model_path),
        "--scales",
        "1",
        "--no-progress",
        "--save-embeddings",
        str(save),
        "--out",
        str(out),
    ]
    assert dolg_main(argv) == 0
    metrics = json.loads(out.read_text())
    q, db = np.load(save / "queries.npy"), np.load(save / "db.npy")
    assert q.shape[0] == 2 and db.shape[0] == 6
    np.testing.assert_allclose(np.linalg.norm(db, axis=1), 1.0, atol=1e-5)
    data = load_revisited(tmp_path, "roxford5k")
    want = revisited_map(ranks_from_embeddings(q, db), data.gnd)
    assert metrics["medium"]["mAP"] == pytest.approx(want["medium"]["mAP"], abs=1e-6)


@pytest.mark.integration
def test_cli_evaluate_saved_model_through_the_client(tmp_path, tiny_export):
    from dolg_tf.client import Client

    _write_dataset(tmp_path)
    export_dir = os.path.join(tiny_export, "1")  # the session's tiny export: at most 4 images per call
    save = tmp_path / "emb"
    argv = [
        "evaluate",
        "--data",
        str(tmp_path),
        "--dataset",
        "roxford5k",
        "--saved-model",
        tiny_export,
        "--batch-size",
        "4",
        "--no-progress",
        "--save-embeddings",
        str(save),
        "--out",
        str(tmp_path / "m.json"),
    ]
    assert dolg_main(argv) == 0
    q, db = np.load(save / "queries.npy"), np.load(save / "db.npy")
    assert q.shape[0] == 2 and db.shape[0] == 6
    # the query went through the client cropped to its box
    data = load_revisited(tmp_path, "roxford5k")
    with Client(export_dir, protocol="saved_model") as client:
        crop = load_image(data.query_path(1), data.gnd[1]["bbx"])
        np.testing.assert_allclose(q[1], client.embed([crop])[0], atol=1e-5)
    want = revisited_map(ranks_from_embeddings(q, db), data.gnd)
    assert json.loads((tmp_path / "m.json").read_text())["easy"]["mAP"] == pytest.approx(want["easy"]["mAP"], abs=1e-6)
