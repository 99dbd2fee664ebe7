"""Helpers shared by the benchmark scripts (run them by path: ``python benchmarks/<name>.py``)."""

from __future__ import annotations

import io
import platform


def cpu_model() -> str:
    """The CPU's model name as ``lscpu`` / ``/proc/cpuinfo`` give it."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def rss_bytes(pid: int | str = "self") -> int | None:
    """Resident set size of a process (this one by default), or None when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def jpeg_photos(count: int, longer: int) -> list[bytes]:
    """JPEG bytes of the first ``count`` built-in demo photographs, resized so the longer side is ``longer``."""
    from PIL import Image

    from dolg_tf.demo.photos import demo_photos

    out = []
    for image in list(demo_photos().values())[:count]:
        im = Image.fromarray(image)
        scale = longer / max(im.size)
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BILINEAR)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def start_server(base: str, extra: list[str] | tuple[str, ...] = (), timeout: float = 600.0):
    """Starts ``dolg serve`` on free loopback ports for ``base``; returns ``(process, its ready line as a dict)``."""
    import json
    import select
    import subprocess
    import sys
    import time

    cmd = [
        sys.executable, "-c", "import sys; from dolg_tf.cli import main; sys.exit(main())",
        "serve", "--model-base-path", base, "--port", "0", "--rest-api-port", "0", "--poll-seconds", "0", *extra,
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"dolg serve exited with {proc.returncode}")
        if select.select([proc.stdout], [], [], 0.5)[0]:
            line = proc.stdout.readline()
            if line.startswith("{"):
                return proc, json.loads(line)
    proc.kill()
    raise RuntimeError(f"dolg serve did not start in {timeout:.0f} s")
