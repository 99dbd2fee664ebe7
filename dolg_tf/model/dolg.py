"""The DOLG model: ResNet taps, local branch, GeM global branch, orthogonal fusion."""

from __future__ import annotations

import os
from typing import Any

import keras

from dolg_tf.config import ModelConfig, model_config
from dolg_tf.errors import WeightsError
from dolg_tf.export.contract import complete_versions, is_saved_model_dir
from dolg_tf.layers import GeM, ImageNormalization, L2Normalize, LocalBranch, OrthogonalFusion
from dolg_tf.model.backbone import build_backbone, copy_backbone_weights, feature_taps, load_backbone_preset


@keras.saving.register_keras_serializable(package="dolg_tf")
class DOLG(keras.Model):
    """DOLG: deep orthogonal fusion of local and global features.

    A functional model. Input: float32 RGB pixels in [0, 255] of shape
    ``(batch, height, width, 3)``, any height and width (>= 32 recommended),
    normalised inside the model. Output: the L2-normalised descriptor
    ``(batch, embedding_dim)`` in float32.

    Graph: normalise -> ResNet (res4, res5) -> local branch on res4
    (MultiAtrous + attention) and GeM + Dense (``f_g``) on res5 ->
    orthogonal fusion ``[f_g, pooled orthogonal local]`` -> Dense ->
    L2-normalise.

    The constructor arguments are the fields of :class:`dolg_tf.config.ModelConfig`
    plus ``name`` and ``dtype``; :meth:`get_config` returns them.

    Args:
        dtype: the dtype policy of every layer (``"float32"``, ``"mixed_float16"``,
            ``"mixed_bfloat16"`` or a ``keras.DTypePolicy``), as keras-hub backbones
            take it; ``None`` uses Keras' global policy at construction. The input
            stays float32, and the L2-normalised output is float32 under every
            policy. Keras' global policy is never changed.

    Example:

    ```python
    model = DOLG(backbone="resnet_tiny", feature_dim=64, embedding_dim=128, atrous_filters=32,
                 dilation_rates=(2, 4, 6), dtype="mixed_float16")
    model.compute_dtype  # "float16"; keras.config.dtype_policy() is unchanged
    ```

    Reference:
        Yang et al., "DOLG: Single-Stage Image Retrieval with Deep Orthogonal
        Fusion of Local and Global Features", ICCV 2021.
    """

    def __init__(
        self,
        backbone: str = "resnet101",
        feature_dim: int = 1024,
        embedding_dim: int = 512,
        multi_atrous: bool = True,
        atrous_filters: int = 512,
        dilation_rates=(6, 12, 18),
        gem_p: float = 3.0,
        gem_eps: float = 1e-6,
        gem_trainable: bool = True,
        fusion_epsilon: float = 1e-6,
        bn_epsilon: float = 1e-5,
        channel_order: str = "rgb",
        pixel_mean=(0.485, 0.456, 0.406),
        pixel_std=(0.229, 0.224, 0.225),
        train_image_size: int | None = None,
        name: str = "dolg",
        dtype=None,
        **kwargs,
    ):
        config = ModelConfig(
            backbone=backbone,
            feature_dim=feature_dim,
            embedding_dim=embedding_dim,
            multi_atrous=multi_atrous,
            atrous_filters=atrous_filters,
            dilation_rates=tuple(dilation_rates),
            gem_p=gem_p,
            gem_eps=gem_eps,
            gem_trainable=gem_trainable,
            fusion_epsilon=fusion_epsilon,
            bn_epsilon=bn_epsilon,
            channel_order=channel_order,
            pixel_mean=tuple(pixel_mean),
            pixel_std=tuple(pixel_std),
            train_image_size=train_image_size,
        )
        # Resolved here, once, and handed to every layer: the global policy is read, never set.
        policy = keras.dtype_policies.get(dtype) if dtype is not None else keras.config.dtype_policy()
        images = keras.Input(shape=(None, None, 3), dtype="float32", name="images")
        x = ImageNormalization(
            config.pixel_mean, config.pixel_std, config.channel_order, name="normalize", dtype=policy
        )(images)
        res4, res5 = feature_taps(build_backbone(config.backbone, dtype=policy), name="backbone")(x)
        local, attention = LocalBranch(
            filters=config.feature_dim,
            multi_atrous=config.multi_atrous,
            atrous_filters=config.atrous_filters,
            dilation_rates=config.dilation_rates,
            bn_epsilon=config.bn_epsilon,
            return_attention=True,
            name="local_branch",
            dtype=policy,
        )(res4)
        pooled = GeM(p=config.gem_p, eps=config.gem_eps, trainable_p=config.gem_trainable, name="gem", dtype=policy)(
            res5
        )
        global_features = keras.layers.Dense(config.feature_dim, name="global_fc", dtype=policy)(pooled)
        fused = OrthogonalFusion(epsilon=config.fusion_epsilon, name="fusion", dtype=policy)([local, global_features])
        descriptor = keras.layers.Dense(config.embedding_dim, name="embedding_fc", dtype=policy)(fused)
        # float32 whatever the policy: the descriptor is normalised and returned in full precision.
        embedding = L2Normalize(name="l2_normalize", dtype="float32")(descriptor)
        super().__init__(inputs=images, outputs=embedding, name=name, **kwargs)
        # A functional model drops a ``dtype`` argument; set the policy as keras-hub's Backbone does.
        self.dtype_policy = policy
        self.config = config
        self._feature_outputs = {
            "embedding": embedding,
            "descriptor": descriptor,
            "global_features": global_features,
            "local_features": local,
            "attention": attention,
            "res4": res4,
            "res5": res5,
        }

    @property
    def backbone(self) -> keras.Model:
        """The ResNet feature-tap model (outputs ``[res4, res5]``)."""
        return self.get_layer("backbone")

    def feature_model(self) -> keras.Model:
        """A model sharing this one's weights that returns a dict of intermediates.

        Keys: ``embedding`` (L2-normalised), ``descriptor`` (before the
        normalisation), ``global_features`` (``f_g``), ``local_features``
        ``(B, H/16, W/16, feature_dim)``, ``attention`` ``(B, H/16, W/16, 1)``,
        ``res4`` and ``res5``. Useful for visualising the attention map.
        """
        return keras.Model(self.inputs[0], dict(self._feature_outputs), name=f"{self.name}_features")

    def get_config(self) -> dict[str, Any]:
        config = self.config.to_dict()
        config["name"] = self.name
        config["dtype"] = self.dtype_policy.name
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config.pop("trainable", None)
        if isinstance(config.get("dtype"), dict):  # a serialized DTypePolicy
            config["dtype"] = keras.dtype_policies.deserialize(config["dtype"])
        return cls(**config)


def build_dolg(
    preset: str = "resnet101",
    *,
    weights: str | None = None,
    backbone_weights: str | None = None,
    dtype=None,
    **overrides: Any,
) -> DOLG:
    """Builds a DOLG model from a preset.

    Args:
        preset: ``"resnet101"`` (the paper), ``"resnet50"`` or ``"tiny"``
            (a narrow one-block-per-stage network for tests and CPU demos).
        weights: optional path to a ``.weights.h5`` file of a whole DOLG
            model with this architecture.
        backbone_weights: optional keras-hub ResNet preset for the backbone:
            a name such as ``"resnet_101_imagenet"`` (downloaded by keras-hub)
            or a local preset directory (no network).
        dtype: the model's dtype policy (see :class:`DOLG`); ``None``: Keras'
            global policy. The global policy is left as it is.
        **overrides: any :class:`dolg_tf.config.ModelConfig` field.

    Returns:
        A :class:`DOLG` model.

    Raises:
        ConfigError: unknown preset or field, invalid value.
        WeightsError: weights that do not exist or do not fit.
    """
    config = model_config(preset, **overrides)
    model = DOLG(**config.to_dict(), dtype=dtype)
    if backbone_weights is not None:
        source = load_backbone_preset(backbone_weights)
        copy_backbone_weights(source, model.backbone)
    if weights is not None:
        try:
            model.load_weights(weights)
        except (FileNotFoundError, OSError) as err:
            raise WeightsError(f"could not read weights file {weights!r}: {err}") from err
        except ValueError as err:
            raise WeightsError(f"weights file {weights!r} does not fit preset {preset!r}: {err}") from err
    return model


def load_dolg(path: str) -> DOLG:
    """Loads a DOLG model saved as ``.keras`` (for example by ``dolg convert``) with ``safe_mode=True``.

    Raises:
        WeightsError: missing or unreadable file, or a file that is not a DOLG model.
    """
    if os.path.isdir(path):
        if is_saved_model_dir(path):
            raise WeightsError(
                f"{path!r} is a SavedModel (an export), not a Keras model; export from the .keras file it was made "
                "from (e.g. runs/<run>/dolg.keras or the output of `dolg convert`), or serve this export as it is"
            )
        exports = complete_versions(path)
        if exports:
            raise WeightsError(
                f"{path!r} is an export base path (SavedModel versions {', '.join(map(str, exports))}), "
                "not a Keras model; pass the .keras file the export was made from"
            )
        raise WeightsError(f"{path!r} is a directory; expected a .keras model file")
    if not os.path.isfile(path):
        raise WeightsError(f"model file {path!r} does not exist")
    try:
        model = keras.saving.load_model(path, safe_mode=True)
    except Exception as err:  # keras raises ValueError, OSError, zipfile errors, ...
        raise WeightsError(f"could not load model file {path!r}: {err}") from err
    if not isinstance(model, DOLG):
        raise WeightsError(f"{path!r} holds a {type(model).__name__}, not a DOLG model")
    return model
