"""``dolg serve`` against a real server process on loopback, through raw gRPC stubs and raw HTTP.

One private server is started for the whole module on two versions of the tiny
model (the session's tiny export and a one-scale export with other weights) with labels; the last
tests install a third version while it runs and then stop it with SIGTERM. Every
embedding the server returns is compared with the same SavedModel called in this
process.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import select
import signal
import subprocess
import threading
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from dolg_tf.errors import ServingError
from dolg_tf.server import VersionPolicy, parse_version_labels
from dolg_tf.server.process import ServerProcess, cli_command
from dolg_tf.server.rest import json_to_array, parse_predict_body
from tests.conftest import ONE_SCALE_EXPORT, install_version
from tests.images import encode as _encode
from tests.images import image_corpus
from tests.images import photo as _photo

integration = pytest.mark.integration
pytestmark = pytest.mark.xdist_group("serving")
MAX_MESSAGE = 4 << 20
REST_MAX_CONNECTIONS = 12
START_TIMEOUT_S = 180


# --- images ---------------------------------------------------------------------------------
GOOD_JPEG = _encode(_photo(), "JPEG", quality=92)
GOOD_PNG = _encode(_photo(40, 30, seed=1), "PNG")

# name -> (bytes, decodable): decodable inputs must give the in-process embedding,
# the others INVALID_ARGUMENT / HTTP 400.
IMAGE_CORPUS = image_corpus()


# --- the server -------------------------------------------------------------------------------
class Server:
    """The module's ``dolg serve`` (a :class:`ServerProcess`) with raw gRPC stubs, raw HTTP, in-process references."""

    def __init__(self, process: ServerProcess, next_version: str):
        self.process, self.proc, self.ready, self.base = process, process.proc, process.info, process.base_path
        self.next_version = next_version  # installed as version 3 by the lifecycle tests
        self.channel = grpc.insecure_channel(
            process.grpc_target,
            options=[("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)],
        )
        self.predict = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.models = model_service_pb2_grpc.ModelServiceStub(self.channel)
        self._reference: dict[str, object] = {}

    def http(self, method: str, path: str, body: dict | bytes | None = None) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", self.ready["rest_port"], timeout=60)
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        payload = json.loads(response.read())
        conn.close()
        return response.status, payload

    def reference(self, version: int, signature: str, **inputs) -> np.ndarray:
        """The same SavedModel version called in this process."""
        key = f"{version}"
        if key not in self._reference:
            self._reference[key] = tf.saved_model.load(os.path.join(self.base, str(version)))
        return self._reference[key].signatures[signature](**inputs)["embedding"].numpy()

    def log(self) -> str:
        return self.log_all()[-4000:]

    def log_all(self) -> str:
        return self.process.log()


@pytest.fixture(scope="module")
def server(tiny_export_factory, tmp_path_factory):
    base = str(tmp_path_factory.mktemp("serve") / "dolg")
    # Different weights: versions give different embeddings. Version 1 is the session's tiny export; 2 and 3
    # are the one-scale exports the fault tests serve too.
    install_version(tiny_export_factory(), base, 1)
    install_version(tiny_export_factory(seed=101, **ONE_SCALE_EXPORT), base, 2)
    next_version = tiny_export_factory(seed=102, **ONE_SCALE_EXPORT)
    process = ServerProcess(
        base,
        log_path=str(tmp_path_factory.mktemp("serve-log") / "server.log"),
        verbose=True,
        timeout=START_TIMEOUT_S,
        extra=[
            "--tensorflow-intra-op-parallelism", "1", "--tensorflow-inter-op-parallelism", "2",
            "--max-message-bytes", str(MAX_MESSAGE),
            "--version-policy", "all", "--version-labels", "stable=1,canary=2,next=3", "--poll-seconds", "0.5",
            # "next" names a version installed later, which TF Serving allows only with this flag.
            "--allow_version_labels_for_unavailable_models",
            "--max_num_load_retries", "1", "--load_retry_interval_micros", "200000",
            "--rest_api_max_connections", str(REST_MAX_CONNECTIONS),
        ],
    )  # fmt: skip
    with process:
        yield Server(process, next_version)


# --- helpers ------------------------------------------------------------------------------------
def _bytes_request(images: list[bytes], *, version=None, label=None, signature="") -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "dolg"
    if version is not None:
        request.model_spec.version.value = version
    if label is not None:
        request.model_spec.version_label = label
    request.model_spec.signature_name = signature
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(np.array(images, dtype=object), dtype=tf.string))
    return request


def _pixels_request(pixels: np.ndarray, version=None) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "dolg"
    request.model_spec.signature_name = "embed_pixels"
    if version is not None:
        request.model_spec.version.value = version
    request.inputs["pixels"].CopyFrom(tf.make_tensor_proto(pixels))
    return request


def _grpc_error(call, *args) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, timeout=60)
    return info.value


def _b64(data: bytes) -> dict:
    return {"b64": base64.b64encode(data).decode("ascii")}


def _assert_close(a, b):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=1e-5, rtol=0)


# --- units: no server needed -------------------------------------------------------------------
def test_version_policy_and_labels_parse_and_reject():
    assert VersionPolicy.parse("latest").select([1, 3, 2]) == {3}
    assert VersionPolicy.parse("latest:2").select([1, 3, 2]) == {2, 3}
    assert VersionPolicy.parse("all").select([1, 2]) == {1, 2}
    assert VersionPolicy.parse("specific:1,4").select([1, 2, 3]) == {1}
    assert parse_version_labels("stable=1, canary=2") == {"stable": 1, "canary": 2}
    for bad in ("latest:0", "newest", "specific:a", "all:1"):
        with pytest.raises(ServingError, match="version policy"):
            VersionPolicy.parse(bad)
    with pytest.raises(ServingError, match="name=VERSION"):
        parse_version_labels("stable:1")


def test_serve_cli_rejects_bad_arguments(tmp_path, capsys):
    from dolg_tf.cli import main

    assert main(["serve", "--model-base-path", str(tmp_path / "missing"), "--port", "0"]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert main(["serve", "--model-base-path", str(tmp_path), "--version-policy", "newest"]) == 2
    assert "version policy" in capsys.readouterr().err
    assert main(["serve", "--model-base-path", str(tmp_path), "--port", "70000"]) == 2
    assert "TCP port" in capsys.readouterr().err
    version_dir = tmp_path / "dolg" / "1"
    version_dir.mkdir(parents=True)
    (version_dir / "saved_model.pb").write_bytes(b"")
    assert main(["serve", "--model-base-path", str(version_dir), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "looks like a version directory" in err and f"--model-base-path {version_dir.parent}" in err, err


@integration
def test_sigterm_while_waiting_for_a_first_version(tmp_path):
    cmd = cli_command("serve", "--model-base-path", str(tmp_path), "--port", "0", "--rest-api-port", "0")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        seen = ""
        while "waiting" not in seen and time.monotonic() < deadline and proc.poll() is None:
            if select.select([proc.stderr], [], [], 0.5)[0]:
                seen += proc.stderr.readline()
        assert "no servable version" in seen, seen
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and '"stopped": true' in out


def test_rest_json_conversion_is_strict():
    pixels = json_to_array([[[1, 2, 3]]], tf.uint8, "x")
    assert pixels.dtype == np.uint8 and pixels.shape == (1, 1, 3)
    assert json_to_array([_b64(b"\x00\xff"), "a"], tf.string, "x").tolist() == [b"\x00\xff", b"a"]
    for value, dtype, message in (
        ([[1.5]], tf.uint8, "expects uint8"),
        ([[300]], tf.uint8, r"\[0, 255\]"),
        ([[1, 2], [3]], tf.uint8, "ragged"),
        ([{"b64": "***"}], tf.string, "base64"),
        ([1, 2], tf.string, "expected a string"),
    ):
        with pytest.raises(Exception, match=message):
            json_to_array(value, dtype, "x")
    arrays, layout = parse_predict_body({"instances": [_b64(b"a"), _b64(b"b")]}, {"images": tf.string})
    assert layout == "row" and arrays["images"].tolist() == [b"a", b"b"]
    with pytest.raises(Exception, match="only one of"):
        parse_predict_body({"instances": [1], "inputs": [1]}, {"images": tf.string})


# --- predict ---------------------------------------------------------------------------------------
@integration
def test_grpc_predict_both_signatures_match_in_process(server):
    response = server.predict.Predict(_bytes_request([GOOD_JPEG, GOOD_PNG], version=1), timeout=60)
    got = tf.make_ndarray(response.outputs["embedding"])
    want = server.reference(1, "serving_default", images=tf.constant([GOOD_JPEG, GOOD_PNG]))
    assert got.shape == (2, want.shape[1]) and got.dtype == np.float32
    _assert_close(got, want)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert response.model_spec.name == "dolg" and response.model_spec.version.value == 1
    assert response.model_spec.signature_name == "serving_default"

    pixels = np.stack([_photo(40, 56, seed=9), _photo(40, 56, seed=10)])
    response = server.predict.Predict(_pixels_request(pixels, version=1), timeout=60)
    _assert_close(tf.make_ndarray(response.outputs["embedding"]), server.reference(1, "embed_pixels", pixels=pixels))
    assert response.model_spec.signature_name == "embed_pixels"


@integration
def test_rest_predict_row_and_columnar_match_in_process(server):
    want = server.reference(2, "serving_default", images=tf.constant([GOOD_JPEG, GOOD_PNG]))
    status, body = server.http(
        "POST", "/v1/models/dolg/versions/2:predict", {"instances": [_b64(GOOD_JPEG), _b64(GOOD_PNG)]}
    )
    assert status == 200, body
    _assert_close(body["predictions"], want)  # single output: one list per instance, no output name
    status, body = server.http(
        "POST", "/v1/models/dolg/labels/canary:predict", {"inputs": {"images": [_b64(GOOD_JPEG), _b64(GOOD_PNG)]}}
    )
    assert status == 200, body
    _assert_close(body["outputs"], want)

    pixels = _photo(32, 40, seed=11)
    status, body = server.http(
        "POST",
        "/v1/models/dolg/versions/2:predict",
        {"signature_name": "embed_pixels", "instances": [{"pixels": pixels.tolist()}]},
    )
    assert status == 200, body
    _assert_close(body["predictions"], server.reference(2, "embed_pixels", pixels=pixels[None]))


@integration
def test_version_and_label_selection(server):
    v1 = server.predict.Predict(_bytes_request([GOOD_JPEG], version=1), timeout=60)
    stable = server.predict.Predict(_bytes_request([GOOD_JPEG], label="stable"), timeout=60)
    canary = server.predict.Predict(_bytes_request([GOOD_JPEG], label="canary"), timeout=60)
    assert stable.model_spec.version.value == 1 and canary.model_spec.version.value == 2
    _assert_close(tf.make_ndarray(stable.outputs["embedding"]), tf.make_ndarray(v1.outputs["embedding"]))
    # The two versions hold different weights, so selecting the wrong one would show.
    diff = np.abs(tf.make_ndarray(canary.outputs["embedding"]) - tf.make_ndarray(v1.outputs["embedding"])).max()
    assert diff > 1e-3
    latest = server.predict.Predict(_bytes_request([GOOD_JPEG]), timeout=60)
    assert latest.model_spec.version.value == max(server.ready["versions"])
    # A label for a version that is not loaded yet: NOT_FOUND naming the version, as TF Serving answers.
    err = _grpc_error(server.predict.Predict, _bytes_request([GOOD_JPEG], label="next"))
    assert err.code() == grpc.StatusCode.NOT_FOUND and "3" in err.details(), err.details()


@integration
def test_unknown_model_version_label_signature_are_not_found(server):
    bad_model = _bytes_request([GOOD_JPEG])
    bad_model.model_spec.name = "resnet"
    for request in (
        bad_model,
        _bytes_request([GOOD_JPEG], version=99),
        _bytes_request([GOOD_JPEG], label="nightly"),
        _bytes_request([GOOD_JPEG], signature="classify_things"),
    ):
        assert _grpc_error(server.predict.Predict, request).code() == grpc.StatusCode.NOT_FOUND
    for path, body in (
        ("/v1/models/resnet:predict", {"instances": [_b64(GOOD_JPEG)]}),
        ("/v1/models/dolg/versions/99:predict", {"instances": [_b64(GOOD_JPEG)]}),
        ("/v1/models/dolg:predict", {"signature_name": "nope", "instances": [_b64(GOOD_JPEG)]}),
    ):
        status, payload = server.http("POST", path, body)
        assert status == 404 and payload["error"], (path, payload)
    status, payload = server.http("GET", "/v1/models/resnet")
    assert status == 404 and "resnet" in payload["error"]


# --- metadata and status -------------------------------------------------------------------------
@integration
def test_metadata_grpc_and_rest(server):
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "dolg"
    request.model_spec.version.value = 1
    response = server.predict.GetModelMetadata(request, timeout=60)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signatures)
    default = signatures.signature_def["serving_default"]
    assert default.inputs["images"].dtype == tf.string.as_datatype_enum
    assert [d.size for d in default.inputs["images"].tensor_shape.dim] == [-1]
    pixels = signatures.signature_def["embed_pixels"].inputs["pixels"]
    assert pixels.dtype == tf.uint8.as_datatype_enum and [d.size for d in pixels.tensor_shape.dim] == [-1, -1, -1, 3]
    assert response.model_spec.version.value == 1

    status, body = server.http("GET", "/v1/models/dolg/versions/1/metadata")
    assert status == 200, body
    assert body["model_spec"] == {"name": "dolg", "version": "1", "signature_name": ""}
    rest_default = body["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert rest_default["inputs"]["images"]["dtype"] == "DT_STRING"
    assert rest_default["outputs"]["embedding"]["dtype"] == "DT_FLOAT"
    assert rest_default["method_name"] == "tensorflow/serving/predict"

    empty = get_model_metadata_pb2.GetModelMetadataRequest()
    empty.model_spec.name = "dolg"
    assert _grpc_error(server.predict.GetModelMetadata, empty).code() == grpc.StatusCode.INVALID_ARGUMENT


@integration
def test_model_status_grpc_and_rest(server):
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "dolg"
    response = server.models.GetModelStatus(request, timeout=60)
    states = {s.version: s for s in response.model_version_status}
    assert set(states) >= {1, 2}
    assert all(
        s.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE and s.status.error_code == 0
        for s in states.values()
    )

    status, body = server.http("GET", "/v1/models/dolg/versions/2")
    assert status == 200, body
    assert body == {
        "model_version_status": [
            {"version": "2", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
        ]
    }
    status, body = server.http("GET", "/v1/models/dolg/labels/stable")
    assert status == 200 and [s["version"] for s in body["model_version_status"]] == ["1"], body
    status, body = server.http("GET", "/v1/models/dolg/versions/42")
    assert status == 404 and "42" in body["error"]
    status, body = server.http("GET", "/v1/nonsense/path")
    assert status == 400 and "Malformed request" in body["error"]
    status, body = server.http("DELETE", "/v1/models/dolg")
    assert status == 400 and "Malformed request: DELETE" in body["error"]
    status, body = server.http("GET", "/not/the/api")
    assert status == 404 and body["error"]


# --- bad input --------------------------------------------------------------------------------------
@integration
@pytest.mark.parametrize("name", sorted(IMAGE_CORPUS))
def test_image_corpus_grpc_and_rest(server, name):
    data, decodable = IMAGE_CORPUS[name]
    request = _bytes_request([data], version=1)
    status, body = server.http("POST", "/v1/models/dolg/versions/1:predict", {"instances": [_b64(data)]})
    if decodable:
        want = server.reference(1, "serving_default", images=tf.constant([data]))
        _assert_close(tf.make_ndarray(server.predict.Predict(request, timeout=60).outputs["embedding"]), want)
        assert status == 200, body
        _assert_close(body["predictions"], want)
    else:
        err = _grpc_error(server.predict.Predict, request)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
        assert "images[0]" in err.details() or "image" in err.details().lower(), err.details()
        assert status == 400 and body["error"] == err.details()
    # The server keeps serving after every bad request.
    good = server.predict.Predict(_bytes_request([GOOD_JPEG], version=1), timeout=60)
    assert tf.make_ndarray(good.outputs["embedding"]).shape[0] == 1


@integration
def test_malformed_tensors_and_json_are_invalid_argument(server):
    zero = _bytes_request([], version=1)
    wrong_dtype = _bytes_request([GOOD_JPEG], version=1)
    wrong_dtype.inputs["images"].CopyFrom(tf.make_tensor_proto(np.zeros((1, 8), np.float32)))
    wrong_rank = _bytes_request([GOOD_JPEG], version=1)
    wrong_rank.inputs["images"].CopyFrom(tf.make_tensor_proto(np.array([[GOOD_JPEG]], dtype=object), dtype=tf.string))
    extra_input = _bytes_request([GOOD_JPEG], version=1)
    extra_input.inputs["mask"].CopyFrom(tf.make_tensor_proto(np.zeros(1, np.float32)))
    pixels_rank3 = _pixels_request(_photo(8, 8), version=1)
    pixels_float = _pixels_request(_photo(8, 8)[None].astype(np.float32), version=1)
    pixels_4ch = _pixels_request(np.zeros((1, 8, 8, 4), np.uint8), version=1)
    huge_claim = _pixels_request(np.zeros((1, 1, 1, 3), np.uint8), version=1)
    huge_claim.inputs["pixels"].tensor_shape.dim[1].size = 1 << 20  # one value "filling" a 2^40-pixel tensor
    huge_claim.inputs["pixels"].tensor_shape.dim[2].size = 1 << 20
    for label, request in (
        ("zero-length batch", zero),
        ("wrong dtype", wrong_dtype),
        ("wrong rank", wrong_rank),
        ("unexpected input", extra_input),
        ("pixels rank 3", pixels_rank3),
        ("pixels float32", pixels_float),
        ("pixels 4 channels", pixels_4ch),
        ("shape beyond the byte limit", huge_claim),
    ):
        err = _grpc_error(server.predict.Predict, request)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (label, err.code(), err.details())
        assert err.details(), label

    for label, body in (
        ("zero-length instances", {"instances": []}),
        ("zero-length inputs", {"inputs": []}),
        ("numbers for a string input", {"instances": [1.0, 2.0]}),
        ("wrong rank", {"inputs": [[_b64(GOOD_JPEG)]]}),
        ("bad base64", {"instances": [{"b64": "!!!"}]}),
        ("no instances or inputs", {"signature_name": "serving_default"}),
        ("float pixels", {"signature_name": "embed_pixels", "instances": [[[[0.5, 0.5, 0.5]]]]}),
        ("pixels rank 3", {"signature_name": "embed_pixels", "instances": [[[1, 2, 3]]]}),
        ("not json", b"{this is not json"),
        ("empty body", b""),
    ):
        status, payload = server.http("POST", "/v1/models/dolg/versions/1:predict", body)
        assert status == 400 and payload["error"], (label, status, payload)

    status, body = server.http("POST", "/v1/models/dolg/versions/1:predict", {"instances": [_b64(GOOD_JPEG)]})
    assert status == 200 and len(body["predictions"]) == 1


@integration
def test_rest_chunked_body(server):
    body = json.dumps({"instances": [_b64(GOOD_JPEG)]}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", server.ready["rest_port"], timeout=60)
    conn.request("POST", "/v1/models/dolg/versions/1:predict", body=iter([body[:100], body[100:]]), encode_chunked=True)
    response = conn.getresponse()
    payload = json.loads(response.read())
    conn.close()
    assert response.status == 200, payload
    _assert_close(payload["predictions"], server.reference(1, "serving_default", images=tf.constant([GOOD_JPEG])))


@integration
def test_message_size_limit(server):
    big = os.urandom(MAX_MESSAGE + 1024)
    assert (
        _grpc_error(server.predict.Predict, _bytes_request([big], version=1)).code()
        == grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    status, payload = server.http("POST", "/v1/models/dolg/versions/1:predict", big)
    assert status == 413 and "bytes" in payload["error"]
    assert server.predict.Predict(_bytes_request([GOOD_JPEG], version=1), timeout=60).outputs["embedding"].dtype


def _raw_http(server, data: bytes) -> tuple[int, dict, dict]:
    """Sends raw bytes to the REST port; returns (status, JSON body, headers) of the answer."""
    import socket

    with socket.create_connection(("127.0.0.1", server.ready["rest_port"]), timeout=60) as sock:
        sock.sendall(data)
        response = http.client.HTTPResponse(sock)
        response.begin()
        body = response.read()
        headers = {k.lower(): v for k, v in response.getheaders()}
    assert headers.get("content-type") == "application/json", (response.status, headers, body[:200])
    return response.status, json.loads(body), headers


@integration
def test_http_level_errors_are_tf_serving_json(server):
    many_headers = "".join(f"X-H{i}: v\r\n" for i in range(200))
    for label, data, status, words in (
        ("garbage request line", b"\x16\x03\x01 garbage\r\n\r\n", 400, "request"),
        ("100 KB URL", b"GET /v1/models/" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "uri"),
        ("200 headers", f"GET /v1/models/dolg HTTP/1.1\r\n{many_headers}\r\n".encode(), 431, "header"),
        ("100 KB header line", b"GET /v1/models/dolg HTTP/1.1\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n", 431, "line"),
        (
            "Content-Length: abc",
            b"POST /v1/models/dolg:predict HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}",
            400,
            "invalid content-length",
        ),
        (
            "bad chunk size",
            b"POST /v1/models/dolg:predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"zz\r\n{}\r\n0\r\n\r\n",
            400,
            "bad chunk",
        ),
    ):
        got, payload, headers = _raw_http(server, data)
        assert got == status and words in payload["error"].lower(), (label, got, payload)
        assert headers.get("connection") == "close", (label, headers)
    assert (
        "-1 bytes"
        not in _raw_http(server, b"POST /v1/models/dolg:predict HTTP/1.1\r\nContent-Length: abc\r\n\r\n")[1]["error"]
    )


@integration
def test_rest_plain_string_gets_a_b64_hint(server):
    status, payload = server.http(
        "POST", "/v1/models/dolg/versions/1:predict", {"instances": ["not base64 image bytes"]}
    )
    assert status == 400 and '{"b64":' in payload["error"] and "plain JSON text" in payload["error"], payload
    # The graph's own message is kept in front of the hint.
    assert payload["error"].index("images[0]") < payload["error"].index("b64"), payload


@integration
def test_rest_connections_are_capped_with_503(server):
    import socket

    cap = REST_MAX_CONNECTIONS
    held = [socket.create_connection(("127.0.0.1", server.ready["rest_port"]), timeout=30) for _ in range(cap)]
    try:
        time.sleep(0.5)  # all accepted by the server's loop
        status, payload, headers = _raw_http(server, b"GET /v1/models/dolg HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 503 and str(cap) in payload["error"] and headers.get("connection") == "close", payload
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the held connections' threads end as they see the close
        status, payload = server.http("GET", "/v1/models/dolg/versions/1")
        if status == 200:
            break
        time.sleep(0.2)
    assert status == 200, payload


@integration
def test_loading_is_logged_with_progress(server):
    log = server.log_all()
    for version in (1, 2):
        assert f"loading dolg version {version} from" in log and f"dolg version {version} is available" in log, log[
            -2000:
        ]


@integration
def test_label_for_an_unavailable_version_is_refused_at_start(server):
    cmd = cli_command(
        "serve", "--model-base-path", server.base, "--port", "0", "--rest-api-port", "-1", "--no-warmup",
        "--version-labels", "stable=1",  # the default policy (latest) serves version 2 (or 3) only
    )  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=START_TIMEOUT_S)
    assert done.returncode == 2, done.stderr[-2000:]
    assert (
        "Request to assign label to version 1 of model dolg, which is not currently available for inference"
        in done.stderr
    ), done.stderr[-2000:]
    assert "--allow_version_labels_for_unavailable_models" in done.stderr


def _without_root_file_access() -> None:
    """In the child, before exec: root loses the capabilities that bypass file permissions (Linux)."""
    if os.geteuid() != 0:
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_capbset_drop, cap_dac_override, cap_dac_read_search = 24, 1, 2
    for cap in (cap_dac_override, cap_dac_read_search):
        if libc.prctl(pr_capbset_drop, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


@integration
def test_an_unreadable_version_is_named():
    import tempfile

    base = tempfile.mkdtemp(prefix="dolg-unreadable-")
    try:
        version = os.path.join(base, "1")
        os.makedirs(version)
        with open(os.path.join(version, "saved_model.pb"), "wb") as f:
            f.write(b"never read")
        os.chmod(base, 0o755)
        os.chmod(version, 0o000)
        cmd = cli_command(
            "serve", "--model-base-path", base, "--port", "0", "--rest-api-port", "-1",
            "--wait-for-model-seconds", "0.5",
        )  # fmt: skip
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=START_TIMEOUT_S, preexec_fn=_without_root_file_access
        )
    finally:
        os.chmod(os.path.join(base, "1"), 0o700)
        import shutil

        shutil.rmtree(base)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "permission denied" in done.stderr and os.path.join(base, "1") in done.stderr, done.stderr[-2000:]


# --- load ---------------------------------------------------------------------------------------------
@integration
def test_eight_concurrent_clients_fifty_requests_each(server):
    images = [GOOD_JPEG, GOOD_PNG]
    want = {i: server.reference(1, "serving_default", images=tf.constant([im]))[0] for i, im in enumerate(images)}
    errors: list[str] = []
    done = [0] * 8

    def client(k: int):
        for n in range(50):
            i = (k + n) % 2
            try:
                if k % 2:  # half the clients over gRPC, half over REST
                    got = tf.make_ndarray(
                        server.predict.Predict(_bytes_request([images[i]], version=1), timeout=120).outputs["embedding"]
                    )[0]
                else:
                    status, body = server.http(
                        "POST", "/v1/models/dolg/versions/1:predict", {"instances": [_b64(images[i])]}
                    )
                    assert status == 200, body
                    got = np.asarray(body["predictions"][0], np.float32)
                if np.abs(got - want[i]).max() > 1e-5:
                    errors.append(f"client {k} request {n}: wrong embedding")
                done[k] += 1
            except Exception as err:  # every failure is collected and reported
                errors.append(f"client {k} request {n}: {err!r}")

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors, errors[:5]
    assert done == [50] * 8


# --- lifecycle (these run last: they change the server) -------------------------------------------
@integration
def test_new_version_is_picked_up_without_restart(server):
    install_version(server.next_version, server.base, 3)
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "dolg"
    request.model_spec.version.value = 3
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            state = server.models.GetModelStatus(request, timeout=30).model_version_status[0].state
            if state == get_model_status_pb2.ModelVersionStatus.AVAILABLE:
                break
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.NOT_FOUND
        time.sleep(0.5)
    else:
        raise AssertionError(f"version 3 never became available:\n{server.log()}")
    latest = server.predict.Predict(_bytes_request([GOOD_JPEG]), timeout=60)
    assert latest.model_spec.version.value == 3
    assert server.predict.Predict(_bytes_request([GOOD_JPEG], label="next"), timeout=60).model_spec.version.value == 3
    _assert_close(
        tf.make_ndarray(latest.outputs["embedding"]),
        server.reference(3, "serving_default", images=tf.constant([GOOD_JPEG])),
    )
    # A half-written directory (no saved_model.pb yet) is ignored; a corrupt version fails alone
    # (state END with its error) while the others keep serving.
    os.makedirs(os.path.join(server.base, "4", "variables"))
    os.makedirs(os.path.join(server.base, "5"))
    with open(os.path.join(server.base, "5", "saved_model.pb"), "wb") as f:
        f.write(b"this is not a SavedModel")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status, body = server.http("GET", "/v1/models/dolg")
        states = {s["version"]: s for s in body["model_version_status"]}
        if "5" in states and states["5"]["state"] == "END":
            break
        time.sleep(0.5)
    assert set(states) == {"1", "2", "3", "5"}, body
    assert states["5"]["status"]["error_code"] != "OK" and "failed to load" in states["5"]["status"]["error_message"]
    assert all(states[v]["state"] == "AVAILABLE" for v in ("1", "2", "3"))
    latest = server.predict.Predict(_bytes_request([GOOD_JPEG]), timeout=60)
    assert latest.model_spec.version.value == 3


@integration
def test_rest_edge_requests_get_json_answers(server):
    status, payload = server.http("GET", "/v1/models/dolg/versions/99999999999999999999999")
    assert status == 404 and "not found" in payload["error"].lower()  # beyond int64: no such version
    deep = b'{"instances":' + b"[" * 5000 + b"]" * 5000 + b"}"
    status, payload = server.http("POST", "/v1/models/dolg/versions/1:predict", deep)
    assert status == 400 and "nested too deeply" in payload["error"]
    conn = http.client.HTTPConnection("127.0.0.1", server.ready["rest_port"], timeout=30)
    conn.request("OPTIONS", "/v1/models/dolg")
    response = conn.getresponse()
    assert response.status == 400 and "Malformed request" in json.loads(response.read())["error"]
    conn.close()


@integration
def test_sigterm_lets_a_rest_request_in_progress_finish(server):
    """A request whose body is still arriving when SIGTERM comes is answered, then the server exits."""
    import socket

    body = json.dumps({"instances": [_b64(GOOD_JPEG)]}).encode()
    head = (
        f"POST /v1/models/dolg/versions/1:predict HTTP/1.1\r\nHost: x\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    sock = socket.create_connection(("127.0.0.1", server.ready["rest_port"]), timeout=60)
    sock.sendall(head + body[:10])
    time.sleep(0.5)  # the handler is now reading the body
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(1.0)  # the server is draining, not gone
    sock.sendall(body[10:])
    response = http.client.HTTPResponse(sock)
    response.begin()
    payload = json.loads(response.read())
    sock.close()
    assert response.status == 200 and len(payload["predictions"]) == 1, (payload, server.log())
    assert server.proc.wait(60) == 0, server.log()
    deadline = time.monotonic() + 10  # the launcher's reader thread reads stdout to its end
    while '"stopped": true' not in server.process.output() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert '"stopped": true' in server.process.output()
