"""Multi-scale descriptors of a converted checkpoint vs the authors' extractor, re-stated in PyTorch.

A PyTorch module of the official architecture (``tests/torch_official.py``)
gets random weights with non-trivial BN statistics, is saved in the official
checkpoint format, converted with ``dolg_tf.convert.from_official_pytorch``,
and both pipelines embed the same random images at the official five scales.
The reference sizes each scale with Python's ``round`` in float64, as the
authors' extractor does. Prints one JSON line and one human line per image size.

    python benchmarks/official_parity.py --depth 50 --sizes 224x149,149x224,97x131
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, choices=(50, 101), default=50)
    parser.add_argument("--no-multi-atrous", action="store_true")
    parser.add_argument("--sizes", default="224x149,149x224,97x131", help="comma-separated HxW")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import numpy as np
    import torch

    from dolg_tf.config import OFFICIAL_SCALES
    from dolg_tf.convert import from_official_pytorch
    from dolg_tf.model import multiscale_embed
    from tests.torch_official import OfficialDOLG, official_multiscale, randomise_

    torch.set_num_threads(2)
    module = randomise_(OfficialDOLG(args.depth, not args.no_multi_atrous, num_classes=10), seed=args.seed + 2)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "official.pyth")
        torch.save({"model_state": module.state_dict()}, path)
        model = from_official_pytorch(path)
    rng = np.random.default_rng(args.seed)
    rows = []
    for text in args.sizes.split(","):
        h, w = (int(v) for v in text.lower().split("x"))
        images = rng.uniform(0, 255, (1, h, w, 3)).astype("float32")
        reference = official_multiscale(module, images, OFFICIAL_SCALES)
        ours = np.asarray(multiscale_embed(model, images, OFFICIAL_SCALES))
        rows.append(
            {
                "size": f"{h}x{w}",
                "max_abs_diff": float(np.abs(ours - reference).max()),
                "cosine": float((ours * reference).sum()),
            }
        )
    print(
        json.dumps(
            {"depth": args.depth, "multi_atrous": not args.no_multi_atrous, "scales": OFFICIAL_SCALES, "rows": rows}
        )
    )
    for row in rows:
        print(f"R{args.depth} {row['size']}: max |diff| {row['max_abs_diff']:.2e}, cosine {row['cosine']:.7f}")


if __name__ == "__main__":
    main()
