"""``dolg serve`` under faults, against real server processes on loopback.

Two tiny exports (64-pixel images, one scale, at most 32 images a request, other
weights each; from the session's ``tiny_export_factory``) are shared by the
module. One private server takes the amplification request, a second server on
its ports, an atomic version swap under load and a slowly copied version that
loads through retries; it is then killed with SIGKILL and restarted on the same
ports while a retrying client keeps sending, and the restarted server is stopped
with SIGTERM under REST keep-alive load.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import pathlib
import shutil
import signal
import subprocess
import threading
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from dolg_tf.server.process import ServerProcess, cli_command
from tests.conftest import ONE_SCALE_EXPORT

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("serving")]

START_TIMEOUT_S = 180
RETRY_FLAGS = ("--max_num_load_retries", "40", "--load_retry_interval_micros", "250000")


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


JPEG = _jpeg(0)


SERVE_FLAGS = (
    "--tensorflow-intra-op-parallelism", "1", "--tensorflow-inter-op-parallelism", "2", "--poll-seconds", "0.3",
)  # fmt: skip


def _serve_cmd(base: str, *extra: str) -> list[str]:
    return cli_command("serve", "--model-base-path", base, *SERVE_FLAGS, *extra)


class Served:
    """A private ``dolg serve`` (:class:`ServerProcess`, stderr to a file) with a gRPC stub and a few probes."""

    def __init__(self, base: str, log_path: str, grpc_port: int = 0, rest_port: int = 0):
        self.base = base
        self.process = ServerProcess(
            base, extra=(*SERVE_FLAGS, *RETRY_FLAGS), log_path=log_path, grpc_port=grpc_port, rest_port=rest_port,
            timeout=START_TIMEOUT_S,
        ).start()  # fmt: skip
        self.proc, self.ready = self.process.proc, self.process.info
        self.channel = grpc.insecure_channel(self.process.grpc_target)
        self.stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)

    @property
    def rest_port(self) -> int:
        return self.ready["rest_port"]

    def log(self) -> str:
        return self.process.log()[-4000:]

    def rss_kb(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

    def rest_status(self) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", self.rest_port, timeout=30)
        conn.request("GET", "/v1/models/dolg")
        body = json.loads(conn.getresponse().read())
        conn.close()
        return {int(s["version"]): s for s in body["model_version_status"]}

    def close(self) -> None:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


def _request(images: list[bytes]) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "dolg"
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(np.array(images, dtype=object), dtype=tf.string))
    return request


def _rest_body(n: int) -> bytes:
    return json.dumps({"instances": [{"b64": base64.b64encode(JPEG).decode()}] * n}).encode()


def _wait_for(predicate, timeout: float, what: str, server: Served):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"{what} did not happen in {timeout} s:\n{server.log()}")


@pytest.fixture(scope="module")
def exports(tiny_export_factory, tmp_path_factory):
    """A base path holding version 1, and version 2 (other weights) kept outside it."""
    root = tmp_path_factory.mktemp("faults")
    versions, embeddings = {}, {}
    for version in (1, 2):
        versions[version] = pathlib.Path(tiny_export_factory(seed=100 + version, **ONE_SCALE_EXPORT))
        embeddings[version] = (
            tf.saved_model.load(str(versions[version]))
            .signatures["serving_default"](images=tf.constant([JPEG]))["embedding"]
            .numpy()[0]
        )
    base = root / "dolg"
    base.mkdir()
    shutil.copytree(versions[1], base / "1")
    return {"root": root, "base": str(base), "versions": versions, "embeddings": embeddings}


@pytest.fixture(scope="module")
def servers(exports):
    """The module's server; the SIGKILL test replaces it with its restart."""
    box = {"server": Served(exports["base"], str(exports["root"] / "server.log"))}
    yield box
    box["server"].close()


@pytest.fixture
def server(servers):
    return servers["server"]


# --- refusals ----------------------------------------------------------------------------------
def test_amplification_request_is_refused_at_once_and_memory_stays_flat(server):
    request = _request([b"x"])
    request.inputs["images"].tensor_shape.dim[0].size = 20_000_000  # one value "filling" 20M elements
    assert request.ByteSize() < 64
    server.stub.Predict(_request([JPEG]), timeout=60)  # warm: the first call builds the graph's caches
    before = server.rss_kb()
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        server.stub.Predict(request, timeout=30)
    elapsed = time.monotonic() - t0
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert "20000000" in info.value.details() and "limit" in info.value.details(), info.value.details()
    assert elapsed < 1.0, elapsed
    # A shape that passes the batch limit but disagrees with the values it carries.
    mismatch = _request([JPEG])
    mismatch.inputs["images"].tensor_shape.dim[0].size = 3
    with pytest.raises(grpc.RpcError) as info:
        server.stub.Predict(mismatch, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "3 elements" in info.value.details() and "1 string values" in info.value.details(), info.value.details()
    # Materialising 20M strings costs gigabytes; the refusal must cost next to nothing.
    assert server.rss_kb() - before < 50_000, (before, server.rss_kb())

    conn = http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=30)
    conn.request("POST", "/v1/models/dolg:predict", body=_rest_body(33))  # over the export's max_batch_size (32)
    response = conn.getresponse()
    payload = json.loads(response.read())
    conn.close()
    assert response.status == 400 and "batch of 33" in payload["error"] and "32" in payload["error"], payload


def test_a_second_server_on_busy_ports_exits_2_with_one_line(server, exports):
    for flags, port in (
        (("--port", str(server.ready["grpc_port"]), "--rest-api-port", "0"), server.ready["grpc_port"]),
        (("--port", "0", "--rest-api-port", str(server.rest_port)), server.rest_port),
    ):
        done = subprocess.run(_serve_cmd(exports["base"], *flags), capture_output=True, text=True, timeout=120)
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert done.returncode == 2, done.stderr
        assert len(lines) == 1 and str(port) in lines[0] and "already in use" in lines[0], done.stderr
    # The first server still answers every channel (no port sharing).
    for _ in range(5):
        with grpc.insecure_channel(f"127.0.0.1:{server.ready['grpc_port']}") as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            assert stub.Predict(_request([JPEG]), timeout=60).model_spec.version.value == 1


# --- versions under load ----------------------------------------------------------------------------
def test_atomic_version_swap_under_load_fails_no_request(server, exports):
    errors: list[str] = []
    versions: list[int] = []
    stop = threading.Event()

    def client():
        while not stop.is_set():
            try:
                response = server.stub.Predict(_request([JPEG]), timeout=60)
                versions.append(response.model_spec.version.value)
                got = tf.make_ndarray(response.outputs["embedding"])[0]
                want = exports["embeddings"][response.model_spec.version.value]
                if np.abs(got - want).max() > 1e-5:
                    errors.append(f"version {response.model_spec.version.value} answered a wrong embedding")
            except grpc.RpcError as err:
                errors.append(f"{err.code()}: {err.details()}")

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        # Write aside, then rename: the version appears whole.
        tmp = os.path.join(exports["base"], ".incoming-2")
        shutil.copytree(exports["versions"][2], tmp)
        os.rename(tmp, os.path.join(exports["base"], "2"))
        _wait_for(lambda: versions and versions[-1] == 2, 120, "version 2 answering", server)
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert not errors, errors[:5]
    assert versions[0] == 1 and versions[-1] == 2 and len(versions) > 5


def test_a_slow_copy_loads_through_retries(server, exports):
    # Version 3 holds version 2's weights; the version number in the answer tells them apart.
    src, dst = exports["versions"][2], os.path.join(exports["base"], "3")
    os.makedirs(dst)
    for name in os.listdir(src):  # everything but the variables: the first loads fail
        if name != "variables":
            (shutil.copytree if (src / name).is_dir() else shutil.copy)(src / name, os.path.join(dst, name))
    _wait_for(lambda: "attempt 2 of" in server.log(), 60, "a failed load retried", server)
    assert server.rest_status()[3]["state"] == "LOADING"
    shutil.copytree(src / "variables", os.path.join(dst, "variables"))
    _wait_for(lambda: server.rest_status()[3]["state"] == "AVAILABLE", 60, "version 3 loading", server)
    response = server.stub.Predict(_request([JPEG]), timeout=60)
    assert response.model_spec.version.value == 3
    np.testing.assert_allclose(tf.make_ndarray(response.outputs["embedding"])[0], exports["embeddings"][2], atol=1e-5)


def test_sigkill_and_restart_with_a_retrying_client(servers, exports):
    from dolg_tf.client import Client

    first = servers["server"]
    port = first.ready["grpc_port"]
    # The latest version answers: 3 (version 2's weights) after the tests above, 1 when this test runs alone.
    latest = max(v for v, status in first.rest_status().items() if status["state"] == "AVAILABLE")
    want = exports["embeddings"][min(latest, 2)]
    results: list[np.ndarray] = []
    errors: list[str] = []
    stop = threading.Event()
    with Client(f"127.0.0.1:{port}", retries=30, deadline=180.0, max_backoff=2.0) as client:

        def run():
            while not stop.is_set():
                try:
                    results.append(client.embed([JPEG])[0])
                except Exception as err:  # every failure is collected and reported
                    errors.append(repr(err))

        thread = threading.Thread(target=run)
        thread.start()
        try:
            _wait_for(lambda: len(results) >= 3, 60, "first answers", first)
            first.proc.send_signal(signal.SIGKILL)
            first.proc.wait(30)
            first.close()
            count = len(results)
            servers["server"] = Served(
                exports["base"], str(exports["root"] / "restart.log"), grpc_port=port, rest_port=first.rest_port
            )
            _wait_for(lambda: len(results) >= count + 3, 120, "answers after the restart", servers["server"])
        finally:
            stop.set()
            thread.join(200)
    assert not errors, errors[:3]
    assert first.proc.returncode == -signal.SIGKILL
    np.testing.assert_allclose(np.stack(results), np.repeat(want[None], len(results), 0), atol=1e-5)


# --- shutdown --------------------------------------------------------------------------------------
def test_sigterm_under_rest_keep_alive_load_drains_and_exits_0(server):
    """4 REST keep-alive clients sending batches of 32, then SIGTERM."""
    body = _rest_body(32)
    outcomes: list[str] = []
    lock = threading.Lock()
    started = threading.Barrier(5)

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=120)
        started.wait()
        while True:
            try:
                conn.request("POST", "/v1/models/dolg:predict", body=body, headers={"Content-Type": "application/json"})
                response = conn.getresponse()
                payload = json.loads(response.read())
            except ConnectionRefusedError:
                return  # the listening socket is closed: the server is gone or going
            except Exception as err:  # a request dropped mid-way: the failure this test exists for
                with lock:
                    outcomes.append(f"dropped: {err!r}")
                return
            closing = (response.getheader("Connection") or "").lower() == "close"
            with lock:
                if response.status == 200 and len(payload["predictions"]) == 32:
                    outcomes.append("ok-close" if closing else "ok")
                elif response.status == 503 and closing and "shutting down" in payload["error"]:
                    outcomes.append("503")
                    return  # a client told "shutting down" goes elsewhere
                else:
                    outcomes.append(f"unexpected {response.status} {payload} close={closing}")
            if closing:
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=120)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    started.wait()
    _wait_for(lambda: outcomes.count("ok") >= 4, 120, "requests under load", server)
    sent_at = len(outcomes)
    server.proc.send_signal(signal.SIGTERM)
    code = server.proc.wait(120)
    for t in threads:
        t.join(120)
    assert code == 0, server.log()
    assert not [o for o in outcomes if not o.startswith(("ok", "503"))], outcomes
    after = outcomes[sent_at:]
    # Requests in flight at SIGTERM were answered (told to close); none was dropped.
    assert "ok-close" in after or "503" in after, outcomes
    deadline = time.monotonic() + 10  # the launcher's reader thread reads stdout to its end
    while '"stopped": true' not in server.process.output() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert '"stopped": true' in server.process.output()
