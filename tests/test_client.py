"""dolg_tf.client and ``dolg embed``: unit checks without a server, then against a real ``dolg serve``.

The server tests talk to the session's ``dolg serve`` (``tiny_server`` in tests/conftest.py: the tiny
model exported with 64-pixel images, two scales, at most 4 images per request) on loopback. Every
embedding is compared with the same SavedModel called in this process: the
``serving_default`` signature on the same bytes for files and bytes, and the
``embed_pixels`` signature on the raw pixels for arrays and PIL images (so the
PNG the client sends is proven lossless). The last server test stops a private
server in the middle of a call and starts another on the same ports.
"""

from __future__ import annotations

import argparse
import http.client
import http.server
import io
import json
import os
import pathlib
import socket
import ssl
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import dolg_tf.client as dc
from dolg_tf.cli import main as cli_main
from dolg_tf.client import Client, pack_requests, prepare
from dolg_tf.client.inputs import Limits, precheck
from dolg_tf.client.transports import GrpcTransport, RestTransport
from dolg_tf.errors import (
    ClientError,
    ConfigError,
    InvalidImageError,
    ModelNotFoundError,
    ServerUnavailableError,
    WrongProtocolError,
)
from tests.conftest import SERVE_FLAGS
from tests.images import encode as _encode
from tests.images import photo, png_claiming

ATOL = 1e-5
integration = pytest.mark.integration
pytestmark = pytest.mark.xdist_group("client")


# --- images ---------------------------------------------------------------------------------
def _photo(h: int = 40, w: int = 56, seed: int = 0) -> np.ndarray:
    return photo(h, w, seed, noise=25.0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- units: no server -------------------------------------------------------------------------
@integration
def test_import_loads_neither_tensorflow_nor_keras_nor_the_model():
    code = (
        "import sys, time; t = time.perf_counter(); import dolg_tf.client; dt = time.perf_counter() - t\n"
        "heavy = sorted(m for m in ('tensorflow', 'keras', 'dolg_tf.model', 'tensorflow.python') if m in sys.modules)\n"
        "print(heavy, round(dt, 3))\n"
        # TensorFlow imported afterwards must be whole, and build the same TensorProto class.
        "import numpy as np, tensorflow as tf\n"
        "from dolg_tf.client import _protos as pb\n"
        "p = tf.make_tensor_proto(np.zeros((2, 3), np.float32))\n"
        "r = pb.predict_pb2.PredictRequest(); r.inputs['x'].CopyFrom(p)\n"
        "print(type(p) is type(r.inputs['x']), tf.make_ndarray(r.inputs['x']).shape)\n"
    )
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="-1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    first, second = out.stdout.strip().splitlines()[-2:]
    assert first.startswith("[]"), f"importing dolg_tf.client imported {first}"
    assert second == "True (2, 3)"


def test_prepare_sends_files_and_bytes_unchanged_and_arrays_as_lossless_png(tmp_path):
    rgb = _photo()
    jpeg = _encode(rgb, "JPEG", quality=90)
    (tmp_path / "a.jpg").write_bytes(jpeg)
    assert prepare(str(tmp_path / "a.jpg"), 0) == jpeg
    assert prepare(tmp_path / "a.jpg", 0) == jpeg
    assert prepare(bytearray(jpeg), 0) == jpeg
    for item, expected in (
        (rgb, rgb),
        (rgb[::2, ::3], rgb[::2, ::3]),  # non-contiguous view
        (rgb[..., 0], rgb[..., 0]),
        (rgb[..., :1], rgb[..., 0]),
        (Image.fromarray(rgb), rgb),
        (Image.fromarray(rgb).convert("RGBA"), rgb),  # alpha dropped, as the server's decoder does
        (Image.fromarray(rgb).convert("P"), np.asarray(Image.fromarray(rgb).convert("P").convert("RGB"))),
    ):
        data = prepare(item, 3)
        assert data[:4] == b"\x89PNG"
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), expected)


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda d: str(d / "missing.jpg"), "no such file"),
        (lambda d: str(d), "not a regular file"),
        (lambda d: b"", "empty image bytes"),
        (lambda d: b"hello, not an image", "not a JPEG, PNG, GIF, BMP or WebP"),
        (lambda d: _encode(_photo(), "PNG")[:200], "corrupt or unreadable PNG"),
        (lambda d: _encode(_photo(), "TIFF"), "not a JPEG, PNG, GIF, BMP or WebP"),
        (lambda d: png_claiming(30000, 30000), "decompression bomb"),
        (lambda d: png_claiming(8000, 6000), "48000000 pixels, over the server's limit of 40000000"),
        (lambda d: _photo().astype(np.float32), "must be uint8"),
        (lambda d: np.zeros((8, 8, 4), np.uint8), r"shape \(H, W\)"),
        (lambda d: np.zeros((0, 8, 3), np.uint8), "empty image size"),
        (lambda d: Image.new("I;16", (8, 8)), "not 8-bit"),
        (lambda d: 42, "unsupported input type int"),
    ],
)
def test_prepare_refuses_bad_inputs_naming_the_index(tmp_path, make, reason):
    item = make(tmp_path)
    with pytest.raises(InvalidImageError, match=reason) as info:
        prepare(item, 7)
    assert info.value.index == 7 and str(info.value).startswith("image 7: ")


def test_prepare_enforces_the_servers_byte_and_pixel_limits(tmp_path):
    png = _encode(_photo(40, 56), "PNG")
    (tmp_path / "a.png").write_bytes(png)
    small = Limits(max_image_bytes=len(png) - 1, max_image_pixels=10_000)
    for item in (png, str(tmp_path / "a.png")):
        with pytest.raises(InvalidImageError, match="over the server's limit") as info:
            prepare(item, 2, small)
        assert info.value.index == 2
        with pytest.raises(InvalidImageError, match="over the server's limit"):
            precheck(item, 2, small)
    with pytest.raises(InvalidImageError, match="2240 pixels, over the server's limit of 2000"):
        prepare(_photo(40, 56), 1, Limits(max_image_pixels=2000))


def test_pack_requests_keeps_order_and_respects_batch_and_byte_limits():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 900, 200)
    items = [(i, b"x" * int(n)) for i, n in enumerate(sizes)]
    for batch_size, max_bytes in ((1, 10_000), (4, 2_000), (16, 2_500), (1000, 1_000)):
        batches = list(pack_requests(iter(items), batch_size, max_bytes, GrpcTransport.item_cost, 50))
        assert [i for b in batches for i, _ in b] == list(range(len(items)))
        for b in batches:
            assert 1 <= len(b) <= batch_size
            assert 50 + sum(GrpcTransport.item_cost(len(d)) for _, d in b) <= max_bytes
        # Greedy: a batch is closed only when the next image would not fit.
        for b, nxt in zip(batches, batches[1:]):
            cost = 50 + sum(GrpcTransport.item_cost(len(d)) for _, d in b)
            assert len(b) == batch_size or cost + GrpcTransport.item_cost(len(nxt[0][1])) > max_bytes
    rest = list(pack_requests(iter(items), 1000, 3_000, RestTransport.item_cost, 50))
    grpc_ = list(pack_requests(iter(items), 1000, 3_000, GrpcTransport.item_cost, 50))
    assert len(rest) > len(grpc_)  # base64 JSON is a third larger
    with pytest.raises(InvalidImageError, match="over max_message_bytes=500") as info:
        list(pack_requests(iter([(0, b"x" * 10), (1, b"x" * 600)]), 8, 500, GrpcTransport.item_cost, 50))
    assert info.value.index == 1


def test_client_rejects_bad_options():
    for kwargs, match in (
        (dict(protocol="http"), "protocol"),
        (dict(version=1, version_label="stable"), "either version or version_label"),
        (dict(timeout=0), "timeout"),
        (dict(batch_size=0), "batch_size"),
        (dict(retries=-1), "retries"),
        (dict(protocol="rest", target="ftp://x:1"), "http"),
        (dict(protocol="rest", credentials=object()), "credentials"),
        (dict(protocol="saved_model"), "SavedModel directory"),
        (dict(root_certificates="/nonexistent/ca.pem"), "cannot read root certificates"),
        (dict(protocol="rest", root_certificates="/nonexistent/ca.pem"), "root certificates file not found"),
        (
            dict(protocol="rest", client_certificate=b"PEM", client_key="/nonexistent/k.pem"),
            "client key file not found",
        ),
    ):
        with pytest.raises(ConfigError, match=match):
            Client(**kwargs)


def test_progress_falls_back_to_a_plain_line_without_tqdm(monkeypatch, capsys):
    from dolg_tf.client.core import _Progress

    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # import fails as if tqdm were not installed
    bar = _Progress(True, 3)
    bar.update(1)
    bar.update(2)
    bar.close()
    err = capsys.readouterr().err
    assert "embed: 3/3 images" in err and err.endswith("\n")
    seen = []
    bar = _Progress(lambda done, total: seen.append((done, total)), None)
    bar.update(2)
    bar.update(5)
    assert seen == [(2, None), (7, None)]


@pytest.mark.parametrize("protocol", ["grpc", "rest"])
def test_a_first_contact_refused_is_reported_at_once_naming_the_target(protocol):
    port = _free_port()  # closed again: nothing listens there
    t0 = time.monotonic()
    with pytest.raises(ServerUnavailableError) as info:
        Client(f"127.0.0.1:{port}", protocol=protocol, deadline=30).embed([_photo()])
    assert time.monotonic() - t0 < 2.0  # no retries: a wiring mistake, not an outage
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message and "connection refused" in message and "\n" not in message
    assert "is `dolg serve` or TF Serving running there?" in message
    # Asked to wait for a server that is starting, the client retries that long, then says the same.
    with Client(f"127.0.0.1:{port}", protocol=protocol, wait_for_server=1.5, backoff=0.05, max_backoff=0.2) as client:
        t0 = time.monotonic()
        with pytest.raises(ServerUnavailableError, match=r"connection refused for 1.5 s\)") as info:
            client.embed([_photo()])
        elapsed = time.monotonic() - t0
    assert isinstance(info.value, ClientError)
    assert 1.5 <= elapsed < 1.5 + 1.5, elapsed


def test_cli_client_flags_are_shared_and_the_server_defaults_to_the_protocols_port(tmp_path, capsys):
    from dolg_tf.cli import build_parser
    from dolg_tf.cli._common import client_from_args

    parser = build_parser()
    embed = parser.parse_args(["embed", "x.jpg", "--out", "x.npy", "--protocol", "rest"])
    with client_from_args(embed) as client:
        assert (client.target, client.protocol) == ("localhost:8501", "rest")
    with client_from_args(parser.parse_args(["embed", "x.jpg", "--out", "x.npy"])) as client:
        assert (client.target, client.protocol) == ("localhost:8500", "grpc")
    # dolg evaluate takes the same TLS, timeout and retry flags as dolg embed.
    tls = TLS_DIR / "ca.pem"
    evaluate = parser.parse_args([
        "evaluate", "--data", "d", "--dataset", "mine", "--server", ":8501", "--protocol", "rest", "--timeout", "7",
        "--deadline", "9", "--retries", "3", "--wait-for-server", "2", "--root-certificates", str(tls),
    ])  # fmt: skip
    with client_from_args(evaluate) as client:
        assert (client.target, client.timeout, client.deadline, client.retries, client.wait_for_server) == (
            "localhost:8501",
            7.0,
            9.0,
            3,
            2.0,
        )
        assert client._transport._verify == str(tls)

    def client_flags(command: str) -> set[str]:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
        return {o for a in sub._actions for o in a.option_strings}

    shared = {
        "--server",
        "--protocol",
        "--tls",
        "--root-certificates",
        "--client-certificate",
        "--client-key",
        "--timeout",
        "--deadline",
        "--retries",
        "--wait-for-server",
        "--model-name",
        "--signature",
    }
    assert shared <= client_flags("embed") and shared <= client_flags("evaluate")


def test_a_list_file_naming_a_missing_image_gives_the_list_and_line(tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(_encode(_photo(), "PNG"))
    listing = tmp_path / "gallery.txt"
    listing.write_text("# gallery\na.png\n\nsub/missing.jpg\n")
    rc = cli_main(["embed", str(listing), "--out", str(tmp_path / "e.npy"), "--server", f"127.0.0.1:{_free_port()}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert f"{listing}, line 4: 'sub/missing.jpg'" in err and str(tmp_path / "sub" / "missing.jpg") in err
    assert "list file's folder" in err


def test_local_checks_run_over_the_whole_list_before_contacting_the_server(tmp_path):
    # The server is unreachable: only a check made before any request can name index 2.
    port = _free_port()
    items = [_photo(), _encode(_photo(), "PNG"), str(tmp_path / "typo.jpg"), _photo()]
    with Client(f"127.0.0.1:{port}", deadline=30) as client:
        t0 = time.monotonic()
        with pytest.raises(InvalidImageError, match="no such file") as info:
            client.embed(items)
        assert time.monotonic() - t0 < 5
    assert info.value.index == 2


# --- against a real dolg serve ------------------------------------------------------------------
def _target(server, protocol: str) -> str:
    return server.grpc_target if protocol == "grpc" else server.rest_target


@pytest.fixture(scope="module")
def reference(tiny_export):
    loaded = tf.saved_model.load(os.path.join(tiny_export, "1"))

    def from_bytes(data: bytes) -> np.ndarray:
        return loaded.signatures["serving_default"](images=tf.constant([data]))["embedding"].numpy()[0]

    def from_pixels(pixels: np.ndarray) -> np.ndarray:
        if pixels.ndim == 2:
            pixels = np.repeat(pixels[..., None], 3, axis=-1)
        return loaded.signatures["embed_pixels"](pixels=tf.constant(pixels[None]))["embedding"].numpy()[0]

    return from_bytes, from_pixels


@pytest.fixture(scope="module")
def server(tiny_server):
    """The session's ``dolg serve`` on the tiny export (64-pixel images, two scales, at most 4 images a request)."""
    return tiny_server


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, reference):
    """Ten inputs of every kind, and each one's in-process reference embedding."""
    from_bytes, from_pixels = reference
    folder = tmp_path_factory.mktemp("mixed")
    jpeg = _encode(_photo(seed=1), "JPEG", quality=90)
    png = _encode(_photo(30, 44, seed=2), "PNG")
    gif = _encode(Image.fromarray(_photo(seed=3)).convert("P"), "GIF")
    bmp = _encode(_photo(seed=4), "BMP")
    (folder / "a.jpg").write_bytes(jpeg)
    (folder / "b.png").write_bytes(png)
    rgb, gray = _photo(seed=5), _photo(seed=6)[..., 1]
    pil, pil_rgba = Image.fromarray(_photo(seed=7)), Image.fromarray(_photo(seed=8)).convert("RGBA")
    items = [str(folder / "a.jpg"), folder / "b.png", gif, bmp, rgb, gray, pil, pil_rgba, jpeg, rgb[:17, :9]]
    expected = [
        from_bytes(jpeg), from_bytes(png), from_bytes(gif), from_bytes(bmp), from_pixels(rgb), from_pixels(gray),
        from_pixels(np.asarray(pil)), from_pixels(np.asarray(pil_rgba.convert("RGB"))), from_bytes(jpeg),
        from_pixels(np.ascontiguousarray(rgb[:17, :9])),
    ]  # fmt: skip
    return items, np.stack(expected)


@integration
@pytest.mark.parametrize("protocol", ["grpc", "rest"])
def test_every_input_kind_matches_the_in_process_saved_model(server, mixed, protocol):
    items, expected = mixed
    with Client(_target(server, protocol), protocol=protocol, batch_size=4, max_in_flight=2) as client:
        info = client.check()
        assert (info.model_name, info.version, info.embedding_dim) == ("dolg", 1, expected.shape[1])
        emb = client.embed(items)
        assert emb.dtype == np.float32 and emb.shape == expected.shape
        np.testing.assert_allclose(emb, expected, atol=ATOL, rtol=0)
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
        # Order is kept whatever the batching: reversed input, reversed rows.
        np.testing.assert_allclose(client.embed(items[::-1]), expected[::-1], atol=ATOL, rtol=0)
        np.testing.assert_allclose(client.embed(iter(items)), expected, atol=ATOL, rtol=0)  # any iterable
        # One image in, one row out; a 4-D array is a batch.
        np.testing.assert_allclose(client.embed(items[0]), expected[:1], atol=ATOL, rtol=0)
        np.testing.assert_allclose(client.embed(np.stack([items[4], items[4]])), expected[[4, 4]], atol=ATOL, rtol=0)
        assert client.embed([]).shape == (0, expected.shape[1])
    np.testing.assert_allclose(
        dc.embed(items[:3], target=_target(server, protocol), protocol=protocol), expected[:3], atol=ATOL, rtol=0
    )


@integration
@pytest.mark.parametrize("protocol", ["grpc", "rest"])
def test_an_image_the_server_refuses_is_named_by_its_index(server, mixed, protocol):
    items, expected = mixed
    good = _encode(_photo(seed=9), "JPEG")
    truncated = good[: len(good) // 2]  # a valid header: passes the local checks, fails to decode
    batch = [items[0], items[4], good, items[6], good, truncated, items[1]]
    with Client(_target(server, protocol), protocol=protocol, batch_size=4) as client:
        with pytest.raises(InvalidImageError, match="rejected by the server: .*JPEG") as info:
            client.embed(batch)
        assert info.value.index == 5
        assert "[[" not in str(info.value)  # TF's node trace is cut off
        # A bad item detected locally is named too, and the client keeps working afterwards.
        with pytest.raises(InvalidImageError, match="not a JPEG") as info:
            client.embed([items[0], items[1], b"plain text"])
        assert info.value.index == 2
        np.testing.assert_allclose(client.embed(items[:2]), expected[:2], atol=ATOL, rtol=0)


@integration
@pytest.mark.parametrize("protocol", ["grpc", "rest"])
def test_unknown_model_version_or_signature_is_model_not_found(server, protocol):
    target = _target(server, protocol)
    for kwargs, match in (
        (dict(model_name="resnet"), "model 'resnet' not found"),
        (dict(version=9), "version 9 not found"),
        (dict(version_label="canary"), "not found"),
        (dict(signature_name="nope"), "has no signature 'nope'"),
        (dict(signature_name="embed_pixels"), "not a DOLG embedding model"),
    ):
        with pytest.raises(ModelNotFoundError, match=match):
            dc.embed([_photo()], target=target, protocol=protocol, deadline=30, **kwargs)
    with Client(target, protocol=protocol, version=1) as client:
        assert client.check().version == 1
        assert client.status() == [dc.VersionStatus(1, "AVAILABLE", "")]
    with Client(target, protocol=protocol) as client:
        assert [(v.version, v.state) for v in client.status()] == [(1, "AVAILABLE")]
    with pytest.raises(ModelNotFoundError):
        Client(target, protocol=protocol, model_name="resnet").status()


@integration
@pytest.mark.parametrize("protocol", ["grpc", "rest"])
def test_large_calls_are_split_under_the_message_limit_and_the_servers_batch_limit(server, reference, protocol):
    from_bytes, from_pixels = reference
    noise = [np.random.default_rng(s).integers(0, 256, (60, 60, 3), dtype=np.uint8) for s in range(9)]
    expected = np.stack([from_pixels(x) for x in noise])
    sizes = []
    # A noise PNG is ~11 KB (~14.5 KB as base64): 32 KiB holds 2 per request.
    with Client(_target(server, protocol), protocol=protocol, max_message_bytes=32 << 10, batch_size=8) as client:
        emb = client.embed(noise, progress=lambda done, total: sizes.append(done))
    np.testing.assert_allclose(emb, expected, atol=ATOL, rtol=0)
    per_request = np.diff([0] + sizes)
    assert sizes[-1] == len(noise) and per_request.max() <= 2 and len(per_request) >= 5, per_request
    # The export takes at most 4 images per request; a client asking for 8 learns that once.
    with Client(_target(server, protocol), protocol=protocol, batch_size=8) as client:
        np.testing.assert_allclose(client.embed(noise), expected, atol=ATOL, rtol=0)
        assert client._batch_limit == 4
        sizes.clear()
        np.testing.assert_allclose(client.embed(noise, progress=lambda d, t: sizes.append(d)), expected, atol=ATOL)
        assert list(np.diff([0] + sizes)) == [4, 4, 1]
    # With the defaults, a 5.6 MB image (over gRPC's stock 4 MiB message limit) goes through.
    big = np.random.default_rng(1).integers(0, 256, (1400, 1400, 3), dtype=np.uint8)
    np.testing.assert_allclose(
        dc.embed(big, target=_target(server, protocol), protocol=protocol), from_pixels(big)[None], atol=ATOL, rtol=0
    )
    # One image larger than the message limit by itself: named, nothing sent for it.
    big = np.random.default_rng(0).integers(0, 256, (120, 120, 3), dtype=np.uint8)  # ~43 KB PNG
    with pytest.raises(InvalidImageError, match="over max_message_bytes") as info:
        dc.embed([noise[0], big], target=_target(server, protocol), protocol=protocol, max_message_bytes=32 << 10)
    assert info.value.index == 1


class FlakyProxy(http.server.ThreadingHTTPServer):
    """A REST proxy in front of ``dolg serve`` that answers the first requests with 503 / 429."""

    def __init__(self, upstream_port: int, failures: list[int]):
        self.upstream_port, self.failures, self.seen, self.auth = upstream_port, list(failures), [], []
        super().__init__(("127.0.0.1", 0), _FlakyHandler)


class _FlakyHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output clean
        pass

    def _relay(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.seen.append(self.path)
        self.server.auth.append(self.headers.get("Authorization"))
        if self.server.failures:
            status = self.server.failures.pop(0)
            payload = json.dumps({"error": f"injected {status}"}).encode()
        else:
            conn = http.client.HTTPConnection("127.0.0.1", self.server.upstream_port, timeout=60)
            conn.request(self.command, self.path, body=body or None, headers={"Content-Type": "application/json"})
            upstream = conn.getresponse()
            status, payload = upstream.status, upstream.read()
            conn.close()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = _relay


@integration
def test_rest_retries_503_and_429_but_never_400(server, mixed):
    items, expected = mixed
    proxy = FlakyProxy(server.info["rest_port"], [503, 429, 503])
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        target = f"127.0.0.1:{proxy.server_address[1]}"
        headers = {"Authorization": "Bearer test-token"}
        with Client(target, protocol="rest", batch_size=16, backoff=0.05, headers=headers) as client:
            np.testing.assert_allclose(client.embed(items[:3]), expected[:3], atol=ATOL, rtol=0)
        assert len(proxy.seen) == 5  # metadata x3 (two refused), predict x2 (one refused)
        assert proxy.auth == ["Bearer test-token"] * 5
        with Client(target, protocol="rest", backoff=0.05) as client:
            client.check()
            proxy.failures, proxy.seen = [400], []
            with pytest.raises(InvalidImageError, match="injected 400"):
                client.embed(items[:1])
        assert len(proxy.seen) == 1  # the refused predict, not retried
        proxy.failures = [503] * 100
        with pytest.raises(ServerUnavailableError, match="HTTP 503.*gave up after 3 attempt"):
            Client(target, protocol="rest", retries=2, backoff=0.05).check()
    finally:
        proxy.shutdown()
        proxy.server_close()


@integration
@pytest.mark.parametrize("protocol", ["grpc", "rest"])
def test_a_request_that_keeps_timing_out_is_retried_then_unavailable(server, mixed, protocol):
    with Client(_target(server, protocol), protocol=protocol, deadline=1.0, backoff=0.05) as client:
        client.check()
        # 1 ms per attempt: no embedding is that fast, every attempt hits DEADLINE_EXCEEDED (REST: a read timeout).
        client.timeout = 0.001
        with pytest.raises(ServerUnavailableError, match=r"gave up after ([2-9]|\d\d) attempt") as info:
            client.embed(mixed[0][:4])
    assert ("DEADLINE_EXCEEDED" if protocol == "grpc" else "Timeout") in str(info.value)


TLS_DIR = pathlib.Path(__file__).parent / "data" / "client_tls"


class TlsProxy:
    """Terminates TLS (mutual: a client certificate signed by the test CA is required) and pipes to a plain port."""

    def __init__(self, upstream_port: int, alpn: str):
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(TLS_DIR / "server.pem", TLS_DIR / "server.key")
        self.context.set_alpn_protocols([alpn])  # gRPC insists on h2
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.context.load_verify_locations(TLS_DIR / "ca.pem")
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        try:
            tls = self.context.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError):  # a client without the right certificate
            conn.close()
            return
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))

        def pipe(src, dst):
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                for sock in (src, dst):
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        threading.Thread(target=pipe, args=(upstream, tls), daemon=True).start()
        pipe(tls, upstream)

    def close(self) -> None:
        self.listener.close()


@integration
@pytest.mark.parametrize("protocol", ["grpc", "rest"])
def test_mutual_tls_with_certificates_as_paths_or_bytes(server, mixed, protocol):
    items, expected = mixed
    proxy = TlsProxy(
        server.info["grpc_port"] if protocol == "grpc" else server.info["rest_port"],
        "h2" if protocol == "grpc" else "http/1.1",
    )
    try:
        as_paths = dict(
            root_certificates=TLS_DIR / "ca.pem", client_certificate=str(TLS_DIR / "client.pem"),
            client_key=TLS_DIR / "client.key",
        )  # fmt: skip
        as_bytes = {k: pathlib.Path(v).read_bytes() for k, v in as_paths.items()}
        for host, certs in (("localhost", as_paths), ("127.0.0.1", as_bytes)):
            with Client(f"{host}:{proxy.port}", protocol=protocol, **certs) as client:
                np.testing.assert_allclose(client.embed(items[:3]), expected[:3], atol=ATOL, rtol=0)
        if protocol == "rest":
            with Client(f"https://localhost:{proxy.port}", protocol="rest", **as_bytes) as client:
                np.testing.assert_allclose(client.embed(items[3:5]), expected[3:5], atol=ATOL, rtol=0)
        # No client certificate, or not trusting the test CA: the handshake fails, the server is unavailable.
        for certs in (dict(root_certificates=as_bytes["root_certificates"]), dict(tls=True)):
            with pytest.raises(ServerUnavailableError):
                Client(f"localhost:{proxy.port}", protocol=protocol, deadline=1.0, backoff=0.1, **certs).check()
    finally:
        proxy.close()


@integration
def test_dolg_embed_cli_folder_list_and_in_process(server, mixed, tmp_path, capsys):
    items, expected = mixed
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for name, data in (("x.jpg", items[2]), ("sub/y.png", _encode(items[4], "PNG")), ("z.bmp", items[3])):
        (folder / name).write_bytes(data)
    (folder / "notes.txt").write_text("not an image")  # ignored: not an image extension
    out = tmp_path / "emb.npy"
    rc = cli_main(["embed", str(folder), "--server", server.grpc_target, "--out", str(out), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    emb = np.load(out)
    meta = json.loads((tmp_path / "emb.ids.json").read_text())
    assert meta["ids"] == ["sub/y.png", "x.jpg", "z.bmp"] and meta["version"] == 1 and meta["dim"] == emb.shape[1]
    np.testing.assert_allclose(emb, expected[[4, 2, 3]], atol=ATOL, rtol=0)
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["images"] == 3 and summary["source"].startswith("grpc://")
    # The files are what `dolg index build` reads.
    index_args = ["--embeddings", str(out), "--ids", str(tmp_path / "emb.ids.json"), "--out", str(tmp_path / "g.index")]
    assert cli_main(["index", "build", *index_args]) == 0, capsys.readouterr().err

    # A list file over REST, and the same list in-process with the SavedModel: same numbers.
    listing = tmp_path / "list.txt"
    listing.write_text("# gallery\nphotos/z.bmp\n\nphotos/x.jpg\n")
    rc = cli_main([
        "embed", str(listing), "--protocol", "rest", "--server", server.rest_target,
        "--out", str(tmp_path / "rest.npy"), "--ids", str(tmp_path / "rest.json"), "--no-progress",
    ])  # fmt: skip
    assert rc == 0
    assert json.loads((tmp_path / "rest.json").read_text())["ids"] == ["photos/z.bmp", "photos/x.jpg"]
    np.testing.assert_allclose(np.load(tmp_path / "rest.npy"), expected[[3, 2]], atol=ATOL, rtol=0)
    rc = cli_main(
        [
            "embed",
            str(listing),
            "--saved-model",
            server.base_path,
            "--out",
            str(tmp_path / "local.npy"),
            "--no-progress",
        ]
    )
    assert rc == 0
    np.testing.assert_allclose(np.load(tmp_path / "local.npy"), expected[[3, 2]], atol=ATOL, rtol=0)
    capsys.readouterr()

    # Bad input: one line, exit 2, the file named; nothing written.
    (folder / "broken.jpg").write_bytes(b"plain text, not a JPEG")
    rc = cli_main(
        ["embed", str(folder), "--server", server.grpc_target, "--out", str(tmp_path / "bad.npy"), "--no-progress"]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "broken.jpg" in err and "not a JPEG" in err
    assert not (tmp_path / "bad.npy").exists()
    assert cli_main(["embed", str(tmp_path / "nowhere"), "--out", str(tmp_path / "n.npy")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


@integration
def test_a_client_on_the_other_protocols_port_is_told_which_port_it_is(server, tmp_path, capsys):
    for protocol, port, hint in (
        (
            "grpc",
            server.info["rest_port"],
            "that port speaks HTTP/1.1, not gRPC: is it the REST port? use --protocol rest",
        ),
        (
            "rest",
            server.info["grpc_port"],
            "that port speaks HTTP/2 (gRPC), not HTTP/1.1: is it the gRPC port? use --protocol grpc",
        ),
    ):
        t0 = time.monotonic()
        with pytest.raises(WrongProtocolError) as info:
            Client(f"127.0.0.1:{port}", protocol=protocol).check()
        assert time.monotonic() - t0 < 3.0
        assert hint in str(info.value) and f"127.0.0.1:{port}" in str(info.value)
    image = tmp_path / "a.png"
    image.write_bytes(_encode(_photo(), "PNG"))
    rc = cli_main(["embed", str(image), "--out", str(tmp_path / "e.npy"), "--server", f":{server.info['rest_port']}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "use --protocol rest" in err, err


@integration
def test_a_server_restarted_during_a_call_is_retried_and_a_stopped_one_is_unavailable(serve, tiny_export, mixed):
    """Stops a private ``dolg serve`` after two requests of a gRPC call and starts another on the same ports.

    While it is down, a short-deadline client (gRPC and REST) gets ServerUnavailableError
    in time, and a REST call started then waits for the new server like the gRPC one.
    """
    items, expected = mixed
    server = serve(tiny_export, extra=SERVE_FLAGS)
    ports = dict(grpc_port=server.info["grpc_port"], rest_port=server.info["rest_port"])
    replacement = serve(tiny_export, start=False, extra=SERVE_FLAGS, **ports)
    results: dict[str, object] = {}

    def rest_call():
        try:
            # Started while the server is down: it must be told to wait for one (a first contact
            # refused is otherwise reported at once as a wiring mistake).
            with Client(server.rest_target, protocol="rest", batch_size=2, deadline=150, retries=1000,
                        wait_for_server=150) as c:  # fmt: skip
                results["rest"] = c.embed(items)
        except Exception as err:  # reported by the assertion below
            results["rest"] = err

    rest_thread = threading.Thread(target=rest_call)
    # Started in the background: the client must find the new server by retrying, not be handed a ready one.
    restart = threading.Thread(target=replacement.start)
    stopped: dict[str, float] = {}

    def on_progress(done, total):
        if done == 2 and not stopped:
            server.stop()
            for protocol in ("grpc", "rest"):
                t0 = time.monotonic()
                with pytest.raises(ServerUnavailableError):
                    Client(_target(server, protocol), protocol=protocol, deadline=2.0, backoff=0.1).embed(items[:1])
                stopped[protocol] = time.monotonic() - t0
            rest_thread.start()
            restart.start()  # same ports; the client retries until it answers

    # retries=1000: the deadline, not the count, bounds the wait for the new server.
    with Client(server.grpc_target, batch_size=1, deadline=150, retries=1000, max_backoff=2.0) as client:
        client.check()
        emb = client.embed(items, progress=on_progress)
    restart.join(180)
    rest_thread.join(180)
    assert replacement.alive() and replacement.info["grpc_port"] == ports["grpc_port"], replacement.log()[-2000:]
    np.testing.assert_allclose(emb, expected, atol=ATOL, rtol=0)
    assert isinstance(results.get("rest"), np.ndarray), results.get("rest")
    np.testing.assert_allclose(results["rest"], expected, atol=ATOL, rtol=0)
    assert stopped["grpc"] < 3.5 and stopped["rest"] < 3.5, stopped
