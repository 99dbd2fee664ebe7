"""Runs a SavedModel through TensorFlow's C API, the loader TF Serving uses, without TF's Python package.

``TF_LoadSessionFromSavedModel`` calls the same C++ ``LoadSavedModel`` as
``tensorflow_model_server``; this module drives it with ``ctypes`` on the
``libtensorflow_cc.so.2`` that ships in the TensorFlow wheel, locating the
library without importing ``tensorflow`` (so no op registered by the Python
bindings, e.g. ``EagerPyFunc``, is available — as in TF Serving). The
signature's tensor names are read from the MetaGraphDef returned by the
loader, the way TF Serving resolves a ``signature_name``.

Run it as a program in a fresh process (``python -m dolg_tf.export.capi``): it
reads one JSON request on stdin and writes one JSON answer on stdout::

    {"export_dir": "...", "signature": "serving_default",
     "inputs": {"images": {"dtype": "string", "b64": ["...", ...]}}}
    {"inputs": {"pixels": {"dtype": "uint8", "shape": [1, 32, 32, 3], "b64": "..."}}}

Answer: ``{"ok": true, "outputs": {"embedding": {"shape": [...], "data": [...]}},
"signature": {...}, "tensorflow_imported": false}`` or ``{"ok": false,
"stage": "load" | "signature" | "run", "code": <TF_Code>, "message": "..."}``.
:func:`dolg_tf.export.audit.run_with_c_api` wraps the subprocess. The module imports only
the standard library, numpy and the TF-free contract.
"""

from __future__ import annotations

import base64
import ctypes
import importlib.util
import json
import os
import sys

from dolg_tf.export.contract import DEFAULT_SIGNATURE, SERVE_TAG

TF_FLOAT, TF_UINT8, TF_STRING = 1, 4, 7
_DTYPES = {"float32": TF_FLOAT, "uint8": TF_UINT8, "string": TF_STRING}
_TSTRING_SIZE = 24  # sizeof(TF_TString)


class _Output(ctypes.Structure):
    _fields_ = [("oper", ctypes.c_void_p), ("index", ctypes.c_int)]


class _Buffer(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("length", ctypes.c_size_t), ("data_deallocator", ctypes.c_void_p)]


def library_path() -> str:
    """``libtensorflow_cc.so.2`` of the installed TF wheel, found without importing tensorflow."""
    spec = importlib.util.find_spec("tensorflow")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the tensorflow package is not installed")
    for root in spec.submodule_search_locations:
        path = os.path.join(root, "libtensorflow_cc.so.2")
        if os.path.isfile(path):
            return path
    raise FileNotFoundError("libtensorflow_cc.so.2 is not in the tensorflow package")


def _load_library() -> ctypes.CDLL:
    path = library_path()
    # libtensorflow_cc needs libtensorflow_framework from the same folder.
    ctypes.CDLL(os.path.join(os.path.dirname(path), "libtensorflow_framework.so.2"), mode=ctypes.RTLD_GLOBAL)
    lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    p, i, sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
    sigs = {
        "TF_NewStatus": ([], p),
        "TF_DeleteStatus": ([p], None),
        "TF_GetCode": ([p], i),
        "TF_Message": ([p], ctypes.c_char_p),
        "TF_NewGraph": ([], p),
        "TF_DeleteGraph": ([p], None),
        "TF_NewSessionOptions": ([], p),
        "TF_DeleteSessionOptions": ([p], None),
        "TF_NewBuffer": ([], ctypes.POINTER(_Buffer)),
        "TF_DeleteBuffer": ([ctypes.POINTER(_Buffer)], None),
        "TF_LoadSessionFromSavedModel": (
            [p, p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_char_p), i, p, ctypes.POINTER(_Buffer), p],
            p,
        ),
        "TF_CloseSession": ([p, p], None),
        "TF_DeleteSession": ([p, p], None),
        "TF_GraphOperationByName": ([p, ctypes.c_char_p], p),
        "TF_AllocateTensor": ([i, ctypes.POINTER(ctypes.c_int64), i, sz], p),
        "TF_DeleteTensor": ([p], None),
        "TF_TensorData": ([p], p),
        "TF_TensorByteSize": ([p], sz),
        "TF_TensorType": ([p], i),
        "TF_NumDims": ([p], i),
        "TF_Dim": ([p, i], ctypes.c_int64),
        "TF_StringInit": ([p], None),
        "TF_StringCopy": ([p, ctypes.c_char_p, sz], None),
        "TF_SessionRun": (
            [
                p,
                p,
                ctypes.POINTER(_Output),
                ctypes.POINTER(p),
                i,
                ctypes.POINTER(_Output),
                ctypes.POINTER(p),
                i,
                p,
                i,
                p,
                p,
            ],
            None,
        ),
    }
    for name, (args, res) in sigs.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    return lib


# -- a minimal protobuf wire-format reader (only what a SignatureDef needs) ------------


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes):
    """Yields (field_number, wire_type, value) of one message; length-delimited values as bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + length], pos + length
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def _map_entries(entries):
    out = {}
    for entry in entries:
        key = value = None
        for number, _, v in _fields(entry):
            if number == 1:
                key = v.decode()
            elif number == 2:
                value = v
        out[key] = value
    return out


def _tensor_info(buf: bytes) -> dict:
    info = {"name": None, "dtype": None, "shape": None}
    for number, _, v in _fields(buf):
        if number == 1:
            info["name"] = v.decode()
        elif number == 2:
            info["dtype"] = v
        elif number == 3:
            dims = []
            for n2, _, d in _fields(v):
                if n2 == 2:
                    size = 0
                    for n3, _, s in _fields(d):
                        if n3 == 1:
                            size = s - (1 << 64) if s >= 1 << 63 else s
                    dims.append(size)
            info["shape"] = dims
    return info


def signature_defs(meta_graph_def: bytes) -> dict[str, dict]:
    """``{signature: {"inputs": {key: info}, "outputs": {...}, "method_name": str}}`` from a MetaGraphDef."""
    raw = _map_entries(v for n, _, v in _fields(meta_graph_def) if n == 5)
    sigs = {}
    for name, body in raw.items():
        parts = {1: [], 2: []}
        method = ""
        for number, _, v in _fields(body):
            if number in parts:
                parts[number].append(v)
            elif number == 3:
                method = v.decode()
        sigs[name] = {
            "inputs": {k: _tensor_info(v) for k, v in _map_entries(parts[1]).items()},
            "outputs": {k: _tensor_info(v) for k, v in _map_entries(parts[2]).items()},
            "method_name": method,
        }
    return sigs


# -- the run ---------------------------------------------------------------------------


class _CApiError(Exception):
    def __init__(self, stage: str, code: int, message: str):
        super().__init__(message)
        self.stage, self.code, self.message = stage, code, message


def _output(lib, graph, tensor_name: str) -> _Output:
    op_name, _, index = tensor_name.partition(":")
    op = lib.TF_GraphOperationByName(graph, op_name.encode())
    if not op:
        raise _CApiError("signature", 5, f"operation {op_name!r} is not in the loaded graph")
    return _Output(op, int(index or 0))


def _make_tensor(lib, spec: dict):
    import numpy as np

    dtype = spec["dtype"]
    if dtype == "string":
        items = [base64.b64decode(s) for s in spec["b64"]]
        dims = (ctypes.c_int64 * 1)(len(items))
        tensor = lib.TF_AllocateTensor(TF_STRING, dims, 1, _TSTRING_SIZE * len(items))
        base = lib.TF_TensorData(tensor)
        for k, item in enumerate(items):
            element = base + k * _TSTRING_SIZE
            lib.TF_StringInit(element)
            lib.TF_StringCopy(element, item, len(item))
        return tensor
    array = np.frombuffer(base64.b64decode(spec["b64"]), dtype=dtype).reshape(spec["shape"])
    dims = (ctypes.c_int64 * array.ndim)(*array.shape)
    tensor = lib.TF_AllocateTensor(_DTYPES[dtype], dims, array.ndim, array.nbytes)
    ctypes.memmove(lib.TF_TensorData(tensor), array.ctypes.data, array.nbytes)
    return tensor


def run(request: dict) -> dict:
    """Loads ``request["export_dir"]`` with tag ``serve`` and runs one signature (see the module docstring)."""
    import numpy as np

    lib = _load_library()
    status = lib.TF_NewStatus()
    graph = lib.TF_NewGraph()
    options = lib.TF_NewSessionOptions()
    meta = lib.TF_NewBuffer()
    session = None
    tensors = []

    def check(stage):
        code = lib.TF_GetCode(status)
        if code != 0:
            raise _CApiError(stage, code, lib.TF_Message(status).decode(errors="replace"))

    try:
        tags = (ctypes.c_char_p * 1)(SERVE_TAG.encode())
        session = lib.TF_LoadSessionFromSavedModel(
            options, None, request["export_dir"].encode(), tags, 1, graph, meta, status
        )
        check("load")
        sigs = signature_defs(ctypes.string_at(meta.contents.data, meta.contents.length))
        name = request.get("signature", DEFAULT_SIGNATURE)
        if name not in sigs:
            raise _CApiError("signature", 5, f"no signature {name!r}; the export has {sorted(sigs)}")
        sig = sigs[name]
        keys = list(request["inputs"])
        missing = set(sig["inputs"]) - set(keys)
        if missing or set(keys) - set(sig["inputs"]):
            raise _CApiError("signature", 3, f"signature {name!r} takes inputs {sorted(sig['inputs'])}, got {keys}")
        in_ops = (_Output * len(keys))(*[_output(lib, graph, sig["inputs"][k]["name"]) for k in keys])
        tensors = [_make_tensor(lib, request["inputs"][k]) for k in keys]
        in_vals = (ctypes.c_void_p * len(keys))(*tensors)
        out_keys = sorted(sig["outputs"])
        out_ops = (_Output * len(out_keys))(*[_output(lib, graph, sig["outputs"][k]["name"]) for k in out_keys])
        out_vals = (ctypes.c_void_p * len(out_keys))()
        lib.TF_SessionRun(
            session, None, in_ops, in_vals, len(keys), out_ops, out_vals, len(out_keys), None, 0, None, status
        )
        check("run")
        outputs = {}
        for key, tensor in zip(out_keys, out_vals):
            tensors.append(tensor)
            if lib.TF_TensorType(tensor) != TF_FLOAT:
                raise _CApiError("run", 3, f"output {key!r} is not float32")
            shape = [lib.TF_Dim(tensor, d) for d in range(lib.TF_NumDims(tensor))]
            data = np.ctypeslib.as_array(
                ctypes.cast(lib.TF_TensorData(tensor), ctypes.POINTER(ctypes.c_float)), shape=(int(np.prod(shape)),)
            )
            outputs[key] = {"shape": shape, "data": data.astype(float).tolist()}
        return {"ok": True, "outputs": outputs, "signature": sig, "signatures": sorted(sigs)}
    except _CApiError as err:
        return {"ok": False, "stage": err.stage, "code": err.code, "message": err.message}
    finally:
        for tensor in tensors:
            lib.TF_DeleteTensor(tensor)
        if session:
            lib.TF_CloseSession(session, status)
            lib.TF_DeleteSession(session, status)
        lib.TF_DeleteBuffer(meta)
        lib.TF_DeleteSessionOptions(options)
        lib.TF_DeleteGraph(graph)
        lib.TF_DeleteStatus(status)


def main() -> int:
    request = json.loads(sys.stdin.read())
    answer = run(request)
    # The proof is only worth something if TF's Python package never loaded.
    answer["tensorflow_imported"] = "tensorflow" in sys.modules
    sys.stdout.write(json.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
