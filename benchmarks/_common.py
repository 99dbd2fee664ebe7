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
