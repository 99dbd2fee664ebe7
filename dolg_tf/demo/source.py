"""The built-in demo photos as a training source: what ``dolg_tf.data.open_source(None)`` opens."""

from __future__ import annotations

import io

import numpy as np
import tensorflow as tf
from PIL import Image

from dolg_tf.data.base import IndexedSource
from dolg_tf.demo.photos import demo_photos


class DemoSource(IndexedSource):
    """The built-in photos (:func:`dolg_tf.demo.photos.demo_photos`), one instance class each, held in memory.

    ``dolg_tf.data.open_source(None)`` opens it.
    """

    kind = "demo"

    def __init__(self):
        photos = demo_photos()
        names = list(photos)
        # Label i is photo i in demo_photos() order, like dolg_tf.demo.photos.demo_views; the
        # label map keeps that order (names are not sorted).
        self._photos = [photos[n] for n in names]
        super().__init__(None, names, [str(i) for i in range(len(names))], "demo")
        self.label_map = {name: i for i, name in enumerate(names)}
        self.description = f"demo: {len(names)} photos (instance retrieval under synthetic views)"
        # One flat uint8 buffer + offsets: the photos differ in size, and a flat constant
        # avoids a py_function (and the GIL) in the input pipeline.
        sizes = np.asarray([p.size for p in self._photos], np.int64)
        self._flat = np.concatenate([p.reshape(-1) for p in self._photos])
        self._offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self._sizes = sizes
        self._shapes = np.asarray([p.shape for p in self._photos], np.int64)

    @property
    def photos(self) -> list[np.ndarray]:
        return list(self._photos)

    encoded = False  # trusted photos, decoded once and held in memory

    def key(self, handle):
        return tf.gather(self._tensor("keys", self._keys), handle)

    def load(self, handle):
        start = tf.gather(self._tensor("offsets", self._offsets), handle)
        size = tf.gather(self._tensor("sizes", self._sizes), handle)
        pixels = tf.slice(self._tensor("flat", self._flat), [start], [size])
        image = tf.reshape(pixels, tf.gather(self._tensor("shapes", self._shapes), handle))
        image.set_shape([None, None, 3])
        key = tf.gather(self._tensor("keys", self._keys), handle)
        label = tf.cast(tf.gather(self._tensor("labels", self._labels), handle), tf.int32)
        return image, label, key

    def iter_encoded(self, max_bytes):
        for i, (key, photo, label) in enumerate(zip(self._keys, self._photos, self._labels)):
            buffer = io.BytesIO()
            Image.fromarray(photo).save(buffer, "PNG")  # lossless: the records decode to the same pixels
            yield i, key, buffer.getvalue(), int(label)
