"""Peak memory (RSS) of one DOLG-R101 embedding and of one training step, ours against the PyTorch reference.

Every measurement runs in a fresh process, so each peak is its own:

- ``embed``: one 1024x768 image (width x height) embedded at the official five
  scales (0.3535, 0.5, 0.7071, 1, 1.4142). Ours: the exported SavedModel's
  ``embed_pixels`` (exported beforehand in another process, ``--profile
  official``); PyTorch: the official multi-scale extraction
  (tests/torch_official.py, ``torch.no_grad``). Ours is also measured through
  TensorFlow's C API (``dolg_tf.export.capi``: the C++ SavedModel loader TF
  Serving uses, without TF's Python package), the nearest figure to a
  ``tensorflow_model_server`` process.
- ``train``: the training step of benchmarks/train_throughput.py (ours: DOLG +
  ArcFace + SGD as ``dolg train`` runs it; PyTorch: the official architecture +
  ArcFace + SGD), batch 8 at 512x512, float32, two steps.

Each child reports its RSS after building (``ready``) and its peak
(``ru_maxrss``); both include the framework's own libraries.

    python benchmarks/peak_memory.py --preset resnet101
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")

OFFICIAL_SCALES = (0.3535, 0.5, 0.7071, 1.0, 1.4142)


def _export(preset: str, directory: str) -> dict:
    from dolg_tf.export import export_saved_model
    from dolg_tf.model import build_dolg

    return {"path": export_saved_model(build_dolg(preset), directory, profile="official", warmup_batch_sizes=())}


def _embed(framework: str, preset: str, width: int, height: int, saved_model: str | None) -> dict:
    import numpy as np
    from train_throughput import _rss_bytes, peak_rss_bytes

    pixels = np.random.default_rng(0).integers(0, 256, (1, height, width, 3), dtype=np.uint8)
    if framework == "ours":
        import tensorflow as tf

        serve = tf.saved_model.load(saved_model).signatures["embed_pixels"]
        ready = _rss_bytes()
        dim = serve(pixels=tf.constant(pixels))["embedding"].shape[-1]
    elif framework == "capi":
        # The C++ loader TF Serving uses (TF_LoadSessionFromSavedModel), without TF's Python package: the
        # nearest figure to a tensorflow_model_server process. Loading and the call are one step here.
        import base64

        from dolg_tf.export import capi

        ready = _rss_bytes()
        request = {
            "export_dir": saved_model,
            "signature": "embed_pixels",
            "inputs": {"pixels": {"dtype": "uint8", "shape": list(pixels.shape), "b64": base64.b64encode(pixels)}},
        }
        answer = capi.run(request)
        if not answer["ok"] or "tensorflow" in sys.modules:
            raise RuntimeError(f"the C API run failed or imported TensorFlow: {answer}")
        dim = answer["outputs"]["embedding"]["shape"][-1]
    else:
        import torch

        from tests.torch_official import OfficialDOLG, official_multiscale

        torch.set_num_threads(os.cpu_count() or 1)
        module = OfficialDOLG(101 if preset == "resnet101" else 50, True, num_classes=10).eval()
        ready = _rss_bytes()
        dim = official_multiscale(module, pixels, OFFICIAL_SCALES).shape[-1]
    return {"ready_gb": round(ready / 2**30, 3), "peak_gb": round(peak_rss_bytes() / 2**30, 3), "dim": int(dim)}


def _train(framework: str, preset: str, size: int, batch: int, classes: int) -> dict:
    from train_throughput import _rss_bytes, build_ours, build_torch, peak_rss_bytes

    if framework == "ours":
        step, loop = build_ours(preset, size, batch)  # builds and runs the first step
        classes = loop.source.num_classes
    else:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        step = build_torch(101 if preset == "resnet101" else 50, size, batch, classes)
    ready = _rss_bytes()
    step()
    return {
        "after_first_step_gb": round(ready / 2**30, 3),
        "peak_gb": round(peak_rss_bytes() / 2**30, 3),
        "head_classes": int(classes),
    }


def _child(*args: str) -> dict:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", *args], capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": proc.stderr.strip().splitlines()[-3:]}
    return json.loads(lines[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="resnet101", choices=["resnet50", "resnet101"])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--train-size", type=int, default=512)
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--only", default="embed,train", help="which figures: embed, train or both")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "export":
            out = _export(rest[0], rest[1])
        elif kind == "embed":
            out = _embed(rest[0], args.preset, args.width, args.height, rest[1] if len(rest) > 1 else None)
        else:
            out = _train(rest[0], args.preset, args.train_size, args.train_batch, int(rest[1]))
        print(json.dumps(out), flush=True)
        return 0

    from _common import cpu_model

    common = [
        "--preset",
        args.preset,
        "--width",
        str(args.width),
        "--height",
        str(args.height),
        "--train-size",
        str(args.train_size),
        "--train-batch",
        str(args.train_batch),
    ]
    result = {"benchmark": "peak_memory", "preset": args.preset, "cpu": cpu_model(), "threads": os.cpu_count()}
    only = set(args.only.split(","))
    if "embed" in only:
        with tempfile.TemporaryDirectory(prefix="dolg_mem_") as tmp:
            exported = _child("export", args.preset, os.path.join(tmp, "sm"), *common)
            result["embed"] = {
                "ours": _child("embed", "ours", exported.get("path", ""), *common),
                "ours_c_api": _child("embed", "capi", exported.get("path", ""), *common),
                "pytorch": _child("embed", "pytorch", *common),
                "image": f"{args.width}x{args.height}",
                "scales": list(OFFICIAL_SCALES),
            }
    if "train" in only:
        ours = _child("train", "ours", "0", *common)
        # the PyTorch head gets as many classes as ours (the built-in demo data's)
        result["train"] = {
            "ours": ours,
            "pytorch": _child("train", "pytorch", str(ours.get("head_classes", 10)), *common),
            "image_size": args.train_size,
            "batch": args.train_batch,
        }
    print(json.dumps(result))
    for figure in ("embed", "train"):
        if figure in result:
            ours, torch_ = result[figure]["ours"], result[figure]["pytorch"]
            if "peak_gb" in ours and "peak_gb" in torch_:
                print(
                    f"{args.preset} {figure}: peak RSS ours {ours['peak_gb']} GB, PyTorch {torch_['peak_gb']} GB "
                    f"(ours/PyTorch {ours['peak_gb'] / torch_['peak_gb']:.2f})"
                )
                c_api = result[figure].get("ours_c_api", {})
                if "peak_gb" in c_api:
                    print(f"  through TF's C API (TF Serving's loader, no TF Python): peak RSS {c_api['peak_gb']} GB")
            else:
                print(f"{args.preset} {figure}: failed: ours {ours.get('error')}, PyTorch {torch_.get('error')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
