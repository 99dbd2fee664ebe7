"""Gallery embedding throughput: ``dolg embed-batch`` (Beam, in-process runner) vs ``dolg embed`` through
``dolg serve`` (gRPC) vs the SavedModel's ``serving_default`` called in this process.

For each preset (random weights: speed does not depend on them), the model is
exported at ``--size`` with ``--scales``, and ``--images`` JPEG photographs
(crops of the built-in demo photos, up to 640 px) are written to a folder. Each
repeat then runs, interleaved, after one warm-up round:

  (a) in-process: ``serving_default`` over the images in batches of ``--batch``
      (model loaded once, before timing);
  (b) ``dolg embed FOLDER --server :PORT`` as a subprocess, against one ``dolg
      serve`` started before timing (``--batch-size --batch``);
  (c) ``dolg embed-batch FOLDER --saved-model BASE --out DIR`` as a subprocess
      (``--batch-size --batch``).

For (b) and (c) two throughputs are reported: over the whole command (what a
user waits for, Python and TensorFlow start-up included) and over the
command's own timing (its JSON summary's ``seconds``: the embedding itself,
plus Beam's pipeline set-up and the model load for (c)). Medians of the repeats;
ratios are against (a).

    python benchmarks/embed_batch.py --presets tiny,resnet50 --size 224 --images 96 --repeats 3
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")
from _common import cpu_model

CLI = [sys.executable, "-c", "import sys; from dolg_tf.cli import main; sys.exit(main())"]


def _write_images(folder: str, count: int, seed: int = 0) -> list[bytes]:
    import numpy as np
    from PIL import Image

    from dolg_tf.demo.photos import demo_photos

    rng = np.random.default_rng(seed)
    photos = list(demo_photos().values())
    blobs = []
    for i in range(count):
        src = photos[i % len(photos)]
        h = int(rng.integers(src.shape[0] // 2, src.shape[0] + 1))
        w = int(rng.integers(src.shape[1] // 2, src.shape[1] + 1))
        top, left = int(rng.integers(0, src.shape[0] - h + 1)), int(rng.integers(0, src.shape[1] - w + 1))
        image = Image.fromarray(np.ascontiguousarray(src[top : top + h, left : left + w]))
        image.thumbnail((640, 640))
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=90)
        blobs.append(buf.getvalue())
        with open(os.path.join(folder, f"img_{i:05d}.jpg"), "wb") as f:
            f.write(blobs[-1])
    return blobs


def _run_cli(args: list[str]) -> tuple[float, dict]:
    t0 = time.perf_counter()
    done = subprocess.run([*CLI, *args], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"dolg {args[0]} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    summary = next(json.loads(line) for line in done.stdout.splitlines() if line.startswith("{"))
    return wall, summary


def _bench_preset(preset: str, args, folder: str, blobs: list[bytes], tmp: str) -> dict:
    import keras
    import numpy as np
    import tensorflow as tf

    from dolg_tf.export import export_saved_model
    from dolg_tf.model import build_dolg
    from dolg_tf.server.process import ServerProcess

    keras.utils.set_random_seed(0)
    base = os.path.join(tmp, f"model_{preset}")
    path = export_saved_model(
        build_dolg(preset), base, image_size=args.size, scales=args.scales, max_batch_size=max(args.batch, 1),
        warmup_batch_sizes=(),
    )  # fmt: skip
    fn = tf.saved_model.load(path).signatures["serving_default"]
    batches = [tf.constant(blobs[i : i + args.batch]) for i in range(0, len(blobs), args.batch)]

    def in_process() -> tuple[float, float, np.ndarray]:
        t0 = time.perf_counter()
        out = np.concatenate([fn(images=b)["embedding"].numpy() for b in batches])
        seconds = time.perf_counter() - t0
        return seconds, seconds, out

    server = ServerProcess(base, extra=["--poll-seconds", "0"], timeout=600).start()
    ports = server.info
    runs = {"n": 0}

    def via_serve() -> tuple[float, float, None]:
        runs["n"] += 1
        out = os.path.join(tmp, f"serve_{preset}_{runs['n']}.npy")
        wall, summary = _run_cli(
            ["embed", folder, "--server", f"127.0.0.1:{ports['grpc_port']}", "--out", out,
             "--batch-size", str(args.batch), "--no-progress"]
        )  # fmt: skip
        return wall, summary["seconds"], None

    def beam_batch() -> tuple[float, float, None]:
        runs["n"] += 1
        out = os.path.join(tmp, f"beam_{preset}_{runs['n']}")
        wall, summary = _run_cli(
            ["embed-batch", folder, "--saved-model", base, "--out", out, "--batch-size", str(args.batch)]
        )
        assert summary["embedded"] == len(blobs) and summary["errors"] == 0, summary
        return wall, summary["seconds"], None

    variants = {"in_process_savedmodel": in_process, "embed_via_serve_grpc": via_serve, "embed_batch_beam": beam_batch}
    try:
        ref = in_process()[2]  # warm-up round (and the reference for the agreement check below)
        via_serve()
        beam_batch()
        times = {name: {"wall": [], "own": []} for name in variants}
        for _ in range(args.repeats):
            for name, run in variants.items():
                wall, own, _ = run()
                times[name]["wall"].append(wall)
                times[name]["own"].append(own)
    finally:
        server.stop()

    # The last Beam run's Parquet rows equal the in-process embeddings (same export, same images).
    import pyarrow.parquet as pq

    last = os.path.join(tmp, f"beam_{preset}_{runs['n']}")
    table = pq.read_table([os.path.join(last, n) for n in os.listdir(last) if n.endswith(".parquet")])
    rows = dict(zip(table.column("id").to_pylist(), table.column("embedding").to_pylist()))
    beam = np.stack([np.asarray(rows[f"img_{i:05d}.jpg"], np.float32) for i in range(len(blobs))])
    agreement = float(np.abs(beam - ref).max())

    n = len(blobs)
    result = {"max_abs_diff_beam_vs_in_process": agreement}
    for name in variants:
        wall, own = statistics.median(times[name]["wall"]), statistics.median(times[name]["own"])
        result[name] = {
            "command_s": round(wall, 3),
            "images_per_s_command": round(n / wall, 2),
            "own_s": round(own, 3),
            "images_per_s_own": round(n / own, 2),
        }
    base_rate = result["in_process_savedmodel"]["images_per_s_own"]
    for name in ("embed_via_serve_grpc", "embed_batch_beam"):
        result[name]["ratio_own_vs_in_process"] = round(result[name]["images_per_s_own"] / base_rate, 3)
        result[name]["ratio_command_vs_in_process"] = round(result[name]["images_per_s_command"] / base_rate, 3)
    result["ratio_beam_vs_serve_own"] = round(
        result["embed_batch_beam"]["images_per_s_own"] / result["embed_via_serve_grpc"]["images_per_s_own"], 3
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,resnet50")
    parser.add_argument("--size", type=int, default=224, help="export image_size (default: 224)")
    parser.add_argument("--scales", default="1.0", help="export scales (default: 1.0)")
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    args.scales = tuple(float(s) for s in args.scales.split(","))

    tmp = tempfile.mkdtemp(prefix="dolg_bench_batch_")
    try:
        folder = os.path.join(tmp, "images")
        os.makedirs(folder)
        blobs = _write_images(folder, args.images)
        result = {
            "benchmark": "embed_batch",
            "cpu": cpu_model(),
            "cpus": os.cpu_count(),
            "size": args.size,
            "scales": list(args.scales),
            "images": args.images,
            "batch": args.batch,
            "repeats": args.repeats,
            "results": {p: _bench_preset(p, args, folder, blobs, tmp) for p in args.presets.split(",")},
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result))
    for preset, r in result["results"].items():
        a, b, c = r["in_process_savedmodel"], r["embed_via_serve_grpc"], r["embed_batch_beam"]
        print(
            f"{preset} {args.size}px, {args.images} images, batch {args.batch}, {result['cpu']} x{result['cpus']}: "
            f"in-process {a['images_per_s_own']} img/s; dolg embed via dolg serve {b['images_per_s_own']} img/s "
            f"({b['ratio_own_vs_in_process']}x; whole command {b['images_per_s_command']} img/s); "
            f"dolg embed-batch {c['images_per_s_own']} img/s ({c['ratio_own_vs_in_process']}x; whole command "
            f"{c['images_per_s_command']} img/s); embed-batch / embed-via-serve = {r['ratio_beam_vs_serve_own']}; "
            f"max |beam - in-process| = {r['max_abs_diff_beam_vs_in_process']:.1e}"
        )


if __name__ == "__main__":
    main()
