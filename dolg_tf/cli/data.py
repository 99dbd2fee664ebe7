"""``dolg data``: inspect training data and convert it to TFRecord shards."""

from __future__ import annotations

import argparse
import json
import os
import time

from dolg_tf.data.config import FORMATS


def _open(args: argparse.Namespace):
    from dolg_tf.data import open_source
    from dolg_tf.errors import ConfigError

    for flag in ("min_class_size", "shards", "image_size"):
        value = getattr(args, flag, 1)
        if value < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be a positive integer, got {value}")
    if args.data is None and args.data_format is not None:
        raise ConfigError(
            f"--data-format {args.data_format} needs --data PATH (without --data the demo photos are used)"
        )
    return open_source(args.data, args.data_format, min_class_size=args.min_class_size)


def _cmd_inspect(args: argparse.Namespace) -> int:
    """Opens the data, prints its size and class statistics, optionally decodes some images."""
    import numpy as np

    from dolg_tf.data import train_dataset

    source = _open(args)
    counts = source.class_counts
    summary = {
        "format": source.kind,
        "description": source.description,
        "num_examples": source.num_examples,
        "num_classes": source.num_classes,
        "images_per_class": {
            "min": int(counts.min()),
            "median": float(np.median(counts)),
            "max": int(counts.max()),
        },
        "first_labels": dict(list(source.label_map.items())[:5]),
    }
    if args.decode:
        n = min(args.decode, source.num_examples)
        t0 = time.perf_counter()
        ds = train_dataset(source, batch_size=1, image_size=args.image_size, augment=False, shuffle=False, repeat=False)
        decoded = sum(1 for _ in ds.take(n))
        summary["decode"] = {
            "decoded": decoded,
            "skipped": source.skipped.count,
            "skipped_by_reason": source.skipped.by_reason(),
            "seconds": round(time.perf_counter() - t0, 2),  # including the pipeline's start-up
        }
    print(json.dumps(summary))  # one JSON line first, like every other dolg command
    if args.json:
        return 0
    print(source.description)
    print(
        f"images per class: min {summary['images_per_class']['min']}, "
        f"median {summary['images_per_class']['median']:g}, max {summary['images_per_class']['max']}"
    )
    if args.decode:
        d = summary["decode"]
        print(f"decoded {d['decoded']} images in {d['seconds']} s; {source.skipped.summary()}")
    return 0


def _cmd_to_tfrecord(args: argparse.Namespace) -> int:
    """Writes the data as TFRecord shards with the dolg_tf feature spec."""
    import tensorflow as tf

    from dolg_tf.data import TFRECORD_META, write_tfrecords
    from dolg_tf.errors import DataError

    source = _open(args)
    if not args.overwrite and tf.io.gfile.exists(os.path.join(args.out, TFRECORD_META)):
        raise DataError(
            f"--out {args.out!r} already holds TFRecords ({TFRECORD_META}); pass --overwrite to replace them"
        )
    t0 = time.perf_counter()
    shards = write_tfrecords(
        source, args.out, num_shards=args.shards, progress=not args.quiet, overwrite=args.overwrite
    )
    seconds = time.perf_counter() - t0
    from dolg_tf.data import open_source

    written = open_source(args.out, "tfrecord")
    print(
        json.dumps(
            {
                "out": os.path.abspath(args.out),
                "shards": len(shards),
                "num_examples": written.num_examples,
                "num_classes": written.num_classes,
                "skipped": source.num_examples - written.num_examples,
                "seconds": round(seconds, 2),
            }
        )
    )
    print(
        f"wrote {written.num_examples} images of {written.num_classes} classes from {source.description} "
        f"into {len(shards)} shards in {os.path.abspath(args.out)} ({seconds:.1f} s)"
    )
    return 0


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=None, help="path or URI of the data (default: the built-in demo photos)")
    parser.add_argument(
        "--data-format", default=None, choices=FORMATS[1:], help="input format (default: detected from --data)"
    )
    parser.add_argument(
        "--min-class-size", type=int, default=1, help="leave out classes with fewer images (default: 1)"
    )


def register(sub) -> None:
    data = sub.add_parser("data", help="inspect training data, convert it to TFRecord shards")
    actions = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    inspect = actions.add_parser("inspect", help="validate the data and print its statistics")
    _add_data_args(inspect)
    inspect.add_argument(
        "--decode",
        type=int,
        default=0,
        metavar="N",
        help="also decode the first N images and count the unreadable ones",
    )
    inspect.add_argument("--image-size", type=int, default=224, help="crop size when decoding (default: 224)")
    inspect.add_argument("--json", action="store_true", help="print only the JSON line (no human-readable lines)")
    inspect.set_defaults(func=_cmd_inspect)

    convert = actions.add_parser("to-tfrecord", help="write the data as sharded TFRecords (+ dolg_data.json)")
    _add_data_args(convert)
    convert.add_argument("--out", required=True, help="output folder")
    convert.add_argument("--shards", type=int, default=8, help="number of shard files (default: 8)")
    convert.add_argument("--overwrite", action="store_true", help="replace TFRecords already in --out")
    convert.add_argument("--quiet", action="store_true", help="no progress bar")
    convert.set_defaults(func=_cmd_to_tfrecord)
