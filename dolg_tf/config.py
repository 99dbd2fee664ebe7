"""Frozen configuration dataclasses and presets.

Config flows one way: preset -> overrides -> validation -> frozen config.
``ModelConfig``'s fields are exactly the constructor arguments of
:class:`dolg_tf.model.DOLG`, and ``DOLG.get_config()`` returns them.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from dolg_tf.errors import ConfigError

BACKBONES: dict[str, dict[str, Any]] = {
    # keras-hub ResNetBackbone arguments. "bottleneck_block" puts the stride on
    # the 3x3 conv with torch-style explicit padding: the pycls / torchvision
    # "ResNet v1.5" network that the official DOLG weights were trained on.
    "resnet50": {"stackwise_num_filters": [64, 128, 256, 512], "stackwise_num_blocks": [3, 4, 6, 3]},
    "resnet101": {"stackwise_num_filters": [64, 128, 256, 512], "stackwise_num_blocks": [3, 4, 23, 3]},
    # For tests and CPU demos only: one block per stage, narrow stages.
    "resnet_tiny": {"stackwise_num_filters": [64, 32, 32, 32], "stackwise_num_blocks": [1, 1, 1, 1]},
}


class FrozenConfig:
    """JSON and dict helpers shared by the frozen config dataclasses (model, data, train, export).

    ``to_dict`` gives JSON-ready values (tuples as lists); ``from_dict``
    refuses unknown fields by name; ``replace`` returns a validated copy.
    """

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**dict(data))

    @classmethod
    def from_json(cls, text: str):
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any):
        """A copy with ``changes`` applied (validated)."""
        return self.from_dict({**self.to_dict(), **changes})


@dataclasses.dataclass(frozen=True)
class ModelConfig(FrozenConfig):
    """Architecture of a DOLG model.

    Attributes:
        backbone: key of :data:`BACKBONES`.
        feature_dim: channels of the local features and size of ``f_g``
            (1024 in the paper; they must match for the orthogonal fusion).
        embedding_dim: size of the final descriptor (512).
        multi_atrous: whether the local branch starts with MultiAtrous.
        atrous_filters: channels of each MultiAtrous branch (512).
        dilation_rates: MultiAtrous dilation rates (6, 12, 18).
        gem_p: initial GeM exponent (3).
        gem_eps: GeM clamp (1e-6).
        gem_trainable: whether GeM's ``p`` is trained.
        fusion_epsilon: added to ``|f_g|^2`` in the orthogonal projection.
        bn_epsilon: epsilon of the local branch's batch norm (1e-5).
        channel_order: ``"rgb"`` or ``"bgr"`` (the official weights expect BGR).
        pixel_mean: per-channel mean in [0, 1] units, in ``channel_order``.
        pixel_std: per-channel std, in ``channel_order``.
        train_image_size: side of the square crops the model was trained at
            (``None``: not trained by dolg_tf, e.g. a converted checkpoint).
            Only a record: exports default their image size to it.
    """

    backbone: str = "resnet101"
    feature_dim: int = 1024
    embedding_dim: int = 512
    multi_atrous: bool = True
    atrous_filters: int = 512
    dilation_rates: tuple[int, ...] = (6, 12, 18)
    gem_p: float = 3.0
    gem_eps: float = 1e-6
    gem_trainable: bool = True
    fusion_epsilon: float = 1e-6
    bn_epsilon: float = 1e-5
    channel_order: str = "rgb"
    pixel_mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    pixel_std: tuple[float, ...] = (0.229, 0.224, 0.225)
    train_image_size: int | None = None

    def __post_init__(self):
        # Normalise JSON lists back to tuples so configs compare equal after a round trip.
        for name in ("dilation_rates", "pixel_mean", "pixel_std"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{name} must be a sequence, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        self.validate()

    def validate(self) -> None:
        if self.backbone not in BACKBONES:
            raise ConfigError(f"unknown backbone {self.backbone!r}; expected one of {sorted(BACKBONES)}")
        for name in ("feature_dim", "embedding_dim", "atrous_filters"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not self.dilation_rates or any((not isinstance(r, int)) or r < 1 for r in self.dilation_rates):
            raise ConfigError(f"dilation_rates must be positive integers, got {self.dilation_rates!r}")
        if not self.gem_p > 0:
            raise ConfigError(f"gem_p must be positive, got {self.gem_p!r}")
        if not self.gem_eps > 0 or not self.fusion_epsilon > 0 or not self.bn_epsilon > 0:
            raise ConfigError("gem_eps, fusion_epsilon and bn_epsilon must be positive")
        if self.channel_order not in ("rgb", "bgr"):
            raise ConfigError(f"channel_order must be 'rgb' or 'bgr', got {self.channel_order!r}")
        size = self.train_image_size
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 16):
            raise ConfigError(f"train_image_size must be None or an integer >= 16, got {size!r}")
        if len(self.pixel_mean) != 3 or len(self.pixel_std) != 3 or any(s <= 0 for s in self.pixel_std):
            raise ConfigError(
                f"pixel_mean and pixel_std need 3 values (std > 0), got {self.pixel_mean} and {self.pixel_std}"
            )


# The official DOLG preprocessing: OpenCV's BGR order, ImageNet statistics in BGR order.
OFFICIAL_PREPROCESSING = {
    "channel_order": "bgr",
    "pixel_mean": (0.406, 0.456, 0.485),
    "pixel_std": (0.225, 0.224, 0.229),
}

MODEL_PRESETS: dict[str, ModelConfig] = {
    "resnet101": ModelConfig(backbone="resnet101"),
    "resnet50": ModelConfig(backbone="resnet50"),
    "tiny": ModelConfig(
        backbone="resnet_tiny",
        feature_dim=64,
        embedding_dim=128,
        atrous_filters=32,
        dilation_rates=(2, 4, 6),
    ),
}

# The paper's inference scales; the official code also used 0.3535 and 0.5.
PAPER_SCALES: tuple[float, ...] = (0.7071, 1.0, 1.4142)
OFFICIAL_SCALES: tuple[float, ...] = (0.3535, 0.5, 0.7071, 1.0, 1.4142)
# Per-image limits of an export (checked in the graph) and of the client (checked before sending).
DEFAULT_MAX_IMAGE_BYTES: int = 20 * 1024 * 1024
DEFAULT_MAX_IMAGE_PIXELS: int = 40_000_000


def model_config(preset: str = "resnet101", **overrides: Any) -> ModelConfig:
    """Returns the preset's :class:`ModelConfig` with ``overrides`` applied.

    Raises:
        ConfigError: unknown preset or field, or an invalid value.
    """
    if preset not in MODEL_PRESETS:
        raise ConfigError(f"unknown model preset {preset!r}; expected one of {sorted(MODEL_PRESETS)}")
    base = MODEL_PRESETS[preset].to_dict()
    known = set(base)
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"unknown ModelConfig field(s) {unknown}; known fields are {sorted(known)}")
    base.update(overrides)
    return ModelConfig.from_dict(base)
