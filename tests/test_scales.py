"""Every size the graph feeds the model equals the authors' extractor's: Python's ``round`` of a float64 product.

The sizes are observed, not recomputed: a recording model turns the shape of
each input it receives into a histogram of its height and width, so the
embedding the graph returns says which sizes the model saw, scale by scale.
The expected sizes come from Python's own ``round``.
"""

import io
import math
from collections import Counter

import keras
import numpy as np
import pytest
import tensorflow as tf

from dolg_tf.config import OFFICIAL_SCALES, PAPER_SCALES
from dolg_tf.export import export_saved_model
from dolg_tf.model import multiscale_embed

MAX_SIDE = 4096
SCALES = tuple(sorted(set(OFFICIAL_SCALES) | set(PAPER_SCALES)))
BINS = int(math.ceil(MAX_SIDE * max(SCALES))) + 2


def python_size(side: int, scale: float) -> int:
    """The authors' rule, in plain Python (a side that rounds to 0 is 1: OpenCV cannot make an empty image)."""
    return max(1, int(round(float(side) * scale)))


class SizeHistogram(keras.layers.Layer):
    """(B, H, W, 3) -> one-hot(H) ++ one-hot(W), the same row for every image."""

    def call(self, images):
        shape = tf.shape(images)
        row = tf.concat([tf.one_hot(shape[1], BINS), tf.one_hot(shape[2], BINS)], axis=0)
        return tf.tile(row[None], [shape[0], 1])

    def compute_output_shape(self, input_shape):
        return (input_shape[0], 2 * BINS)


def recording_model() -> keras.Model:
    images = keras.Input((None, None, 3))
    return keras.Model(images, SizeHistogram()(images))


def seen_sizes(embedding: np.ndarray, n_scales: int) -> tuple[Counter, Counter]:
    """The multisets of heights and widths the model saw, read back from the averaged one-hot rows.

    Each scale adds one unit vector with equal entries at its H and W bins, so
    within each half the entries are proportional to how many scales saw that size.
    """
    out = []
    for half in (embedding[:BINS], embedding[BINS:]):
        counts = half / half.sum() * n_scales
        np.testing.assert_allclose(counts, np.round(counts), atol=1e-3)
        rounded = np.round(counts).astype(int)
        out.append(Counter({int(i): int(rounded[i]) for i in np.flatnonzero(rounded)}))
    return out[0], out[1]


def expected(side_h: int, side_w: int, scales) -> tuple[Counter, Counter]:
    return Counter(python_size(side_h, s) for s in scales), Counter(python_size(side_w, s) for s in scales)


def test_python_rounding_is_half_to_even():
    # The ties that made the difference: every odd side at scale 0.5 lands on .5.
    assert python_size(149, 0.5) == 74 and python_size(151, 0.5) == 76 and python_size(97, 0.5) == 48


CHUNK = 512


def png(height: int, width: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def official_export(tmp_path_factory):
    """The official profile's export (no pre-resize) around the recording model; one call embeds CHUNK images."""
    base = tmp_path_factory.mktemp("sizes") / "m"
    path = export_saved_model(recording_model(), base, profile="official", max_batch_size=CHUNK, warmup_batch_sizes=())
    return tf.saved_model.load(path).signatures["serving_default"]


def run_chunks(signature, shapes):
    """Embeds a blank PNG of every (height, width) through serving_default, CHUNK at a time."""
    for i in range(0, len(shapes), CHUNK):
        batch = shapes[i : i + CHUNK]
        out = signature(images=tf.constant([png(h, w) for h, w in batch]))["embedding"].numpy()
        yield from zip(batch, out)


@pytest.mark.integration
@pytest.mark.parametrize("axis", ["height", "width"])
def test_export_feeds_the_model_the_authors_sizes(official_export, axis):
    """Every side 1..4096, every official and paper scale, through the exported serving_default signature."""
    sides = range(1, MAX_SIDE + 1)
    shapes = [(side, 1) if axis == "height" else (1, side) for side in sides]
    wrong = [
        (shape, got)
        for shape, emb in run_chunks(official_export, shapes)
        if (got := seen_sizes(emb, len(SCALES))) != expected(*shape, SCALES)
    ]
    assert not wrong, f"{len(wrong)} sides differ, first: {wrong[:3]}"


def test_multiscale_embed_feeds_the_model_the_authors_sizes():
    """The same through multiscale_embed in a graph (the scales include every paper scale)."""
    model = recording_model()

    @tf.function(autograph=False)
    def embed(sides, transpose):
        def one(side):
            shape = tf.where(transpose, tf.stack([1, 1, side, 3]), tf.stack([1, side, 1, 3]))
            return multiscale_embed(model, tf.zeros(shape), SCALES)[0]

        return tf.map_fn(one, sides, fn_output_signature=tf.TensorSpec([2 * BINS], tf.float32))

    wrong = []
    for transpose in (False, True):
        for start in range(1, MAX_SIDE + 1, CHUNK):
            sides = np.arange(start, min(start + CHUNK, MAX_SIDE + 1), dtype=np.int32)
            for side, emb in zip(sides, embed(tf.constant(sides), tf.constant(transpose)).numpy()):
                shape = (1, int(side)) if transpose else (int(side), 1)
                if (got := seen_sizes(emb, len(SCALES))) != expected(*shape, SCALES):
                    wrong.append((shape, got))
    assert not wrong, f"{len(wrong)} shapes differ, first: {wrong[:3]}"


@pytest.mark.integration
def test_aspect_pre_resize_uses_the_same_rounding(tmp_path):
    """The first resize of the default profile: each side times image_size / longer side, rounded the same way."""
    image_size, longer = 97, 600
    path = export_saved_model(
        recording_model(),
        tmp_path / "m",
        image_size=image_size,
        scales=(1.0,),
        max_batch_size=CHUNK,
        warmup_batch_sizes=(),
    )
    signature = tf.saved_model.load(path).signatures["serving_default"]
    ratio = image_size / longer
    shapes = [(side, longer) for side in range(1, longer + 1)]
    wrong = [
        shape
        for shape, emb in run_chunks(signature, shapes)
        if seen_sizes(emb, 1) != (Counter([python_size(shape[0], ratio)]), Counter([python_size(longer, ratio)]))
    ]
    assert not wrong, f"pre-resize sizes differ for {wrong[:10]}"
