"""The serving contract of a dolg_tf export, readable without TensorFlow.

An export is ``<base path>/<integer version>/``, a SavedModel with one
MetaGraph tagged ``serve`` and two signatures:

* ``serving_default``: ``images`` DT_STRING ``[-1]`` (encoded JPEG / PNG /
  WebP / GIF (first frame) / BMP bytes) -> ``embedding`` DT_FLOAT ``[-1, D]``.
* ``embed_pixels``: ``pixels`` DT_UINT8 ``[-1, -1, -1, 3]`` -> ``embedding``.

Beside the graph, ``assets.extra/`` holds TF Serving's warm-up file and
``dolg_export.json`` (model config, export config, library versions).

This module names all of that once: signature names, input and output keys,
dtypes (as strings), :class:`ExportConfig` and its profiles, reading
``dolg_export.json`` and finding version directories. It imports nothing that
imports TensorFlow, so ``dolg_tf.client`` and ``dolg serve``'s argument checks
use it without loading the runtime.

Resize policies (:attr:`ExportConfig.resize`):

* ``"aspect"`` (default, the paper's protocol): each image is resized so that
  its longer side is ``image_size``, aspect ratio kept, then run through the
  scale pyramid on its own.
* ``"fixed"``: every image is resized to ``image_size x image_size`` (aspect
  ratio NOT kept) and the batch runs through the network at once: faster on
  accelerators, less faithful. ``benchmarks/export_resize.py`` measures both.
* ``"none"``: no first resize; the scale pyramid runs at the image's own
  resolution, bounded only by ``max_image_pixels`` (the authors' evaluation).

Profiles (:data:`EXPORT_PROFILES`, ``dolg export --profile``) name a set of
these options: ``"default"`` (``"aspect"`` to the image size the model was
trained at, or 512, with the paper's three scales) and ``"official"`` (the
authors' evaluation: no pre-resize and their five scales).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Callable
from typing import IO, Any

from dolg_tf.config import (
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_IMAGE_PIXELS,
    OFFICIAL_SCALES,
    PAPER_SCALES,
    FrozenConfig,
)
from dolg_tf.errors import ConfigError, ExportError

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- signatures

SERVE_TAG = "serve"
DEFAULT_SIGNATURE = "serving_default"  # TF Serving's default signature_name
PIXELS_SIGNATURE = "embed_pixels"
IMAGES_KEY = "images"
PIXELS_KEY = "pixels"
EMBEDDING_KEY = "embedding"
# DataType enum names, as TF Serving's metadata and `saved_model_cli` print them.
IMAGES_DTYPE = "DT_STRING"
PIXELS_DTYPE = "DT_UINT8"
EMBEDDING_DTYPE = "DT_FLOAT"
# TF Serving's reserved signature key of the SavedModel's initializer (never a servable signature).
INIT_OP_SIGNATURE = "__saved_model_init_op"

SIGNATURES: dict[str, dict[str, dict[str, str]]] = {
    DEFAULT_SIGNATURE: {
        "inputs": {IMAGES_KEY: f"{IMAGES_DTYPE} [-1]"},
        "outputs": {EMBEDDING_KEY: f"{EMBEDDING_DTYPE} [-1, D]"},
    },
    PIXELS_SIGNATURE: {
        "inputs": {PIXELS_KEY: f"{PIXELS_DTYPE} [-1, -1, -1, 3]"},
        "outputs": {EMBEDDING_KEY: f"{EMBEDDING_DTYPE} [-1, D]"},
    },
}

# --------------------------------------------------------------------------- files

SAVED_MODEL_FILE = "saved_model.pb"
ASSETS_EXTRA = "assets.extra"
WARMUP_FILE = "tf_serving_warmup_requests"
EXPORT_JSON = "dolg_export.json"
EXPORT_FORMAT = "dolg_tf.export/1"
# dolg_export.json is a few KB; a larger file is refused before it is read.
MAX_EXPORT_JSON_BYTES = 1 << 20
VERSION_NAME = re.compile(r"[0-9]+")


def warmup_path(export_dir: str | os.PathLike) -> str:
    """``<export_dir>/assets.extra/tf_serving_warmup_requests``."""
    return os.path.join(os.fspath(export_dir), ASSETS_EXTRA, WARMUP_FILE)


def is_saved_model_dir(path: str | os.PathLike, isfile: Callable[[str], bool] = os.path.isfile) -> bool:
    """Whether ``path`` holds a ``saved_model.pb`` (a SavedModel, e.g. one version directory).

    ``isfile`` may be another file system's test (``tf.io.gfile.exists`` for ``gs://``).
    """
    return bool(isfile(os.path.join(os.fspath(path), SAVED_MODEL_FILE)))


def complete_versions(
    base_path: str | os.PathLike,
    listdir: Callable[[str], list[str]] = os.listdir,
    isfile: Callable[[str], bool] = os.path.isfile,
) -> list[int]:
    """Complete versions under a model base path, ascending, read the way TF Serving reads them.

    A version is a subdirectory named by an integer (ASCII digits only) that
    holds ``saved_model.pb``; a half-written export (a dot-named temporary
    directory, or one without ``saved_model.pb`` yet) is not a version.
    ``listdir`` and ``isfile`` may be another file system's (``tf.io.gfile``).

    Raises:
        OSError: ``base_path`` cannot be listed (e.g. it does not exist).
    """
    base_path = os.fspath(base_path)
    names = (name.rstrip("/") for name in listdir(base_path))  # gfile marks folders with a slash
    return sorted(
        int(name)
        for name in names
        if VERSION_NAME.fullmatch(name) and is_saved_model_dir(os.path.join(base_path, name), isfile)
    )


def list_versions(base_dir: str | os.PathLike) -> list[int]:
    """Complete integer versions under ``base_dir`` (``saved_model.pb`` present), ascending; [] if it is missing."""
    return complete_versions(base_dir) if os.path.isdir(base_dir) else []


def next_version(base_dir: str | os.PathLike) -> int:
    """One more than the highest integer-named entry under ``base_dir`` (1 if none).

    Incomplete integer directories count as taken too: an export never writes into one.
    """
    base_dir = os.fspath(base_dir)
    taken = [int(n) for n in os.listdir(base_dir) if VERSION_NAME.fullmatch(n)] if os.path.isdir(base_dir) else []
    return max(taken, default=0) + 1


# --------------------------------------------------------------------------- export config

RESIZE_POLICIES = ("aspect", "fixed", "none")


@dataclasses.dataclass(frozen=True)
class ExportConfig(FrozenConfig):
    """How an export preprocesses and bounds its input.

    Attributes:
        image_size: longer side (``"aspect"``) or side (``"fixed"``) the
            image is resized to before the scale pyramid (unused by ``"none"``).
        resize: ``"aspect"``, ``"fixed"`` or ``"none"`` (see the module docstring).
        scales: the inference scales baked into the graph.
        max_image_bytes: largest encoded image accepted.
        max_image_pixels: largest decoded image (height x width) accepted,
            checked from the header before decoding.
        max_batch_size: most images in one request.
        antialias: antialias the first resize when it shrinks an image
            (the scale pyramid itself is plain bilinear, as in the official
            evaluation).
        warmup_batch_sizes: batch sizes of the ``serving_default`` warm-up
            requests (empty: write no warm-up file).
    """

    image_size: int = 512
    resize: str = "aspect"
    scales: tuple[float, ...] = PAPER_SCALES
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_batch_size: int = 32
    antialias: bool = True
    warmup_batch_sizes: tuple[int, ...] = (1,)

    def __post_init__(self):
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))
        object.__setattr__(self, "warmup_batch_sizes", tuple(int(b) for b in self.warmup_batch_sizes))
        if not isinstance(self.image_size, int) or not 16 <= self.image_size <= 4096:
            raise ConfigError(f"image_size must be an int in [16, 4096], got {self.image_size!r}")
        if self.resize not in RESIZE_POLICIES:
            raise ConfigError(f"resize must be one of {RESIZE_POLICIES}, got {self.resize!r}")
        if not self.scales or any(not 0 < s <= 4 for s in self.scales):
            raise ConfigError(f"scales must be a non-empty list of numbers in (0, 4], got {self.scales}")
        for name in ("max_image_bytes", "max_image_pixels", "max_batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if any(not 1 <= b <= self.max_batch_size for b in self.warmup_batch_sizes):
            raise ConfigError(f"warmup_batch_sizes must lie in [1, max_batch_size], got {self.warmup_batch_sizes}")


DEFAULT_IMAGE_SIZE = 512
# At the image's own resolution the largest scale (1.4142) doubles the pixels the
# network sees; 2048 x 2048 keeps one R101 request within a few GB, and covers
# Revisited Oxford / Paris (1024 px on the longer side).
OFFICIAL_MAX_IMAGE_PIXELS = 2048 * 2048
EXPORT_PROFILES: dict[str, dict[str, Any]] = {
    "default": {},
    "official": {"resize": "none", "scales": OFFICIAL_SCALES, "max_image_pixels": OFFICIAL_MAX_IMAGE_PIXELS},
}


def export_config_for(model, profile: str = "default", **options: Any) -> ExportConfig:
    """The :class:`ExportConfig` of a profile for ``model``, with ``options`` over it.

    The image size defaults to the crop size the model was trained at
    (``model.config.train_image_size``), else 512. An explicit ``image_size``
    that differs from the training size is allowed, with a warning.

    Raises:
        ConfigError: an unknown profile or an invalid option.
    """
    if profile not in EXPORT_PROFILES:
        raise ConfigError(f"unknown export profile {profile!r}; expected one of {sorted(EXPORT_PROFILES)}")
    values: dict[str, Any] = {"image_size": DEFAULT_IMAGE_SIZE, **EXPORT_PROFILES[profile]}
    trained = getattr(getattr(model, "config", None), "train_image_size", None)
    if trained:
        values["image_size"] = trained
        asked = options.get("image_size")
        if asked is not None and asked != trained and options.get("resize", values.get("resize")) != "none":
            log.warning(
                "exporting at image size %d, but the model was trained at %d; descriptors and speed will differ "
                "from the training resolution's",
                asked,
                trained,
            )
    values.update({k: v for k, v in options.items() if v is not None})
    return ExportConfig.from_dict(values)


# --------------------------------------------------------------------------- metadata


def read_export_metadata(
    export_dir: str | os.PathLike,
    open_file: Callable[[str, str], IO[bytes]] = open,
    file_errors: tuple[type[Exception], ...] = (),
) -> dict[str, Any]:
    """The ``dolg_export.json`` of an export (version) directory.

    Args:
        export_dir: the version directory.
        open_file: ``open_file(path, "rb")`` opens a file for binary reading;
            the default is the local ``open``. Pass ``tf.io.gfile.GFile`` (with a
            ``gs://`` directory) to read from any file system TensorFlow reads;
            nothing here imports it.
        file_errors: what ``open_file``'s file system raises besides ``OSError``
            (``tf.errors.OpError`` for ``tf.io.gfile``).

    Raises:
        ExportError: the file is missing, over :data:`MAX_EXPORT_JSON_BYTES`,
            not JSON, or not a JSON object.
    """
    where = os.fspath(export_dir)
    try:
        with open_file(os.path.join(where, ASSETS_EXTRA, EXPORT_JSON), "rb") as f:
            data = f.read(MAX_EXPORT_JSON_BYTES + 1)
        if len(data) > MAX_EXPORT_JSON_BYTES:
            raise ValueError(f"over the limit of {MAX_EXPORT_JSON_BYTES} bytes")
        metadata = json.loads(data.decode("utf-8"))
        if not isinstance(metadata, dict):
            raise ValueError(f"a JSON {type(metadata).__name__}, not an object")
    except (OSError, ValueError, *file_errors) as err:
        raise ExportError(f"{where!r} is not a dolg_tf export (no readable {EXPORT_JSON}): {err}") from err
    return metadata
