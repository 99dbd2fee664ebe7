"""Batch embedding on Apache Beam (dolg embed-batch): folders, CSV and TFRecord inputs through Beam's in-process
runner, checked against direct calls of the SavedModel's serving_default signature; dead letters; Parquet
metadata; re-runs give identical files."""

import io
import json
import os

import keras
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow as tf
from PIL import Image

from dolg_tf import cli
from dolg_tf.errors import ConfigError, DataError
from dolg_tf.export import export_saved_model
from dolg_tf.model import build_dolg
from dolg_tf.pipelines import SavedModelHandler, embed_batch
from dolg_tf.pipelines.model import ImageRejected

# SavedModel exports and what runs them end to end: make test-fast leaves these out.
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("pipelines")]

MAX_PIXELS = 160 * 160  # small, so that one test image is over it without allocating much
N_GOOD = 26


def _jpeg(array, quality=90):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    keras.utils.set_random_seed(3)
    base = tmp_path_factory.mktemp("export") / "gallery_model"
    path = export_saved_model(
        build_dolg("tiny"), base, image_size=64, scales=(0.7071, 1.0), max_batch_size=8,
        max_image_pixels=MAX_PIXELS, warmup_batch_sizes=(),
    )  # fmt: skip
    return str(base), path


@pytest.fixture(scope="module")
def photos():
    """N_GOOD JPEGs of different sizes cut from the built-in demo photos, keyed by a relative path."""
    from dolg_tf.demo.photos import demo_photos

    rng = np.random.default_rng(5)
    sources = list(demo_photos().values())
    out = {}
    for i in range(N_GOOD):
        src = sources[i % len(sources)]
        h, w = int(rng.integers(40, 120)), int(rng.integers(40, 120))
        top, left = int(rng.integers(0, src.shape[0] - h)), int(rng.integers(0, src.shape[1] - w))
        folder = ("", "a/", "a/b/")[i % 3]
        out[f"{folder}photo_{i:02d}.jpg"] = _jpeg(np.ascontiguousarray(src[top : top + h, left : left + w]))
    return out


@pytest.fixture(scope="module")
def corrupt(photos):
    """Files that must become dead letters, with a word their error must contain."""
    good = next(iter(photos.values()))
    big = _jpeg(np.full((200, 200, 3), 128, np.uint8))  # 40000 pixels > MAX_PIXELS
    return {
        "bad/truncated.jpg": (good[:300], "decode"),
        "bad/text.jpg": (b"this is not an image at all", "not a JPEG/PNG"),
        "bad/empty.png": (b"", "empty"),
        "bad/too_big.jpg": (big, "pixels"),
    }


@pytest.fixture(scope="module")
def reference(export, photos):
    """Each image through serving_default on its own (batch of one): independent of the pipeline's batching."""
    _, path = export
    fn = tf.saved_model.load(path).signatures["serving_default"]
    return {key: fn(images=tf.constant([data]))["embedding"].numpy()[0] for key, data in photos.items()}


@pytest.fixture(scope="module")
def gallery(tmp_path_factory, photos, corrupt):
    root = tmp_path_factory.mktemp("gallery")
    files = {**photos, **{k: v for k, (v, _) in corrupt.items()}, ".hidden/skip.jpg": photos["photo_00.jpg"]}
    files["notes.txt"] = b"not an image extension: not an input"
    for rel, data in files.items():
        os.makedirs(os.path.dirname(root / rel), exist_ok=True)
        (root / rel).write_bytes(data)
    return str(root)


def _read_rows(out):
    table = pq.read_table([os.path.join(out, n) for n in sorted(os.listdir(out)) if n.endswith(".parquet")])
    ids = table.column("id").to_pylist()
    return dict(zip(ids, (np.asarray(v, np.float32) for v in table.column("embedding").to_pylist())))


def _read_errors(out):
    rows = []
    for name in sorted(os.listdir(out)):
        if name.startswith("errors-") and name.endswith(".jsonl"):
            with open(os.path.join(out, name)) as f:
                rows += [json.loads(line) for line in f]
    return rows


@pytest.fixture(scope="module")
def folder_runs(tmp_path_factory, export, gallery):
    """The CLI over the folder, twice into fresh folders (10 rows per shard: 3 Parquet shards), both runs
    also upserting into one Milvus Lite collection."""
    base, _ = export
    milvus_db = str(tmp_path_factory.mktemp("milvus") / "gallery.db")
    outs = []
    for run in range(2):
        out = str(tmp_path_factory.mktemp(f"run{run}") / "out")
        argv = ["embed-batch", gallery, "--saved-model", base, "--out", out, "--rows-per-shard", "10"]
        argv += ["--milvus-uri", milvus_db, "--milvus-collection", "gallery", "--milvus-kind", "FLAT"]
        assert cli.main(argv + ["--direct_num_workers=1"]) == 0  # a Beam flag passes through
        outs.append(out)
    return outs, milvus_db


@pytest.mark.integration
def test_folder_embeddings_match_the_saved_model(folder_runs, reference, corrupt):
    out = folder_runs[0][0]
    rows = _read_rows(out)
    assert sorted(rows) == sorted(reference)  # ids: paths relative to the folder; hidden and .txt files skipped
    for key, vec in rows.items():
        assert vec.dtype == np.float32 and vec.shape == reference[key].shape
        np.testing.assert_allclose(vec, reference[key], atol=1e-5, rtol=0)
    errors = _read_errors(out)
    assert sorted(e["id"] for e in errors) == sorted(corrupt)
    for e in errors:
        assert e["path"].endswith(e["id"]) and corrupt[e["id"]][1] in e["error"], e
    summary = json.load(open(os.path.join(out, "dolg_embed_batch.json")))
    assert (summary["embedded"], summary["errors"]) == (N_GOOD, len(corrupt))
    shards = sorted(n for n in os.listdir(out) if n.endswith(".parquet"))
    assert shards == [f"embeddings-{i:05d}-of-00003.parquet" for i in range(3)] == summary["embedding_files"]
    assert not [n for n in os.listdir(out) if n.startswith(".")]  # no temporary files left


@pytest.mark.integration
def test_parquet_schema_and_metadata(folder_runs, export):
    from tensorflow.core.protobuf import fingerprint_pb2

    _, path = export
    fp = fingerprint_pb2.FingerprintDef()
    with open(os.path.join(path, "fingerprint.pb"), "rb") as f:
        fp.ParseFromString(f.read())
    singleprint = (
        f"{fp.graph_def_program_hash}/{fp.signature_def_hash}/{fp.saved_object_graph_hash}/{fp.checkpoint_hash}"
    )
    out = folder_runs[0][0]
    for name in os.listdir(out):
        if name.endswith(".parquet"):
            schema = pq.read_schema(os.path.join(out, name))
            assert schema.field("id").type == pa.string()
            assert schema.field("embedding").type == pa.list_(pa.float32())
            meta = {k.decode(): v.decode() for k, v in schema.metadata.items()}
            assert meta["dolg.model_name"] == "gallery_model" and meta["dolg.model_version"] == "1"
            assert meta["dolg.fingerprint"] == singleprint and meta["dolg.embedding_dim"] == "128"


@pytest.mark.integration
def test_rerun_writes_identical_files_and_refuses_a_used_folder(folder_runs, export, gallery):
    first, second = folder_runs[0]
    names = sorted(n for n in os.listdir(first) if n != "dolg_embed_batch.json")
    assert names == sorted(n for n in os.listdir(second) if n != "dolg_embed_batch.json")
    for name in names:
        with open(os.path.join(first, name), "rb") as a, open(os.path.join(second, name), "rb") as b:
            assert a.read() == b.read(), name
    before = sorted(os.listdir(first))
    with pytest.raises(DataError, match="not empty"):
        embed_batch([gallery], export[0], first)
    assert sorted(os.listdir(first)) == before


@pytest.mark.integration
def test_milvus_collection_holds_one_row_per_image_after_two_runs(folder_runs, reference):
    from dolg_tf.index.milvus import MilvusIndex

    outs, milvus_db = folder_runs
    assert json.load(open(os.path.join(outs[1], "dolg_embed_batch.json")))["milvus"]["rows"] == N_GOOD
    with MilvusIndex.open(milvus_db, "gallery") as index:
        assert index.count() == N_GOOD  # the second run replaced the first run's rows
        keys = sorted(reference)
        scores, ids = index.search(np.stack([reference[k] for k in keys]), k=1)
    assert [row[0] for row in ids.tolist()] == keys
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)


@pytest.mark.integration
def test_csv_and_tfrecord_inputs(tmp_path, export, gallery, photos, reference):
    from dolg_tf.data.tfrecord import make_example

    keys = sorted(photos)
    csv_keys, tf_keys = keys[:6], keys[6:12]
    csv_lines = ["id,path"]
    for i, key in enumerate(csv_keys):  # relative to the CSV's folder, and absolute
        path = os.path.relpath(os.path.join(gallery, key), tmp_path) if i % 2 else os.path.join(gallery, key)
        csv_lines.append(f"csv-{key},{path}")
    csv_lines += [
        f"csv-{csv_keys[0]},{os.path.join(gallery, csv_keys[0])}",  # the same file again: read once
        f"csv-{csv_keys[1]},{os.path.join(gallery, keys[20])}",  # the same id for another file
        f"missing,{os.path.join(gallery, 'nope.jpg')}",
        "one field only",
    ]
    (tmp_path / "list.csv").write_text("\n".join(csv_lines) + "\n")
    records = [make_example(photos[key], 0, key=f"tf/{key}") for key in tf_keys]
    records.append(make_example(photos[keys[13]], 0))  # no image/key: the id comes from the record
    records.append(make_example(b"\xff\xd8\xff\xe0 not really a jpeg", 0, key="tf/broken"))
    with tf.io.TFRecordWriter(str(tmp_path / "part-0.tfrecord")) as writer:
        for record in records:
            writer.write(record)

    kept, dropped = sorted([os.path.join(gallery, csv_keys[1]), os.path.join(gallery, keys[20])])
    out = str(tmp_path / "out")
    summary = embed_batch([str(tmp_path / "list.csv"), str(tmp_path / "*.tfrecord")], export[1], out)
    rows = _read_rows(out)
    expected = {f"csv-{k}": reference[k] for k in csv_keys} | {f"tf/{k}": reference[k] for k in tf_keys}
    if kept.endswith(keys[20]):
        expected[f"csv-{csv_keys[1]}"] = reference[keys[20]]
    unkeyed = [k for k in rows if "#" in k]
    assert len(unkeyed) == 1 and unkeyed[0].startswith(str(tmp_path / "part-0.tfrecord") + "#")
    expected[unkeyed[0]] = reference[keys[13]]
    assert sorted(rows) == sorted(expected)
    for key, vec in rows.items():
        np.testing.assert_allclose(vec, expected[key], atol=1e-5, rtol=0)
    errors = {e["id"]: e for e in _read_errors(out)}
    assert sorted(errors) == sorted(["", f"csv-{csv_keys[1]}", "missing", "tf/broken"])
    # One id for two files: the smaller path is embedded, the other is a dead letter naming it.
    assert errors[f"csv-{csv_keys[1]}"]["path"] == dropped and kept in errors[f"csv-{csv_keys[1]}"]["error"]
    assert "cannot read" in errors["missing"]["error"] and "bad CSV row" in errors[""]["error"]
    assert (summary["embedded"], summary["errors"], summary["model_version"]) == (13, 4, 1)


def test_model_handler_refuses_one_image_not_its_batch(export, photos, reference):
    handler = SavedModelHandler(export[1], batch_size=8)
    assert handler.batch_elements_kwargs() == {"min_batch_size": 8, "max_batch_size": 8}
    model = handler.load_model()
    keys = sorted(photos)[:3]
    batch = [photos[keys[0]], b"GIF89a garbage", photos[keys[1]], photos[keys[2]]]
    results = list(handler.run_inference(batch, model))
    assert isinstance(results[1].inference, ImageRejected) and "images[0]" in results[1].inference
    for result, key in zip([results[0], *results[2:]], keys):
        np.testing.assert_allclose(result.inference, reference[key], atol=1e-5, rtol=0)


def test_bad_options_are_refused_before_running(tmp_path, export, gallery, capsys):
    with pytest.raises(ConfigError, match="--no_such_beam_flag"):
        embed_batch([gallery], export[0], str(tmp_path / "o1"), beam_args=["--no_such_beam_flag=1"])
    with pytest.raises(ConfigError, match="NoSuchRunner"):
        embed_batch([gallery], export[0], str(tmp_path / "o0"), runner="NoSuchRunner")
    with pytest.raises(ConfigError, match="both milvus_uri and milvus_collection"):
        embed_batch([gallery], export[0], str(tmp_path / "o0"), milvus_uri=str(tmp_path / "m.db"))
    with pytest.raises(ConfigError, match="batch_size"):
        embed_batch([gallery], export[0], str(tmp_path / "o2"), batch_size=9)  # over max_batch_size 8
    with pytest.raises(DataError, match="no such file"):
        embed_batch([str(tmp_path / "absent")], export[0], str(tmp_path / "o3"))
    with pytest.raises(DataError, match="no file matches"):
        embed_batch([os.path.join(gallery, "*.nothing")], export[0], str(tmp_path / "o3"))
    assert cli.main(["embed-batch", gallery, "--saved-model", str(tmp_path), "--out", str(tmp_path / "o4")]) == 2
    assert "saved_model.pb" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # other commands still refuse unknown flags
        cli.main(["info", "--no_such_flag=1"])
    assert not [p for p in os.listdir(tmp_path) if p.startswith("o")]
