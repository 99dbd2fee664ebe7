"""``dolg embed``: embed a folder, a list file or files through TF Serving (or in-process) -> ``.npy`` + ids.

Inputs, mixed freely:

* a folder: every ``.jpg .jpeg .png .gif .bmp`` file below it (recursively),
  in sorted order; ids are the paths relative to the folder (prefixed with the
  folder when several inputs are given);
* a list file (``.txt``): one image path per line (blank lines and ``#``
  comments skipped), relative paths taken from the list file's folder (or
  ``--root``); ids are the lines as written;
* an image file: itself; its id is the path as given.

Writes the embeddings as a float32 ``(N, D)`` ``.npy`` (``--out``) and a JSON
file ``{"ids": [...], "model": ..., "version": ..., ...}`` (``--ids``, default
``<out>.ids.json``), both atomically (temporary file + rename), with
:func:`dolg_tf.embeddings.save`. ``dolg index build`` reads both.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from dolg_tf.cli._common import add_client_arguments, client_from_args, import_tensorflow_quietly, positive_int
from dolg_tf.errors import DataError, InvalidImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp")
_MAX_LIST_BYTES = 256 << 20  # a list file is text; refuse anything absurd before reading it


def _folder_images(folder: str) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
                found.append(os.path.join(dirpath, name))
    # One order whatever the file system: sorted by the path below the folder.
    return sorted(found, key=lambda p: os.path.relpath(p, folder).split(os.sep))


def _list_file(path: str, root: str | None) -> list[tuple[str, str, int]]:
    """``(path, entry as written, line number)`` for each image line of a list file."""
    try:
        if os.path.getsize(path) > _MAX_LIST_BYTES:
            raise DataError(f"list file {path!r} is larger than {_MAX_LIST_BYTES} bytes")
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read list file {path!r}: {err}") from err
    base = root if root is not None else os.path.dirname(os.path.abspath(path))
    out = []
    for number, line in enumerate(lines, start=1):
        entry = line.strip()
        if entry and not entry.startswith("#"):
            out.append((os.path.join(base, entry), entry, number))
    return out


def _collect(inputs: list[str], root: str | None) -> tuple[list[str], list[str], list[str | None]]:
    """Like :func:`collect_inputs`, plus each image's origin: ``"<list file>, line N"`` or None."""
    paths: list[str] = []
    ids: list[str] = []
    origins: list[str | None] = []
    for arg in inputs:
        if os.path.isdir(arg):
            found = _folder_images(arg)
            if not found:
                raise DataError(f"no {'/'.join(IMAGE_EXTENSIONS)} images found under {os.path.abspath(arg)!r}")
            for path in found:
                rel = os.path.relpath(path, arg).replace(os.sep, "/")
                paths.append(path)
                ids.append(rel if len(inputs) == 1 else f"{arg.rstrip('/')}/{rel}")
                origins.append(None)
        elif arg.lower().endswith(".txt"):
            for path, entry, number in _list_file(arg, root):
                origin = f"{os.path.abspath(arg)}, line {number}"
                if not os.path.isfile(path):
                    relative = (
                        ""
                        if os.path.isabs(entry)
                        else (
                            " (relative paths are taken from --root)"
                            if root is not None
                            else " (relative paths are taken from the list file's folder; --root changes that)"
                        )
                    )
                    what = "is a folder, not an image file" if os.path.isdir(path) else "does not exist"
                    raise DataError(f"{origin}: {entry!r} -> {os.path.abspath(path)} {what}{relative}")
                paths.append(path)
                ids.append(entry)
                origins.append(origin)
        elif os.path.exists(arg):
            paths.append(arg)
            ids.append(arg)
            origins.append(None)
        else:
            raise DataError(f"no such file or folder: {os.path.abspath(arg)!r}")
    if not paths:
        raise DataError("no images to embed")
    seen: dict[str, int] = {}
    for i, key in enumerate(ids):
        if key in seen:
            raise DataError(f"two images have the id {key!r} (inputs {seen[key]} and {i}); ids must be unique")
        seen[key] = i
    return paths, ids, origins


def collect_inputs(inputs: list[str], root: str | None = None) -> tuple[list[str], list[str]]:
    """Expands folders, list files and files into ``(paths, ids)``, in order.

    Raises:
        DataError: an input does not exist, a list file is unreadable or names
            a missing file (the error gives the list file and line), no image
            was found, or two images got the same id.
    """
    paths, ids, _ = _collect(inputs, root)
    return paths, ids


def _cmd_embed(args: argparse.Namespace) -> int:
    from dolg_tf import embeddings

    if not args.out.endswith(".npy"):
        raise DataError(f"--out must name a .npy file, got {args.out!r}")
    out = os.path.abspath(args.out)
    ids_path = os.path.abspath(args.ids or embeddings.ids_path_for(args.out))
    paths, ids, origins = _collect(args.inputs, args.root)
    if args.saved_model:
        import_tensorflow_quietly()
    options = dict(batch_size=args.batch_size, max_in_flight=args.max_in_flight, progress=not args.no_progress)
    client = client_from_args(args, saved_model=args.saved_model, **options)
    if args.saved_model:
        source = f"saved_model:{os.path.abspath(args.saved_model)}"
    else:
        source = f"{args.protocol}://{client.target}"
    t0 = time.perf_counter()
    with client:
        info = client.check()
        try:
            emb = client.embed(paths)
        except InvalidImageError as err:
            if err.index is None:
                raise InvalidImageError(f"request: {err.reason}") from None
            origin = origins[err.index]
            where = os.path.abspath(paths[err.index]) + (f" ({origin})" if origin else "")
            raise InvalidImageError(f"{where}: {err.reason}") from None
    seconds = time.perf_counter() - t0
    metadata = {"model": info.model_name, "version": info.version, "signature": info.signature_name, "source": source}
    embeddings.save(out, emb, ids, ids_path=ids_path, metadata=metadata)
    summary = {
        "images": len(ids),
        "dim": int(emb.shape[1]),
        "seconds": round(seconds, 2),
        "images_per_s": round(len(ids) / max(seconds, 1e-9), 2),
        "out": out,
        "ids": ids_path,
        "model": info.model_name,
        "version": info.version,
        "source": source,
    }
    print(json.dumps(summary))
    print(
        f"embedded {len(ids)} images ({emb.shape[1]}-d, {info.model_name} v{info.version}) via {source} "
        f"in {seconds:.1f} s ({summary['images_per_s']} images/s) -> {out}, {ids_path}",
        file=sys.stderr,
    )
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "embed",
        help="embed a folder, list file or images through TF Serving / dolg serve (or in-process) -> .npy + ids",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", help="folders, .txt list files and/or image files")
    p.add_argument("--out", required=True, help="embeddings file to write (.npy, float32 (N, D))")
    p.add_argument("--ids", default=None, help="ids JSON to write (default: <out without .npy>.ids.json)")
    p.add_argument("--root", default=None, help="folder that relative paths in list files are relative to")
    p.add_argument(
        "--saved-model",
        default=None,
        help="embed in this process with this SavedModel (base or version dir); no server",
    )
    p.add_argument("--batch-size", type=positive_int, default=8, help="images per request (default: 8)")
    p.add_argument("--max-in-flight", type=positive_int, default=2, help="concurrent requests (default: 2)")
    add_client_arguments(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_embed)
