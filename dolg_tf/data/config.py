"""``DataConfig``: where the training data comes from and how it is augmented."""

from __future__ import annotations

import dataclasses

from dolg_tf.config import FrozenConfig
from dolg_tf.errors import ConfigError

#: Input formats understood by :func:`dolg_tf.data.open_source` ("demo" is the built-in photos).
FORMATS: tuple[str, ...] = ("demo", "gldv2", "csv", "folder", "tfrecord")


@dataclasses.dataclass(frozen=True)
class DataConfig(FrozenConfig):
    """Training data: source, bounds, augmentation and sampling.

    Attributes:
        data: path or URI of the data (``None`` or ``"demo"``: the built-in demo photos).
        data_format: one of :data:`FORMATS`; ``None`` detects it from ``data``.
        image_size: side of the square training crops.
        min_crop_area: smallest crop, as a fraction of the image area (the crop is square,
            so it never exceeds the largest square of the image; 1.0 = no scale jitter).
        flip: random horizontal flips.
        brightness: largest brightness shift, as a fraction of the full range (0: off).
        contrast: contrast factor drawn from ``[1 - contrast, 1 + contrast]`` (0: off).
        saturation: saturation factor drawn from ``[1 - saturation, 1 + saturation]`` (0: off).
        hue: largest hue rotation, as a fraction of the colour circle, at most 0.5 (0: off).
        class_balanced: sample every class equally often (repeat-factor sampling).
        shuffle_buffer: window of the seeded shuffle of TFRecord streams (index-based
            sources are shuffled globally every epoch and ignore it).
        seed: seed of the element order and of every augmentation.
        max_image_bytes: encoded images larger than this are skipped.
        max_image_pixels: images whose header announces more pixels are skipped before
            decoding (decompression bombs).
        max_consecutive_skips: this many unreadable images in a row stop the input
            pipeline with an error instead of spinning forever on broken data.
        min_class_size: classes with fewer images are left out when the source is opened.
        cycle_length: TFRecord shards read in parallel.
        shard_files: with several input pipelines (workers), give each pipeline its own
            TFRecord files (file i to pipeline i mod W) instead of every pipeline reading
            every record and keeping its chunks. W times less I/O, but which images a
            replica sees then depends on the number of workers.
    """

    data: str | None = None
    data_format: str | None = None
    image_size: int = 224
    min_crop_area: float = 0.2
    flip: bool = True
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.02
    class_balanced: bool = False
    shuffle_buffer: int = 4096
    seed: int = 0
    max_image_bytes: int = 32 * 1024 * 1024
    max_image_pixels: int = 50_000_000
    max_consecutive_skips: int = 1000
    min_class_size: int = 1
    cycle_length: int = 8
    shard_files: bool = False

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raises ConfigError naming the first invalid field."""
        if self.data_format is not None and self.data_format not in FORMATS:
            raise ConfigError(f"unknown data_format {self.data_format!r}; expected one of {list(FORMATS)} or None")
        for name in (
            "image_size",
            "shuffle_buffer",
            "max_image_bytes",
            "max_image_pixels",
            "max_consecutive_skips",
            "min_class_size",
            "cycle_length",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.image_size < 8:
            raise ConfigError(f"image_size must be >= 8, got {self.image_size}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed!r}")
        if not 0.0 < self.min_crop_area <= 1.0:
            raise ConfigError(f"min_crop_area must be in (0, 1], got {self.min_crop_area!r}")
        for name in ("brightness", "contrast", "saturation"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {value!r}")
        if not 0.0 <= self.hue <= 0.5:
            raise ConfigError(f"hue must be in [0, 0.5], got {self.hue!r}")
