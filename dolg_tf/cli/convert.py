"""``dolg convert``: released DOLG weights -> a Keras model file."""

from __future__ import annotations

import argparse
import json
import os

from dolg_tf.errors import DolgError
from dolg_tf.fileio import atomic_write


def _cmd_convert(args: argparse.Namespace) -> int:
    """Converts an official DOLG PyTorch checkpoint to a Keras model file."""
    from dolg_tf.convert import from_official_pytorch

    out = os.path.abspath(args.out)
    if not (out.endswith(".keras") or out.endswith(".weights.h5")):
        os.makedirs(out, exist_ok=True)
        out = os.path.join(out, "dolg.keras")
    if os.path.exists(out) and not args.overwrite:
        raise DolgError(f"{out} exists; pass --overwrite to replace it")
    model = from_official_pytorch(args.checkpoint, preset=args.preset)
    tmp = out + ".tmp" + (".keras" if out.endswith(".keras") else ".weights.h5")
    if out.endswith(".keras"):
        model.save(tmp)
    else:
        model.save_weights(tmp)
    os.replace(tmp, out)  # never leave a half-written model behind
    config_path = os.path.splitext(out)[0].removesuffix(".weights") + ".config.json"
    atomic_write(config_path, lambda f: f.write(model.config.to_json().encode("utf-8")))
    print(json.dumps({"out": out, "config": config_path, **model.config.to_dict()}))
    print(
        f"converted {os.path.abspath(args.checkpoint)} -> {out} "
        f"({model.config.backbone}, multi_atrous={model.config.multi_atrous})"
    )
    return 0


def register(sub) -> None:
    convert = sub.add_parser(
        "convert",
        help="convert released DOLG weights to a Keras model",
        description="Converts the authors' released DOLG PyTorch weights (R50 / R101, with or without "
        "MultiAtrous, detected from the keys) into this package's Keras model: a .keras file (plus its "
        "config JSON) or a .weights.h5 file. The checkpoint is read with PyTorch's weights-only loader, "
        "so a file holding anything but tensors is refused without running it.",
    )
    convert.add_argument("--from", dest="source", choices=["official-pytorch"], default="official-pytorch")
    convert.add_argument("--checkpoint", required=True, help="official .pyth/.pth checkpoint")
    convert.add_argument("--out", required=True, help="a .keras file, a .weights.h5 file, or a directory")
    convert.add_argument("--preset", default=None, help="insist on resnet50 or resnet101 (default: detect)")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    convert.set_defaults(func=_cmd_convert)
