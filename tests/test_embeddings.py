"""dolg_tf.embeddings: the .npy + ids JSON files of dolg embed, read back with numpy and json as the reference."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from dolg_tf import embeddings
from dolg_tf.errors import DataError


def _rows(n: int = 6, d: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d))


class _OpensAFile:
    """Unpickling this object creates ``marker``: a loader that unpickles would leave it behind."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def _npy_header(path, shape, descr="<f4", payload: bytes = b"") -> None:
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": descr, "fortran_order": False, "shape": shape})
        f.write(payload)


def test_round_trip(tmp_path):
    x = _rows()
    ids = [f"img{i}.jpg" for i in range(6)]
    ids_file = embeddings.save(tmp_path / "gallery.npy", x, ids, metadata={"model": "dolg", "version": 3})
    assert ids_file == str(tmp_path / "gallery.ids.json")
    # Read back with numpy and json themselves: float32, the same values, the documented keys.
    raw = np.load(tmp_path / "gallery.npy", allow_pickle=False)
    assert raw.dtype == np.float32 and raw.shape == (6, 4)
    np.testing.assert_allclose(raw, x, rtol=1e-6)
    meta = json.loads((tmp_path / "gallery.ids.json").read_text())
    assert meta == {"ids": ids, "count": 6, "dim": 4, "model": "dolg", "version": 3, "embeddings": "gallery.npy"}
    emb, got = embeddings.load(tmp_path / "gallery.npy")
    assert got == ids and emb.dtype == np.float32 and emb.flags.c_contiguous
    np.testing.assert_array_equal(emb, raw)
    # Without ids, no ids file; a Fortran-ordered or integer array still reads as C-ordered float32.
    assert embeddings.save(tmp_path / "q.npy", np.asfortranarray(x)) is None
    assert not (tmp_path / "q.ids.json").exists()
    np.save(tmp_path / "ints.npy", np.arange(12, dtype=np.int64).reshape(3, 4))
    ints = embeddings.read_embeddings(tmp_path / "ints.npy")
    assert ints.dtype == np.float32 and ints[2, 3] == 11.0


def test_ids_from_a_list_a_dict_or_text_lines(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([3, 1, 2]))
    (tmp_path / "b.json").write_text(json.dumps({"ids": ["x", "y"], "model": "m"}))
    (tmp_path / "c.txt").write_text("x/1.jpg\n\ny/2.jpg\n")
    assert embeddings.read_ids(tmp_path / "a.json") == [3, 1, 2]
    assert embeddings.read_ids(tmp_path / "b.json") == ["x", "y"]
    assert embeddings.read_ids(tmp_path / "c.txt") == ["x/1.jpg", "y/2.jpg"]
    for name, text, match in (
        ("d.json", "[1, true]", "expected a JSON list of integers or strings"),
        ("e.json", "{not json", "is not valid JSON"),
        ("f.csv", "a,b", "ids must be a .json or .txt file"),
    ):
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=match):
            embeddings.read_ids(tmp_path / name)
    (tmp_path / "big.txt").write_text("x\n" * 100)
    with pytest.raises(DataError, match="is larger than 50 bytes"):
        embeddings.read_ids(tmp_path / "big.txt", max_bytes=50)


def test_an_ids_file_that_does_not_match_the_array_is_refused(tmp_path):
    embeddings.save(tmp_path / "g.npy", _rows(6, 4), [f"i{k}" for k in range(6)])
    embeddings.save(tmp_path / "h.npy", _rows(5, 4), [f"i{k}" for k in range(5)])
    with pytest.raises(DataError, match=r"holds 5 ids but .*g\.npy' holds 6 embeddings"):
        embeddings.load(tmp_path / "g.npy", tmp_path / "h.ids.json")
    # Same count, other width: the ids file's dim says it belongs to another run.
    embeddings.save(tmp_path / "w.npy", _rows(6, 8), [f"i{k}" for k in range(6)])
    with pytest.raises(DataError, match=r"says dim=8 but .*g\.npy' holds 4-d embeddings"):
        embeddings.load(tmp_path / "g.npy", tmp_path / "w.ids.json")
    (tmp_path / "dup.json").write_text(json.dumps(["a", "b", "a", "c", "d", "e"]))
    with pytest.raises(DataError, match="the id 'a' appears more than once"):
        embeddings.load(tmp_path / "g.npy", tmp_path / "dup.json")
    with pytest.raises(DataError, match=r"cannot read ids .*nope\.ids\.json"):
        embeddings.load(tmp_path / "g.npy", tmp_path / "nope.ids.json")


def test_a_pickled_npy_is_refused_without_unpickling(tmp_path):
    marker = tmp_path / "unpickled"
    payload = np.empty(2, dtype=object)
    payload[:] = [_OpensAFile(str(marker)), _OpensAFile(str(marker))]
    np.save(tmp_path / "evil.npy", payload.reshape(1, 2), allow_pickle=True)
    assert np.load(tmp_path / "evil.npy", allow_pickle=True) is not None and marker.exists()  # the trap works
    marker.unlink()
    with pytest.raises(DataError, match=r"holds object values \(pickled objects are never loaded\)"):
        embeddings.read_embeddings(tmp_path / "evil.npy")
    assert not marker.exists()
    np.savez(tmp_path / "arrays.npz", a=_rows())
    with pytest.raises(DataError, match="is not a .npy file"):
        embeddings.read_embeddings(tmp_path / "arrays.npz")


def test_the_header_is_checked_before_the_array_is_allocated(tmp_path):
    # A header claiming 4 TB over a few bytes: refused by size, with no attempt to allocate.
    _npy_header(tmp_path / "huge.npy", (1_000_000, 1_000_000), payload=b"\0" * 16)
    with pytest.raises(DataError, match=r"\(1000000, 1000000\) float32 array is 4000000000000 bytes, over max_bytes"):
        embeddings.read_embeddings(tmp_path / "huge.npy")
    # Within the limit but shorter than the header says: truncated.
    _npy_header(tmp_path / "short.npy", (100, 8), payload=b"\0" * 64)
    truncated = r"is truncated: its header says \(100, 8\) float32 \(3200 bytes\) but it holds 64"
    with pytest.raises(DataError, match=truncated):
        embeddings.read_embeddings(tmp_path / "short.npy")
    np.save(tmp_path / "three.npy", np.zeros((2, 3, 4), np.float32))
    with pytest.raises(DataError, match=r"must be a 2-D \(N, D\) array, got shape \(2, 3, 4\)"):
        embeddings.read_embeddings(tmp_path / "three.npy")
    np.save(tmp_path / "complex.npy", np.zeros((2, 3), np.complex64))
    with pytest.raises(DataError, match="holds complex64 values"):
        embeddings.read_embeddings(tmp_path / "complex.npy")
    np.save(tmp_path / "ok.npy", np.zeros((10, 4), np.float32))
    with pytest.raises(DataError, match="over max_bytes=100"):
        embeddings.read_embeddings(tmp_path / "ok.npy", max_bytes=100)
    assert embeddings.read_embeddings(tmp_path / "ok.npy", max_bytes=160).shape == (10, 4)


def test_swapped_files_say_which_goes_where(tmp_path):
    embeddings.save(tmp_path / "gallery.npy", _rows(3, 4), ["a", "b", "c"])
    with pytest.raises(DataError) as info:
        embeddings.read_embeddings(tmp_path / "gallery.ids.json", name="--embeddings", ids_name="--ids")
    message = str(info.value)
    assert "--embeddings" in message and "gallery.ids.json" in message and "goes to --ids" in message
    with pytest.raises(DataError, match=r"is a .npy array \(the embeddings\?\).*goes to --embeddings"):
        embeddings.read_ids(tmp_path / "gallery.npy", name="--ids", embeddings_name="--embeddings")


def test_save_refuses_what_it_could_not_read_back(tmp_path):
    for kwargs, match in (
        (dict(path=tmp_path / "g.bin", embeddings=_rows()), r"must be named \*\.npy"),
        (dict(path=tmp_path / "g.npy", embeddings=np.zeros(4)), r"2-D \(N, D\) array of numbers, got float64 \(4,\)"),
        (dict(path=tmp_path / "g.npy", embeddings=np.array([["a"]])), "array of numbers"),
        (dict(path=tmp_path / "g.npy", embeddings=_rows(3), ids=["a", "b"]), "2 ids for 3 embeddings"),
        (dict(path=tmp_path / "g.npy", embeddings=_rows(2), ids=["a", "a"]), "the id 'a' appears more than once"),
        (dict(path=tmp_path / "g.npy", embeddings=_rows(1), ids=[1.5]), "ids must be integers or strings"),
        (dict(path=tmp_path / "g.npy", embeddings=_rows(1), ids=["a"], metadata={"dim": 3}), "must not set dim"),
    ):
        with pytest.raises(DataError, match=match):
            embeddings.save(**kwargs)
    assert not os.listdir(tmp_path)  # nothing written, not even a temporary file
