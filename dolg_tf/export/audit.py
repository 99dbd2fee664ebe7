"""Can TF Serving run this export? The op audit, and a run through TF Serving's own loader (the TF C API).

:func:`audit_saved_model` walks the graph and every function in its library for
ops TF Serving's C++ runtime does not have (Python callbacks) or that tie the
graph to XLA. :func:`run_with_c_api` loads the export with
``TF_LoadSessionFromSavedModel`` (the C++ ``LoadSavedModel`` that
``tensorflow_model_server`` calls) in a fresh process that never imports
TensorFlow's Python package (:mod:`dolg_tf.export.capi`), and runs a signature.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Sequence

import numpy as np

from dolg_tf.errors import ConfigError, ExportError
from dolg_tf.export.contract import (
    DEFAULT_SIGNATURE,
    EMBEDDING_KEY,
    IMAGES_KEY,
    PIXELS_KEY,
    PIXELS_SIGNATURE,
)
from dolg_tf.export.reader import read_saved_model

# Op types that TF Serving's C++ runtime cannot run (Python callbacks) or
# that tie a graph to XLA. The audit also refuses functions marked for XLA.
FORBIDDEN_OPS = frozenset({"PyFunc", "PyFuncStateless", "EagerPyFunc", "XlaCallModule"})
_XLA_ATTRS = ("_XlaMustCompile", "_XlaCompile")


def audit_saved_model(export_dir: str | os.PathLike) -> list[str]:
    """Problems that would stop TF Serving from running an export (empty list: none).

    Reads ``saved_model.pb`` and walks the graph and every function in its
    library: Python-callback ops (``PyFunc``, ``EagerPyFunc``...),
    ``XlaCallModule`` and functions marked for XLA compilation are reported.
    """
    try:
        saved = read_saved_model(export_dir)
    except ExportError as err:
        return [str(err)]
    problems = []
    for meta in saved.meta_graphs:
        graph = meta.graph_def
        for node in graph.node:
            if node.op in FORBIDDEN_OPS:
                problems.append(f"graph node {node.name!r} is a {node.op}")
        for fn in graph.library.function:
            name = fn.signature.name
            for attr in _XLA_ATTRS:
                if attr in fn.attr and fn.attr[attr].b:
                    problems.append(f"function {name!r} is marked {attr}")
            for node in fn.node_def:
                if node.op in FORBIDDEN_OPS:
                    problems.append(f"function {name!r} node {node.name!r} is a {node.op}")
                for attr in _XLA_ATTRS:
                    if attr in node.attr and node.attr[attr].b:
                        problems.append(f"function {name!r} node {node.name!r} is marked {attr}")
    return problems


def op_types(export_dir: str | os.PathLike) -> set[str]:
    """Every op type used in an export's graph and functions (for audits and tests).

    Raises:
        ExportError: ``saved_model.pb`` cannot be read.
    """
    ops = set()
    for meta in read_saved_model(export_dir).meta_graphs:
        ops.update(n.op for n in meta.graph_def.node)
        for fn in meta.graph_def.library.function:
            ops.update(n.op for n in fn.node_def)
    return ops


class CApiRunError(ExportError):
    """The TF C API could not load or run an export; ``stage`` is "load", "signature" or "run"."""

    def __init__(self, stage: str, code: int, message: str):
        super().__init__(f"TF C API {stage} failed (code {code}): {message}")
        self.stage, self.code, self.message = stage, code, message


def run_with_c_api(
    export_dir: str | os.PathLike,
    *,
    images: Sequence[bytes] | None = None,
    pixels: np.ndarray | None = None,
    signature: str | None = None,
    timeout: float = 300.0,
) -> np.ndarray:
    """Runs an export through TF's C API in a fresh process that never imports ``tensorflow``.

    This is TF Serving's loader path (``LoadSavedModel`` from
    ``libtensorflow_cc``): an export that runs here runs in TF Serving.
    Give either encoded ``images`` (``serving_default``) or uint8 ``pixels``
    (``embed_pixels``).

    Returns:
        The ``embedding`` output as float32.

    Raises:
        CApiRunError: load, signature lookup or run failed (e.g. an op TF
            Serving does not have, or INVALID_ARGUMENT from a bounds check).
        ExportError: the subprocess itself failed or imported TensorFlow.
    """
    if (images is None) == (pixels is None):
        raise ConfigError("give exactly one of images= or pixels=")
    if images is not None:
        inputs = {IMAGES_KEY: {"dtype": "string", "b64": [base64.b64encode(bytes(b)).decode() for b in images]}}
        signature = signature or DEFAULT_SIGNATURE
    else:
        pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
        encoded = base64.b64encode(pixels.tobytes()).decode()
        inputs = {PIXELS_KEY: {"dtype": "uint8", "shape": list(pixels.shape), "b64": encoded}}
        signature = signature or PIXELS_SIGNATURE
    request = {"export_dir": os.path.abspath(os.fspath(export_dir)), "signature": signature, "inputs": inputs}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSTARTUP"}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    proc = subprocess.run(
        [sys.executable, "-m", "dolg_tf.export.capi"],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if proc.returncode != 0 or not proc.stdout.strip():
        raise ExportError(f"the C API subprocess failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    answer = json.loads(proc.stdout)
    if answer.get("tensorflow_imported"):
        raise ExportError("the C API subprocess imported tensorflow; the check would prove nothing")
    if not answer["ok"]:
        raise CApiRunError(answer["stage"], answer["code"], answer["message"])
    out = answer["outputs"][EMBEDDING_KEY]
    return np.asarray(out["data"], np.float32).reshape(out["shape"])
