"""Convert the authors' released DOLG checkpoints (PyTorch, pycls ResNet) to Keras.

The official checkpoint is a dict whose ``model_state`` entry is the model's
``state_dict`` (``tests/data/official_dolg_*_state_dict.tsv`` lists every entry).
It is read with ``torch.load(..., weights_only=True)``: tensors and plain
containers only, never an unrestricted unpickle. torch is imported here only
(``pip install 'dolg-tf[convert]'``).

Every checkpoint entry must map onto the Keras model and every Keras weight
must be filled; anything unmatched or of the wrong shape raises
:class:`~dolg_tf.errors.WeightsError` naming the keys (the official loader
silently skips them, which hides bugs).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from dolg_tf.config import BACKBONES, OFFICIAL_PREPROCESSING
from dolg_tf.errors import ConfigError, WeightsError

# Blocks of the third stage tell the depth apart.
_DEPTH_BY_S3_BLOCKS = {6: "resnet50", 23: "resnet101"}
_HEAD_KEYS = ("desc_cls.weight", "desc_cls.t")
_OFFICIAL_DILATIONS = (6, 12, 18)


def _conv(w: np.ndarray) -> np.ndarray:
    return np.transpose(w, (2, 3, 1, 0))  # OIHW -> HWIO


def _linear(w: np.ndarray) -> np.ndarray:
    return np.transpose(w)  # (out, in) -> (in, out)


def _same(w: np.ndarray) -> np.ndarray:
    return w


@dataclass(frozen=True)
class _Target:
    variable: object
    transform: Callable[[np.ndarray], np.ndarray]


def _unreadable_checkpoint(path: str, err: Exception) -> WeightsError:
    """One line saying what the file is and what was expected (torch's own text is a page long)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        head = b""
    unsupported = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
    if unsupported:
        why = f"it holds a Python object ({unsupported.group(1)}) besides tensors, which is not run"
    elif head.startswith(b"PK\x03\x04"):
        why = "it is a zip archive but not a complete one written by torch.save (truncated or damaged?)"
    elif head[:1] == b"\x80":
        why = "it is a pickle of something other than tensors and plain containers"
    elif not head:
        why = "it is empty"
    else:
        why = f"it does not start like one (first bytes {head!r})"
    return WeightsError(
        f"{path!r} is not a PyTorch checkpoint that PyTorch's weights-only loader can read: {why}; expected the "
        "official DOLG weights (.pyth/.pth: torch.save of {'model_state': state_dict} or of a bare state_dict)"
    )


def load_official_state_dict(checkpoint_path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads an official checkpoint (``{'model_state': ...}`` or a bare state_dict) as numpy arrays."""
    try:
        import torch
    except ImportError as err:
        raise ConfigError("reading PyTorch checkpoints needs torch: pip install 'dolg-tf[convert]'") from err
    path = os.fspath(checkpoint_path)
    if not os.path.isfile(path):
        raise WeightsError(f"checkpoint file {path!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for non-weights content, RuntimeError for a bad zip, ...
        raise _unreadable_checkpoint(path, err) from err
    if isinstance(obj, Mapping) and "model_state" in obj:
        obj = obj["model_state"]
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(f"{path!r} holds no state_dict (expected a dict with 'model_state' or a state_dict)")
    state = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise WeightsError(f"state_dict entry {key!r} is a {type(value).__name__}, not a tensor")
        name = key[len("module.") :] if key.startswith("module.") else key
        state[name] = value.detach().cpu().numpy()
    return state


def detect_architecture(state: Mapping[str, np.ndarray]) -> tuple[str, bool]:
    """Returns ``(backbone preset, multi_atrous)`` from the state_dict keys."""
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"globalmodel\.s3\.b(\d+)\.", k))}
    if not blocks:
        raise WeightsError("no 'globalmodel.s3.b*' keys: this is not an official DOLG checkpoint")
    depth = _DEPTH_BY_S3_BLOCKS.get(max(blocks))
    if depth is None:
        raise WeightsError(f"stage s3 has {max(blocks)} blocks; expected 6 (ResNet-50) or 23 (ResNet-101)")
    return depth, any(k.startswith("localmodel.aspp.") for k in state)


def _conv_bn(prefix: str, conv, bn, conv_key: str, bn_key: str) -> dict[str, _Target]:
    targets = {f"{prefix}.{conv_key}.weight": _Target(conv.kernel, _conv)}
    for torch_name, var in (
        ("weight", bn.gamma),
        ("bias", bn.beta),
        ("running_mean", bn.moving_mean),
        ("running_var", bn.moving_variance),
    ):
        targets[f"{prefix}.{bn_key}.{torch_name}"] = _Target(var, _same)
    return targets


def _target_map(model, backbone: str) -> dict[str, _Target]:
    """Official key -> Keras variable, for every weight of the model."""
    bb = model.backbone
    targets = _conv_bn("globalmodel.stem", bb.get_layer("conv1_conv"), bb.get_layer("conv1_bn"), "conv", "bn")
    for s, n_blocks in enumerate(BACKBONES[backbone]["stackwise_num_blocks"], start=1):
        for b in range(1, n_blocks + 1):
            prefix, ours = f"globalmodel.s{s}.b{b}", f"stack{s - 1}_block{b - 1}"
            if b == 1:
                targets.update(
                    _conv_bn(prefix, bb.get_layer(f"{ours}_0_conv"), bb.get_layer(f"{ours}_0_bn"), "proj", "bn")
                )
            for i, letter in enumerate("abc", start=1):
                targets.update(
                    _conv_bn(
                        prefix,
                        bb.get_layer(f"{ours}_{i}_conv"),
                        bb.get_layer(f"{ours}_{i}_bn"),
                        f"f.{letter}",
                        f"f.{letter}_bn",
                    )
                )
    gem = model.get_layer("gem")
    targets["pool_g.p"] = _Target(gem.p_weight, _same)
    for official, name in (("fc_t", "global_fc"), ("fc", "embedding_fc")):
        layer = model.get_layer(name)
        targets[f"{official}.weight"] = _Target(layer.kernel, _linear)
        targets[f"{official}.bias"] = _Target(layer.bias, _same)
    local = model.get_layer("local_branch")
    # conv1.bias is folded into bn.running_mean (see from_official_pytorch).
    targets.update(_conv_bn("localmodel", local.conv, local.bn, "conv1", "bn"))
    targets["localmodel.conv2.weight"] = _Target(local.attention_conv.kernel, _conv)
    targets["localmodel.conv2.bias"] = _Target(local.attention_conv.bias, _same)
    if local.atrous is not None:
        atrous = local.atrous
        convs = {"aspp.0": atrous.conv_1x1, "im_pool.1": atrous.pool_conv, "conv_after.0": atrous.project}
        convs.update({f"aspp.{i}": conv for i, conv in enumerate(atrous.atrous_convs, start=1)})
        for key, conv in convs.items():
            targets[f"localmodel.aspp.{key}.weight"] = _Target(conv.kernel, _conv)
            targets[f"localmodel.aspp.{key}.bias"] = _Target(conv.bias, _same)
    return targets


def from_official_pytorch(
    checkpoint_path: str | os.PathLike,
    preset: str | None = None,
    keep_head: bool = False,
):
    """Builds a Keras DOLG model from an official DOLG PyTorch checkpoint.

    The model gets the official preprocessing (BGR, ImageNet mean/std in BGR
    order), so its descriptors reproduce the official ones; use
    :data:`dolg_tf.config.OFFICIAL_SCALES` for the official scale set.

    Args:
        checkpoint_path: ``.pyth`` / ``.pth`` file: ``{'model_state': ...}`` or a bare state_dict.
        preset: ``"resnet50"`` or ``"resnet101"`` to insist on a depth; by
            default it is detected from the keys.
        keep_head: also return the training head (a :class:`CurricularFace`
            with the checkpoint's class centres and ``t``).

    Returns:
        The :class:`~dolg_tf.model.DOLG` model, or ``(model, head)`` with ``keep_head``.

    Raises:
        WeightsError: unreadable file, unknown architecture, or any missing,
            unexpected or wrongly shaped entry (all of them are listed).
    """
    from dolg_tf.layers import CurricularFace
    from dolg_tf.model import build_dolg

    state = load_official_state_dict(checkpoint_path)
    backbone, multi_atrous = detect_architecture(state)
    if preset is not None and preset != backbone:
        raise WeightsError(f"checkpoint is a {backbone} DOLG but preset {preset!r} was asked for")
    model = build_dolg(
        backbone, multi_atrous=multi_atrous, dilation_rates=_OFFICIAL_DILATIONS, **OFFICIAL_PREPROCESSING
    )
    targets = _target_map(model, backbone)
    state = dict(state)
    if "pool_g.p" not in state:  # the 2021-12..2022-04 code had a fixed p = 3 with no entry
        state["pool_g.p"] = np.array([3.0], np.float32)
    conv1_bias = state.pop("localmodel.conv1.bias", None)
    head_state = {k: state.pop(k) for k in _HEAD_KEYS if k in state}
    tracked = [k for k in state if k.endswith(".num_batches_tracked")]
    for key in tracked:
        state.pop(key)

    missing = sorted(set(targets) - set(state))
    if conv1_bias is None:
        missing.append("localmodel.conv1.bias")
    unexpected = sorted(set(state) - set(targets))
    mismatched = []
    values = {key: targets[key].transform(np.asarray(state[key], np.float32)) for key in set(targets) & set(state)}
    for key in sorted(values):
        target, value = targets[key], values[key]
        if tuple(value.shape) != tuple(target.variable.shape):
            mismatched.append(
                f"{key}: checkpoint {tuple(state[key].shape)} -> {tuple(value.shape)}, "
                f"model {tuple(target.variable.shape)}"
            )
    if conv1_bias is not None and conv1_bias.shape != tuple(targets["localmodel.bn.running_mean"].variable.shape):
        mismatched.append(f"localmodel.conv1.bias: checkpoint {conv1_bias.shape}")
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if mismatched:
        problems.append(f"shape mismatches {mismatched}")
    if problems:
        raise WeightsError(
            f"checkpoint {os.fspath(checkpoint_path)!r} does not match the {backbone} DOLG model: "
            + "; ".join(problems)
        )

    for key, target in targets.items():
        value = values[key]
        if key == "localmodel.bn.running_mean":
            # BN(conv(x) + b) with moving mean mu equals BN(conv(x)) with moving mean mu - b.
            value = value - np.asarray(conv1_bias, np.float32)
        target.variable.assign(value)

    if not keep_head:
        return model
    if "desc_cls.weight" not in head_state:
        raise WeightsError("keep_head=True but the checkpoint has no 'desc_cls.weight'")
    centres = np.asarray(head_state["desc_cls.weight"], np.float32)
    head = CurricularFace(centres.shape[0], scale=30.0, margin=0.15)
    head.build((None, centres.shape[1]))
    head.kernel.assign(centres.T)
    if "desc_cls.t" in head_state:
        head.t.assign(float(np.asarray(head_state["desc_cls.t"]).reshape(-1)[0]))
    return model, head
