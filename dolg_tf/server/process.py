"""``dolg serve`` as a child process: the one launcher used by ``dolg demo``, the benchmarks and the tests.

:class:`ServerProcess` starts ``python -m dolg_tf.cli serve`` on free loopback
ports (``--port 0 --rest-api-port 0``), waits for the JSON ready line the
server prints once every model has loaded, and stops it with SIGTERM (then
SIGKILL after ``stop_timeout``) when the ``with`` block ends. Importing this
module does not import TensorFlow.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from dolg_tf.errors import ServingError


def cli_command(*args: str) -> list[str]:
    """The command line that runs ``dolg <args>`` with this interpreter."""
    return [sys.executable, "-m", "dolg_tf.cli", *args]


class ServerProcess:
    """``dolg serve`` on free loopback ports, as a context manager (SIGTERM on exit).

    Args:
        base_path: the model base path (integer version directories below it).
        model_name: the name clients address.
        timeout: seconds to wait for the ready line before giving up.
        extra: further ``dolg serve`` flags (e.g. ``["--poll-seconds", "0"]``).
        stop_timeout: seconds between SIGTERM and SIGKILL.
        grpc_port, rest_port: the ports to listen on; 0 (the default) picks free ones. Giving the ports of a
            stopped server starts its replacement where clients already point.
        log_path: a file that receives the server's stderr (appended); None discards it.
        verbose: log at INFO level (``dolg -v serve``): loading progress, retries.

    After ``__enter__``, :attr:`info` holds the ready line (``grpc_port``,
    ``rest_port``, the loaded models), and :attr:`grpc_target` /
    :attr:`rest_target` are ``127.0.0.1:<port>`` strings. :meth:`output`
    returns what the server printed so far.
    """

    def __init__(
        self,
        base_path: str,
        model_name: str = "dolg",
        timeout: float = 180.0,
        extra: Sequence[str] = (),
        stop_timeout: float = 30.0,
        grpc_port: int = 0,
        rest_port: int = 0,
        log_path: str | None = None,
        verbose: bool = False,
    ):
        self.base_path, self.model_name, self.timeout, self.extra = str(base_path), model_name, timeout, list(extra)
        self.stop_timeout = stop_timeout
        self.ports = (int(grpc_port), int(rest_port))
        self.log_path, self.verbose = (None if log_path is None else str(log_path)), verbose
        self.proc: subprocess.Popen | None = None
        self.info: dict[str, Any] = {}
        self._lines: list[str] = []

    def start(self) -> ServerProcess:
        """Starts the server and blocks until it is ready; raises :class:`ServingError` if it exits or times out."""
        stderr = open(self.log_path, "a") if self.log_path else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(
                cli_command(
                    *(["-v"] if self.verbose else []),
                    "serve",
                    "--model-base-path",
                    self.base_path,
                    "--model-name",
                    self.model_name,
                    "--port",
                    str(self.ports[0]),
                    "--rest-api-port",
                    str(self.ports[1]),
                    *self.extra,
                ),  # fmt: skip
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                bufsize=1,
            )
        finally:
            if self.log_path:
                stderr.close()
        ready = threading.Event()

        def read():
            for line in self.proc.stdout:
                self._lines.append(line)
                if line.startswith("{") and "grpc_port" in line and not ready.is_set():
                    self.info = json.loads(line)
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + self.timeout
        while not ready.wait(0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise ServingError(
                    f"dolg serve did not start (exit {self.proc.returncode}): {''.join(self._lines)[-500:]}"
                    f"{self.log()[-2000:]}"  # empty without log_path
                )
        return self

    __enter__ = start

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.info['grpc_port']}"

    @property
    def rest_target(self) -> str:
        return f"127.0.0.1:{self.info['rest_port']}"

    def output(self) -> str:
        """Everything the server has printed on stdout so far."""
        return "".join(self._lines)

    def log(self) -> str:
        """What the server has written to ``log_path`` so far (empty without one)."""
        if not self.log_path:
            return ""
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after ``stop_timeout``; returns the exit code (None if never started)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode if self.proc else None

    def __exit__(self, *exc) -> None:
        self.stop()
