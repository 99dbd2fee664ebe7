"""dolg_tf.fileio.atomic_write: temporaries of killed writers are cleaned up; files get the umask's mode."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from dolg_tf import fileio
from dolg_tf.fileio import atomic_write, atomic_write_json

# A child that starts an atomic write of TARGET, reports its temporary file, then hangs mid-write.
_HANGING_WRITER = """
import glob, os, sys, time
from dolg_tf.fileio import atomic_write
target = sys.argv[1]
def write(f):
    f.write(b"x" * 100000)
    f.flush()
    folder, name = os.path.split(os.path.abspath(target))
    print(glob.glob(os.path.join(folder, f".{name}.*-{os.getpid()}.*"))[0], flush=True)
    time.sleep(600)
atomic_write(target, write)
"""


def _start_writer(target) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-c", _HANGING_WRITER, str(target)], stdout=subprocess.PIPE, text=True)
    temp = proc.stdout.readline().strip()
    assert temp and os.path.exists(temp), "the writer did not report its temporary file"
    return proc, temp


def _temps(folder) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name.startswith("."))


@pytest.mark.integration
def test_temporaries_of_a_killed_writer_are_removed_by_the_next_write_only(tmp_path):
    target = tmp_path / "gallery.index"
    atomic_write(target, lambda f: f.write(b"old"))
    killed, killed_temp = _start_writer(target)
    live, live_temp = _start_writer(target)  # a concurrent writer still at work
    other, other_temp = _start_writer(tmp_path / "other.index")  # another target
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait(30)
        other.send_signal(signal.SIGKILL)
        other.wait(30)
        assert os.path.exists(killed_temp) and (target.read_bytes() == b"old")  # what a kill leaves behind
        # A name from an older version (tempfile.mkstemp's default), untouched for two days.
        legacy = tmp_path / ".gallery.index.ab3_x9qz"
        legacy.write_bytes(b"partial")
        os.utime(legacy, (time.time() - 2 * 86400,) * 2)
        fresh_legacy = tmp_path / ".gallery.index.zz0_a1b2"
        fresh_legacy.write_bytes(b"partial")

        atomic_write(target, lambda f: f.write(b"new"))

        assert target.read_bytes() == b"new"
        assert not os.path.exists(killed_temp) and not legacy.exists()
        assert os.path.exists(live_temp), "a live writer's temporary file was removed"
        assert os.path.exists(other_temp), "another target's temporary file was removed"
        assert fresh_legacy.exists()  # its writer cannot be checked and it is recent: kept
    finally:
        for proc in (killed, live, other):
            if proc.poll() is None:
                proc.kill()
            proc.wait(30)
            proc.stdout.close()
    # Once the second writer is gone too, the next write of the target removes its file.
    atomic_write_json(target, {"n": 1})
    assert not os.path.exists(live_temp)
    assert _temps(tmp_path) == [".gallery.index.zz0_a1b2", os.path.basename(other_temp)]


def test_a_failed_write_leaves_no_temporary_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "emb.npy"
    atomic_write(target, lambda f: f.write(b"old"))

    def broken(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, broken)
    assert target.read_bytes() == b"old" and _temps(tmp_path) == []


@pytest.mark.parametrize("umask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_new_files_get_the_umask_mode(tmp_path, umask, expected):
    previous = os.umask(umask)
    try:
        assert fileio.current_umask() == umask
        path = atomic_write(tmp_path / "a.json", lambda f: f.write(b"{}"))
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(path).st_mode) == expected


def test_a_replaced_file_keeps_its_mode(tmp_path):
    path = tmp_path / "private.json"
    path.write_bytes(b"{}")
    os.chmod(path, 0o640)
    previous = os.umask(0o022)
    try:
        atomic_write_json(path, {"a": 1})
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640 and path.read_text() == '{"a": 1}'


def test_a_uri_is_written_through_gfile_and_a_failed_write_keeps_the_old_object():
    import tensorflow as tf  # only here: fileio itself imports it only for URIs (checked below)

    target = "ram://fileio-test/runs/label_map.json"  # TensorFlow's in-memory file system: a URI, no network
    assert fileio.is_uri(target) and not fileio.is_uri("/tmp/a.json")
    assert atomic_write_json(target, {"a": [1, 2]}, indent=1) == target
    with tf.io.gfile.GFile(target, "rb") as f:
        assert f.read() == b'{\n "a": [\n  1,\n  2\n ]\n}'

    def broken(f):
        f.write(b"half")
        raise OSError("bucket full")

    with pytest.raises(OSError, match="bucket full"):
        atomic_write(target, broken)
    with tf.io.gfile.GFile(target, "rb") as f:
        assert f.read().startswith(b'{\n "a"')
    assert tf.io.gfile.listdir("ram://fileio-test/runs") == ["label_map.json"]  # no temporary left


@pytest.mark.integration
def test_local_writes_do_not_import_tensorflow(tmp_path):
    code = (
        "import sys; from dolg_tf.fileio import atomic_write_json; "
        f"atomic_write_json({str(tmp_path / 'a.json')!r}, [1]); print('tensorflow' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.strip() == "False" and (tmp_path / "a.json").read_text() == "[1]"
