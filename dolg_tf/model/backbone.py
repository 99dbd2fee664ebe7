"""ResNet backbones from keras-hub and their DOLG feature taps."""

from __future__ import annotations

import os

import keras
import keras_hub

from dolg_tf.config import BACKBONES
from dolg_tf.errors import ConfigError, WeightsError

# keras-hub's pyramid level names: P4 = res4 (stride 16), P5 = res5 (stride 32).
LOCAL_TAP = "P4"
GLOBAL_TAP = "P5"


def build_backbone(name: str, dtype=None) -> keras_hub.models.ResNetBackbone:
    """Builds an uninitialised ResNet v1.5 backbone (stride on the 3x3 conv).

    Args:
        name: a key of :data:`dolg_tf.config.BACKBONES`.
        dtype: dtype policy of every layer (``None``: Keras' global policy).
    """
    if name not in BACKBONES:
        raise ConfigError(f"unknown backbone {name!r}; expected one of {sorted(BACKBONES)}")
    spec = BACKBONES[name]
    return keras_hub.models.ResNetBackbone(
        input_conv_filters=[64],
        input_conv_kernel_sizes=[7],
        stackwise_num_filters=list(spec["stackwise_num_filters"]),
        stackwise_num_blocks=list(spec["stackwise_num_blocks"]),
        stackwise_num_strides=[1, 2, 2, 2],
        block_type="bottleneck_block",
        use_pre_activation=False,
        image_shape=(None, None, 3),
        dtype=dtype,
    )


def feature_taps(backbone: keras_hub.models.ResNetBackbone, name: str = "backbone") -> keras.Model:
    """A model sharing ``backbone``'s layers that returns ``[res4, res5]``, with ``backbone``'s dtype policy."""
    outputs = [backbone.pyramid_outputs[LOCAL_TAP], backbone.pyramid_outputs[GLOBAL_TAP]]
    taps = keras.Model(backbone.inputs, outputs, name=name)
    # A functional model ignores a ``dtype`` argument; the policy is set after construction.
    taps.dtype_policy = backbone.dtype_policy
    return taps


def copy_backbone_weights(source: keras.Model, target: keras.Model) -> int:
    """Copies weights layer by layer (matched by name) from ``source`` to ``target``.

    Returns:
        The number of layers copied.

    Raises:
        WeightsError: a layer with weights is missing in ``target``, or shapes differ.
    """
    copied = 0
    for layer in source.layers:
        weights = layer.get_weights()
        if not weights:
            continue
        try:
            dest = target.get_layer(layer.name)
        except ValueError as err:
            raise WeightsError(f"backbone layer {layer.name!r} of the source has no counterpart") from err
        current = dest.get_weights()
        shapes = [w.shape for w in current]
        if shapes != [w.shape for w in weights]:
            raise WeightsError(
                f"backbone layer {layer.name!r}: source shapes {[w.shape for w in weights]} != model shapes {shapes}"
            )
        dest.set_weights(weights)
        copied += 1
    if copied == 0:
        raise WeightsError("the source backbone has no weights to copy")
    return copied


def load_backbone_preset(preset: str) -> keras_hub.models.ResNetBackbone:
    """Loads a keras-hub ResNet backbone from a preset name or a local preset directory.

    A preset *name* (for example ``"resnet_101_imagenet"``) downloads from
    Kaggle/Hugging Face through keras-hub; a local directory (written by
    ``backbone.save_to_preset(dir)``) needs no network.
    """
    if os.path.sep in preset and not os.path.isdir(preset):
        raise WeightsError(f"backbone preset directory {preset!r} does not exist")
    try:
        return keras_hub.models.ResNetBackbone.from_preset(preset)
    except Exception as err:  # keras-hub raises several types for a bad preset
        raise WeightsError(f"could not load ResNet backbone preset {preset!r}: {err}") from err
