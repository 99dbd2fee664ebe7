"""ClientOptions (frozen, checked once), how a Client takes them, and the client flags of dolg embed / dolg evaluate.

No model and no ``dolg serve`` here: the flags are checked where they land
(the options, the REST request headers a loopback HTTP server receives, the
time spent waiting for a server that never starts).
"""

from __future__ import annotations

import argparse
import dataclasses
import http.server
import json
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image

from dolg_tf.cli import build_parser
from dolg_tf.cli import main as dolg_main
from dolg_tf.cli._common import add_client_arguments, client_from_args, client_options_from_args
from dolg_tf.client import Client, ClientOptions
from dolg_tf.errors import ConfigError, ModelNotFoundError, ServerUnavailableError

integration = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- ClientOptions ----------------------------------------------------------------------------
def test_options_are_frozen_and_normalised():
    options = ClientOptions(timeout=5, deadline=7, wait_for_server=1, headers={"authorization": "Bearer t"})
    assert (options.timeout, options.deadline, options.wait_for_server) == (5.0, 7.0, 1.0)
    assert all(isinstance(v, float) for v in (options.timeout, options.deadline, options.wait_for_server))
    # A mapping and the same (name, value) pairs make equal, hashable options.
    assert options.headers == (("authorization", "Bearer t"),)
    same = ClientOptions(timeout=5.0, deadline=7.0, wait_for_server=1.0, headers=[("authorization", "Bearer t")])
    assert same == options and hash(same) == hash(options)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.timeout = 1.0
    tls = ClientOptions(root_certificates=b"PEM", server_name="serving.local").tls_options
    assert tls.active and (tls.root_certificates, tls.server_name) == (b"PEM", "serving.local")
    assert not ClientOptions().tls_options.active


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(timeout=0), r"timeout must be a positive number of seconds, got 0"),
        (dict(deadline=-1.0), r"deadline must be a positive number of seconds, got -1.0"),
        (dict(backoff="1"), r"backoff must be a positive number of seconds, got '1'"),
        (dict(max_backoff=True), r"max_backoff must be a positive number of seconds, got True"),
        (dict(wait_for_server=-0.5), r"wait_for_server must be a number of seconds >= 0, got -0.5"),
        (dict(retries=-1), r"retries must be a non-negative int, got -1"),
        (dict(retries=2.0), r"retries must be a non-negative int, got 2.0"),
        (dict(batch_size=0), r"batch_size must be a positive int, got 0"),
        (dict(max_in_flight=False), r"max_in_flight must be a positive int, got False"),
        (dict(max_message_bytes=0), r"max_message_bytes must be a positive int"),
        (dict(max_image_pixels=-3), r"max_image_pixels must be a positive int"),
        (dict(tls="yes"), r"tls must be True or False, got 'yes'"),
        (dict(root_certificates=3), r"root_certificates must be PEM bytes or a file path, got int"),
        (dict(server_name=""), r"server_name must be a non-empty string"),
        (dict(headers={"x-key": 3}), r"header 'x-key': the value must be str or bytes, got int"),
        (dict(headers="abc"), r"headers must be a mapping or \(name, value\) pairs"),
        (dict(progress="yes"), r"progress must be True, False or a callable"),
    ],
)
def test_bad_options_are_refused_naming_the_field_and_value(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ClientOptions(**kwargs)


def test_client_keyword_arguments_build_the_options():
    with Client("127.0.0.1:1", timeout=5, retries=2, batch_size=3, tls=True) as client:
        assert client.options == ClientOptions(timeout=5.0, retries=2, batch_size=3, tls=True)
        assert (client.timeout, client.retries, client.batch_size) == (5.0, 2, 3)
    base = ClientOptions(timeout=9.0, retries=4)
    # Keywords given with options= apply over them; the rest of the options stay.
    with Client("127.0.0.1:1", options=base, retries=1) as client:
        assert client.options == ClientOptions(timeout=9.0, retries=1)
    assert base.retries == 4
    with pytest.raises(ConfigError, match=r"unknown client option\(s\) timout; the options are .*timeout"):
        Client("127.0.0.1:1", timout=5)
    with pytest.raises(ConfigError, match=r"unknown client option\(s\) retry"):
        Client("127.0.0.1:1", options=base, retry=1)
    with pytest.raises(ConfigError, match="options must be a ClientOptions, got dict"):
        Client("127.0.0.1:1", options={"timeout": 5})
    with pytest.raises(ConfigError, match="credentials .* apply to protocol='grpc' only"):
        Client("127.0.0.1:1", protocol="rest", options=ClientOptions(credentials=object()))


def test_retry_settings_of_a_live_client_are_checked_again():
    with Client("127.0.0.1:1", timeout=5) as client:
        client.timeout = 0.5
        client.retries = 0
        assert client.options == ClientOptions(timeout=0.5, retries=0)
        with pytest.raises(ConfigError, match="timeout must be a positive number of seconds, got 0"):
            client.timeout = 0
        assert client.timeout == 0.5  # the refused value left the options as they were
        with pytest.raises(AttributeError):
            client.batch_size = 2  # fixed for the client's life (it sizes the pool and the requests)


@integration
def test_options_reach_the_wire_and_the_retry_loop():
    seen: list[dict] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def _not_found(self):
            seen.append({k.lower(): v for k, v in self.headers.items()})
            body = json.dumps({"error": "Servable not found for request: Latest(dolg)"}).encode()
            self.send_response(404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = _not_found  # http.server's name for the GET handler

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        options = ClientOptions(headers={"X-Api-Key": "k1"}, timeout=5.0)
        with Client(f"127.0.0.1:{server.server_address[1]}", protocol="rest", options=options) as client:
            with pytest.raises(ModelNotFoundError):
                client.check()
    finally:
        server.shutdown()
        server.server_close()
    assert seen and seen[0].get("x-api-key") == "k1"
    # wait_for_server from the options: a closed port is retried that long, then reported naming the wait.
    port = _free_port()
    options = ClientOptions(wait_for_server=0.6, backoff=0.05, max_backoff=0.1)
    t0 = time.monotonic()
    with Client(f"127.0.0.1:{port}", options=options) as client:
        with pytest.raises(ServerUnavailableError, match=r"connection refused for 0.6 s\)"):
            client.check()
    assert 0.6 <= time.monotonic() - t0 < 3.0


# --- the CLI's client flags -------------------------------------------------------------------
def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]


def _option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return {o for a in parser._actions for o in a.option_strings}


CLIENT_FLAGS = [
    "--protocol", "rest", "--model-name", "shop", "--signature", "embed", "--version-label", "stable",
    "--timeout", "7", "--deadline", "9", "--retries", "3", "--wait-for-server", "2", "--max-message-bytes", "4096",
    "--tls", "--root-certificates", "ca.pem", "--client-certificate", "c.pem", "--client-key", "k.pem",
    "--server-name", "serving.local",
]  # fmt: skip
EXPECTED = ClientOptions(
    timeout=7.0, deadline=9.0, retries=3, wait_for_server=2.0, max_message_bytes=4096, tls=True,
    root_certificates="ca.pem", client_certificate="c.pem", client_key="k.pem", server_name="serving.local",
)  # fmt: skip


def test_embed_and_evaluate_take_the_same_client_flags():
    parser = build_parser()
    alone = argparse.ArgumentParser()
    add_client_arguments(alone)
    client_flags = _option_strings(alone) - {"-h", "--help"}
    assert {"--server", "--tls", "--timeout", "--retries", "--deadline", "--server-name"} <= client_flags
    for command in ("embed", "evaluate"):
        missing = client_flags - _option_strings(_subparser(parser, command))
        assert not missing, f"dolg {command} lacks {sorted(missing)}"
    embed = parser.parse_args(["embed", "x.jpg", "--out", "x.npy", "--server", ":8501", *CLIENT_FLAGS])
    evaluate = parser.parse_args(["evaluate", "--data", "d", "--dataset", "mine", "--server", ":8501", *CLIENT_FLAGS])
    assert client_options_from_args(embed) == EXPECTED
    assert client_options_from_args(evaluate) == EXPECTED
    for args in (embed, evaluate):
        assert (args.server, args.protocol, args.model_name, args.signature, args.version_label) == (
            ":8501",
            "rest",
            "shop",
            "embed",
            "stable",
        )
    # Without flags, both commands give the library's defaults.
    plain_embed = parser.parse_args(["embed", "x.jpg", "--out", "x.npy"])
    plain_evaluate = parser.parse_args(["evaluate", "--data", "d", "--dataset", "mine", "--server", ":8500"])
    assert client_options_from_args(plain_embed) == ClientOptions()
    assert client_options_from_args(plain_evaluate) == ClientOptions()
    # The extra fields a command adds (its batch size) land in the same options.
    with client_from_args(plain_embed, batch_size=5) as client:
        assert client.options == ClientOptions(batch_size=5)
        assert (client.target, client.protocol, client.spec.name) == ("localhost:8500", "grpc", "dolg")


@pytest.mark.parametrize("command", ["embed", "evaluate"])
@pytest.mark.parametrize(
    "flag, value", [("--timeout", "0"), ("--deadline", "-2"), ("--retries", "-1"), ("--wait-for-server", "soon")]
)
def test_a_bad_client_flag_is_a_usage_error_in_both_commands(command, flag, value, capsys):
    head = (
        ["embed", "x.jpg", "--out", "x.npy"]
        if command == "embed"
        else ["evaluate", "--data", "d", "--dataset", "mine", "--server", ":8500"]
    )
    with pytest.raises(SystemExit) as info:
        dolg_main([*head, flag, value])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and repr(value) in err and "expected" in err


@integration
def test_both_commands_wait_for_a_server_as_told_then_say_so(tmp_path, capsys):
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "mine" / "jpg").mkdir(parents=True)
    gnd = {"imlist": ["a"], "qimlist": ["a"], "gnd": [{"bbx": None, "easy": [0], "hard": [], "junk": []}]}
    (tmp_path / "mine" / "gnd_mine.json").write_text(json.dumps(gnd))
    port = _free_port()
    common = ["--server", f"127.0.0.1:{port}", "--wait-for-server", "0.5", "--no-progress"]
    runs = {
        "embed": ["embed", str(tmp_path / "a.png"), "--out", str(tmp_path / "e.npy"), *common],
        "evaluate": ["evaluate", "--data", str(tmp_path), "--dataset", "mine", *common],
    }
    for command, argv in runs.items():
        t0 = time.monotonic()
        assert dolg_main(argv) == 2
        elapsed = time.monotonic() - t0
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"dolg {command}: error: no server answers at 127.0.0.1:{port}"), err
        assert "connection refused for 0.5 s" in err and len(err.splitlines()) == 1
        assert 0.5 <= elapsed < 5.0, (command, elapsed)
    # A TLS flag of dolg evaluate reaches the client too: the missing CA file is named.
    missing = tmp_path / "nowhere" / "ca.pem"
    argv = [
        "evaluate",
        "--data",
        str(tmp_path),
        "--dataset",
        "mine",
        "--server",
        f"127.0.0.1:{port}",
        "--root-certificates",
        str(missing),
    ]
    assert dolg_main(argv) == 2
    err = capsys.readouterr().err
    assert "dolg evaluate: error:" in err and "root certificates" in err and str(missing) in err
    assert not (tmp_path / "e.npy").exists()
