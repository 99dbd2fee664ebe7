"""Training data: formats, label maps, skipped images, determinism, sampling, TFRecords, CLI."""

import io
import json
import os
import struct

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from dolg_tf import cli, data
from dolg_tf.data.images import OK, TOO_MANY_PIXELS, check_encoded, encoded_dims, image_format, read_header
from dolg_tf.errors import ConfigError, DataError

# Three classes whose numeric order (7 < 12 < 30) differs from their string order.
CLASSES = {"7": 2, "12": 3, "30": 1}


def _photo(i: int) -> np.ndarray:
    """A small smooth image, different for every i (and not square)."""
    h, w = 24 + 3 * i, 32 + 2 * i
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.stack([(xx * (5 + i)) % 256, (yy * (7 + 2 * i)) % 256, np.full_like(xx, 40 * i % 256)], -1)
    return image.astype(np.uint8)


def _encode(image: np.ndarray, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, fmt)
    return buffer.getvalue()


def _write(path, payload: bytes) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(payload)
    return str(path)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """The same JPEGs as an image folder, a path,label CSV and a GLDv2 tree."""
    root = tmp_path_factory.mktemp("layouts")
    rows, gld_rows, i = [], [], 0
    for label, n in CLASSES.items():
        for _ in range(n):
            payload = _encode(_photo(i))
            name = f"img{i:02d}.jpg"
            _write(root / "folder" / label / name, payload)
            rows.append((f"images/{label}_{name}", label))
            _write(root / "csv" / "images" / f"{label}_{name}", payload)
            gid = f"{i:02x}c{i:013x}"  # GLDv2 ids are 16 hex digits
            _write(root / "gld" / "train" / gid[0] / gid[1] / gid[2] / f"{gid}.jpg", payload)
            gld_rows.append((gid, label))
            i += 1
    # Rows in folder order (class folders sorted as strings, files sorted): same element order.
    order = sorted(range(len(rows)), key=lambda k: (rows[k][1], rows[k][0]))
    with open(root / "csv" / "data.csv", "w") as f:
        f.write("path,label\n" + "".join(f"{rows[k][0]},{rows[k][1]}\n" for k in order))
    with open(root / "gld" / "train.csv", "w") as f:
        f.write("id,url,landmark_id\n" + "".join(f"{gld_rows[k][0]},http://x,{gld_rows[k][1]}\n" for k in order))
    data.write_tfrecords(data.open_source(str(root / "folder")), str(root / "records"), num_shards=2, progress=False)
    return root


def _elements(source, **kwargs):
    """All (label, image) of one epoch at batch 1."""
    kwargs = {"batch_size": 1, "image_size": 16, "repeat": False, **kwargs}
    return [(int(y[0]), x[0].numpy()) for x, y in data.train_dataset(source, **kwargs)]


def test_every_format_yields_the_same_examples(layouts):
    paths = {"folder": "folder", "csv": "csv/data.csv", "gldv2": "gld", "tfrecord": "records"}
    sources = {kind: data.open_source(str(layouts / p)) for kind, p in paths.items()}
    for kind, source in sources.items():
        assert source.kind == kind  # auto-detected
        assert source.label_map == {"7": 0, "12": 1, "30": 2}
        assert source.class_counts.tolist() == [2, 3, 1] and source.num_examples == 6
    reference = sorted((y, x.tobytes()) for y, x in _elements(sources["folder"], augment=False))
    assert len({x for _, x in reference}) == 6  # six different images
    for kind, source in sources.items():
        assert sorted((y, x.tobytes()) for y, x in _elements(source, augment=False)) == reference, kind
    # Same example order -> identical augmented, shuffled streams (seeded by position).
    streams = [_elements(sources[k], augment=True, seed=3) for k in ("folder", "csv", "gldv2")]
    for other in streams[1:]:
        assert [y for y, _ in other] == [y for y, _ in streams[0]]
        assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(other, streams[0]))


def test_label_map_is_remapped_and_saved(layouts, tmp_path):
    source = data.open_source(str(layouts / "folder"))
    labels = sorted({y for y, _ in _elements(source, augment=False)})
    assert labels == [0, 1, 2]
    source.save_label_map(str(tmp_path / "sub" / "label_map.json"))
    saved = json.loads((tmp_path / "sub" / "label_map.json").read_text())
    assert saved["label_map"] == {"7": 0, "12": 1, "30": 2} and saved["class_counts"] == [2, 3, 1]
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["label_map.json"]  # no temp file left
    # Non-numeric labels sort as strings; classes under min_class_size are left out.
    csv_path = tmp_path / "x.csv"
    img = _write(tmp_path / "a.jpg", _encode(_photo(0)))
    csv_path.write_text(f"path,label\n{img},zebra\n{img},ant\n{img},ant\n{img},Bee\n")
    assert data.open_source(str(csv_path)).label_map == {"Bee": 0, "ant": 1, "zebra": 2}
    assert data.open_source(str(csv_path), min_class_size=2).label_map == {"ant": 0}


def test_unreadable_images_are_skipped_and_counted(tmp_path, caplog):
    good = [_write(tmp_path / "ok" / f"g{i}.jpg", _encode(_photo(i))) for i in range(3)]
    jpeg = _encode(_photo(5))
    bomb = bytearray(_encode(_photo(1), "PNG"))
    bomb[16:24] = struct.pack(">II", 100_000, 100_000)  # the header announces 10^10 pixels
    bad = {
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "text.jpg": b"this is not an image\n",
        "empty.jpg": b"",
        "bomb.png": bytes(bomb),
    }
    paths = good + [_write(tmp_path / "bad" / name, payload) for name, payload in bad.items()]
    paths.append(str(tmp_path / "missing.jpg"))
    csv_path = tmp_path / "data.csv"
    csv_path.write_text("path,label\n" + "".join(f"{p},a\n" for p in paths))
    source = data.open_source(str(csv_path))
    assert source.num_examples == 8
    with caplog.at_level("WARNING", logger="dolg_tf.data"):
        out = _elements(source, augment=True, shuffle=False)
    assert len(out) == 3
    assert data.skipped_images(source) == 5
    assert data.skipped_images() >= 5  # every source of the process
    reasons = source.skipped.by_reason()
    assert reasons["read or decode error (missing, truncated or corrupt)"] == 2  # truncated + missing
    assert reasons["not a JPEG/PNG/GIF/BMP/WebP image"] == 1
    assert reasons["empty file"] == 1
    assert reasons["header announces more than max_image_pixels"] == 1
    for name in ("bomb.png", "truncated.jpg", "missing.jpg", "text.jpg", "empty.jpg"):
        assert name in caplog.text  # every skip is logged by name, decode errors too
    assert "5 images skipped" in source.skipped.summary()
    # The same files through TFRecords: still skipped and counted.
    data.write_tfrecords(source, str(tmp_path / "rec"), num_shards=2, progress=False)
    records = data.open_source(str(tmp_path / "rec"))
    assert records.num_examples == 7  # the missing file cannot be written
    assert len(_elements(records, augment=False)) == 3 and data.skipped_images(records) == 4


def test_iterators_of_one_dataset_keep_separate_books(tmp_path):
    for i in range(5):
        _write(tmp_path / "a" / f"{i}.jpg", _encode(_photo(i)))
    _write(tmp_path / "a" / "cut.jpg", _encode(_photo(9))[:200])
    source = data.open_source(str(tmp_path))
    ds = data.train_dataset(source, batch_size=1, image_size=16, repeat=False, shuffle=False, augment=False)
    first, second = iter(ds), iter(ds)
    a = [next(first)[1].numpy() for _ in range(2)]  # interleave the two iterators
    b = [y.numpy() for _, y in second]
    a += [y.numpy() for _, y in first]
    assert len(a) == len(b) == 5 and all(np.array_equal(x, y) for x, y in zip(a, b))
    assert source.skipped.by_reason() == {"read or decode error (missing, truncated or corrupt)": 2}


@pytest.mark.parametrize("payload", [b"junk", b"\xff\xd8\xff\xe0 truncated JPEG"])
def test_endless_skipping_stops_with_an_error(tmp_path, payload):
    # Junk is rejected by its header; a truncated JPEG makes the decoder raise, so nothing
    # reaches the counter and only the watchdog can stop the loop.
    for i in range(4):
        _write(tmp_path / "c" / f"{i}.jpg", payload)
    source = data.open_source(str(tmp_path))
    ds = data.train_dataset(source, batch_size=2, image_size=16, config=data.DataConfig(max_consecutive_skips=10))
    with pytest.raises(tf.errors.InvalidArgumentError, match="10 images in a row"):
        next(iter(ds))


@pytest.mark.parametrize(
    "fmt,kwargs", [("JPEG", {}), ("PNG", {}), ("GIF", {}), ("BMP", {}), ("WEBP", {}), ("WEBP", {"lossless": True})]
)
def test_header_dimensions_match_the_decoded_image(fmt, kwargs):
    image = _photo(4)  # 36 x 40
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, fmt, **kwargs)
    payload = tf.constant(buffer.getvalue())
    head, b = read_header(payload)
    height, width = encoded_dims(payload, head, b, image_format(head))
    assert (int(height), int(width)) == image.shape[:2]
    status, decoded = data.images.check_and_decode(payload, 10**6, 10**6)
    assert int(status) == OK and decoded.shape == image.shape


def test_jpeg_bomb_is_rejected_from_its_header():
    payload = bytearray(_encode(_photo(2)))
    sof = payload.index(b"\xff\xc0")  # baseline frame header: length, precision, height, width
    payload[sof + 5 : sof + 9] = struct.pack(">HH", 60000, 60000)
    status, _, height, width = check_encoded(tf.constant(bytes(payload)), 10**6, 50_000_000)
    assert int(status) == TOO_MANY_PIXELS and (int(height), int(width)) == (60000, 60000)


def test_grey_alpha_16bit_and_animated_images_become_rgb(tmp_path):
    grey = _photo(3)[..., 0]
    frames = [Image.fromarray(_photo(3)), Image.fromarray(255 - _photo(3))]
    files = {
        "grey.jpg": _encode(grey),
        "rgba.png": _encode(np.dstack([_photo(3), np.full(_photo(3).shape[:2], 128, np.uint8)]), "PNG"),
        "deep.png": _encode(grey.astype(np.uint16) * 257, "PNG"),
    }
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    files["anim.gif"] = buffer.getvalue()
    for name, payload in files.items():
        _write(tmp_path / name.split(".")[0] / name, payload)
    source = data.open_source(str(tmp_path))
    out = dict((source.class_names[y], x) for y, x in _elements(source, augment=False, image_size=24))
    assert set(out) == {"grey", "rgba", "deep", "anim"} and data.skipped_images(source) == 0
    for name in ("grey", "deep"):  # one channel copied into three
        channels = out[name]
        assert np.array_equal(channels[..., 0], channels[..., 1]) and np.array_equal(channels[..., 0], channels[..., 2])
    assert not np.array_equal(out["rgba"][..., 0], out["rgba"][..., 2])  # colour kept, alpha dropped


def test_bad_data_raises_before_training(tmp_path):
    # The library speaks of its arguments; the command line names its flags (test_inspect_cli_...).
    with pytest.raises(DataError, match=r"^data path '.*nowhere' does not exist$"):
        data.open_source(str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="unknown data format"):
        data.open_source(str(tmp_path), "parquet")
    cases = {
        "empty.csv": ("", "empty"),
        "header.csv": ("path,label\n", "no rows"),
        "columns.csv": ("file,class\na.jpg,1\n", r"columns \['file', 'class'\]; expected path,label"),
        "blank.csv": ("path,label\na.jpg,\n", "line 2: empty"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=message):
            data.open_source(str(tmp_path / name))
    (tmp_path / "wrong_root.csv").write_text("path,label\nnope/a.jpg,1\nnope/b.jpg,2\n")
    with pytest.raises(DataError, match="none of 2 sampled images exist"):
        data.open_source(str(tmp_path / "wrong_root.csv"))
    (tmp_path / "gld").mkdir()
    (tmp_path / "gld" / "train.csv").write_text("id,landmark_id\n../etc,1\n")
    with pytest.raises(DataError, match="not a GLDv2 id"):
        data.open_source(str(tmp_path / "gld"))
    (tmp_path / "gld" / "train.csv").write_text("id,landmark\nabc,1\n")
    with pytest.raises(DataError, match="expected id,landmark_id"):
        data.open_source(str(tmp_path / "gld"), "gldv2")
    (tmp_path / "noimages" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="no class sub-folders with images"):
        data.open_source(str(tmp_path / "noimages"))
    (tmp_path / "bad.tfrecord").write_bytes(b"not a record")
    with pytest.raises(DataError, match="cannot read TFRecord"):
        data.open_source(str(tmp_path / "bad.tfrecord"))
    with pytest.raises(DataError, match="data_format='csv' needs a data path"):
        data.open_source(None, "csv")
    with pytest.raises(DataError, match="fewer images than one batch"):
        data.train_dataset(data.open_source(), batch_size=64, image_size=16, repeat=False)
    with pytest.raises(ConfigError, match="batch_size"):
        data.train_dataset(data.open_source(), batch_size=0, image_size=16)


def _batches(ds, n):
    return [(x.numpy(), y.numpy()) for x, y in ds.take(n)]


def test_order_and_augmentation_are_pure_functions_of_seed_and_position():
    source = data.open_source()

    def make(**overrides):
        return data.train_dataset(source, **{"batch_size": 8, "image_size": 32, "seed": 5, **overrides})

    big = _batches(make(), 3)  # 24 elements: crosses the 19-photo epoch boundary
    again = _batches(make(), 3)
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(big, again))
    other = _batches(make(seed=6), 1)
    assert not np.array_equal(other[0][0], big[0][0])
    # Batch 4 twice == batch 8 once: one pipeline feeding two replicas sees what one replica sees.
    half = _batches(make(batch_size=4), 6)
    assert np.array_equal(np.concatenate([x for x, _ in half]), np.concatenate([x for x, _ in big]))
    assert np.array_equal(np.concatenate([y for _, y in half]), np.concatenate([y for _, y in big]))
    # Two input pipelines (two workers, one replica each): pipeline k gets the k-th half of every global batch.
    for k in range(2):
        ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=k, num_replicas_in_sync=2)
        shard = _batches(make(batch_size=4, input_context=ctx), 3)
        for (x, y), (bx, by) in zip(shard, big):
            assert np.array_equal(x, bx[4 * k : 4 * k + 4]) and np.array_equal(y, by[4 * k : 4 * k + 4])
    # Resuming at batch 2 skips handles, not decoded images, and lands on the same elements.
    resumed = _batches(make(start_batch=2), 1)
    assert np.array_equal(resumed[0][0], big[2][0]) and np.array_equal(resumed[0][1], big[2][1])
    ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=1, num_replicas_in_sync=2)
    resumed = _batches(make(batch_size=4, input_context=ctx, start_batch=2), 1)
    assert np.array_equal(resumed[0][0], big[2][0][4:])
    # Every epoch visits every photo once (without class balancing).
    labels = np.concatenate([y for _, y in _batches(make(batch_size=19, image_size=8), 2)])
    assert sorted(labels[:19]) == list(range(19)) and sorted(labels[19:]) == list(range(19))
    assert not np.array_equal(labels[:19], labels[19:])  # each epoch has its own order


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory):
    root = tmp_path_factory.mktemp("imbalanced")
    for label, n in {"a": 1, "b": 2, "c": 9}.items():
        for i in range(n):
            _write(root / "folder" / label / f"{i}.png", _encode(_photo(i)[:8, :8], "PNG"))
    data.write_tfrecords(data.open_source(str(root / "folder")), str(root / "records"), num_shards=3, progress=False)
    return root


@pytest.mark.parametrize("layout", ["folder", "records"])
def test_class_balanced_sampling_balances(imbalanced, layout):
    source = data.open_source(str(imbalanced / layout))
    assert source.class_counts.tolist() == [1, 2, 9]
    config = data.DataConfig(shuffle_buffer=16)

    def frequencies(balanced):
        ds = data.train_dataset(
            source, batch_size=12, image_size=8, augment=False, class_balanced=balanced, config=config
        )
        labels = np.concatenate([y for _, y in _batches(ds, 60)])
        return np.bincount(labels, minlength=3) / len(labels)

    np.testing.assert_allclose(frequencies(False), [1 / 12, 2 / 12, 9 / 12], atol=0.02)
    # Batch 6 twice == batch 12 once, here too (TFRecords: windowed stateless shuffle).
    whole = _batches(data.train_dataset(source, batch_size=12, image_size=8, seed=1, config=config), 2)
    halves = _batches(data.train_dataset(source, batch_size=6, image_size=8, seed=1, config=config), 4)
    assert np.array_equal(np.concatenate([x for x, _ in halves]), np.concatenate([x for x, _ in whole]))
    np.testing.assert_allclose(frequencies(True), [1 / 3, 1 / 3, 1 / 3], atol=0.06)


def test_shard_files_splits_tfrecords_between_pipelines(imbalanced):
    source = data.open_source(str(imbalanced / "records"), shard_files=True)
    everything = sorted((y, x.tobytes()) for y, x in _elements(source, augment=False))
    parts = []
    for k in range(2):
        ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=k, num_replicas_in_sync=2)
        parts.append(sorted((y, x.tobytes()) for y, x in _elements(source, augment=False, input_context=ctx)))
    assert len(parts[0]) == 8 and len(parts[1]) == 4  # shards 0 and 2 vs shard 1 (4 records each)
    assert sorted(parts[0] + parts[1]) == everything
    with pytest.raises(DataError, match="shard_files applies to TFRecord"):
        ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=0, num_replicas_in_sync=2)
        folder = data.open_source(str(imbalanced / "folder"), shard_files=True)
        data.train_dataset(folder, batch_size=2, image_size=8, input_context=ctx)


def test_foreign_tfrecords_are_scanned_and_remapped(tmp_path):
    with tf.io.TFRecordWriter(str(tmp_path / "x.tfrecord")) as writer:
        for i, label in enumerate([905, 12, 905]):
            writer.write(data.make_example(_encode(_photo(i)), label))
    source = data.open_source(str(tmp_path / "x.tfrecord"))
    assert source.label_map == {"12": 0, "905": 1} and source.class_counts.tolist() == [1, 2]
    assert sorted(y for y, _ in _elements(source, augment=False)) == [0, 1, 1]


def test_to_tfrecord_cli_writes_readable_shards(layouts, tmp_path, capsys):
    out = tmp_path / "shards"
    assert (
        cli.main(["data", "to-tfrecord", "--data", str(layouts / "gld"), "--out", str(out), "--shards", "4", "--quiet"])
        == 0
    )
    report = json.loads(capsys.readouterr().out.splitlines()[0])
    assert report["shards"] == 4 and report["num_examples"] == 6 and report["skipped"] == 0
    meta = json.loads((out / "dolg_data.json").read_text())
    shards = [f"train-0000{i}-of-00004.tfrecord" for i in range(4)]
    assert sorted(p.name for p in out.iterdir()) == ["dolg_data.json"] + shards
    assert sum(s["num_examples"] for s in meta["shards"]) == 6 and meta["label_map"] == {"7": 0, "12": 1, "30": 2}
    records = data.open_source(str(out))
    keys = {
        tf.train.Example.FromString(r.numpy()).features.feature["image/key"].bytes_list.value[0]
        for r in tf.data.TFRecordDataset(records.files)
    }
    assert len(keys) == 6 and all(len(k) == 16 for k in keys)  # the GLDv2 ids
    reference = sorted((y, x.tobytes()) for y, x in _elements(data.open_source(str(layouts / "gld")), augment=False))
    assert sorted((y, x.tobytes()) for y, x in _elements(records, augment=False)) == reference
    # An existing export is not overwritten by accident.
    assert cli.main(["data", "to-tfrecord", "--data", str(layouts / "gld"), "--out", str(out), "--quiet"]) == 2
    assert "already holds TFRecords" in (err := capsys.readouterr().err) and "pass --overwrite" in err
    with pytest.raises(DataError, match="pass overwrite=True"):
        data.write_tfrecords(data.open_source(str(layouts / "gld")), str(out), progress=False)


def test_inspect_cli_reports_statistics_and_bad_paths(layouts, tmp_path, capsys):
    assert cli.main(["data", "inspect", "--data", str(layouts / "csv" / "data.csv"), "--decode", "10", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "csv" and report["num_classes"] == 3
    assert report["images_per_class"] == {"min": 1, "median": 2.0, "max": 3}
    assert report["decode"]["decoded"] == 6 and report["decode"]["skipped"] == 0
    # Without --json: the same JSON line first, then the human-readable lines.
    assert cli.main(["data", "inspect", "--data", str(layouts / "csv" / "data.csv")]) == 0
    first, *rest = capsys.readouterr().out.splitlines()
    assert json.loads(first)["num_examples"] == 6 and rest and rest[-1].startswith("images per class: min 1")
    assert cli.main(["data", "inspect", "--data", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["data", "inspect", "--data-format", "csv"]) == 2
    assert "--data-format csv needs --data PATH" in capsys.readouterr().err
    assert cli.main(["data", "to-tfrecord", "--out", str(tmp_path / "o"), "--shards", "0"]) == 2
    assert "--shards must be a positive integer" in capsys.readouterr().err


def test_open_source_keeps_the_resolved_data_config(layouts):
    source = data.open_source(str(layouts / "folder"), min_crop_area=0.5, hue=0.0)
    assert source.config.min_crop_area == 0.5 and source.config.hue == 0.0
    assert source.config.data == str(layouts / "folder") and source.config.data_format == "folder"
    assert data.open_source().config.data_format == "demo"
    with pytest.raises(ConfigError, match="unknown DataConfig field"):
        data.open_source(None, crop=0.5)
    with pytest.raises(ConfigError, match="min_crop_area"):
        data.open_source(None, min_crop_area=2.0)


def test_data_config_round_trip_and_validation():
    config = data.DataConfig(data="/x", data_format="csv", image_size=64, class_balanced=True, hue=0.1)
    assert data.DataConfig.from_json(config.to_json()) == config
    assert config.replace(seed=3).seed == 3
    with pytest.raises(ConfigError, match="unknown DataConfig field"):
        data.DataConfig.from_dict({"imagesize": 3})
    with pytest.raises(ConfigError, match="min_crop_area"):
        data.DataConfig(min_crop_area=0)
    with pytest.raises(ConfigError, match="data_format"):
        data.DataConfig(data_format="zip")
