"""The ``dolg`` command itself: --version, a description for every subcommand, TensorFlow's start-up noise."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from importlib.metadata import version

import pytest

import dolg_tf
from dolg_tf.cli import build_parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*code_or_args: str, module: bool = False, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "dolg_tf.cli", *code_or_args] if module else [sys.executable, "-c", *code_or_args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, **(env or {})})  # fmt: skip


@pytest.mark.integration
def test_version_names_the_package_and_its_runtime_without_importing_tensorflow():
    code = (
        "import sys\n"
        "from dolg_tf.cli import main\n"
        "try:\n    main(['--version'])\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        "assert 'tensorflow' not in sys.modules\n"
    )
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (
        f"dolg {dolg_tf.__version__} (TensorFlow {version('tensorflow')}, Keras {version('keras')}, "
        f"Python {sys.version.split()[0]})"
    )


def _subcommands(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                yield from _subcommands(sub)


def test_every_subcommand_has_a_description_in_its_help():
    found = dict(_subcommands(build_parser()))
    # The commands the docs document, and the nested actions of the grouped ones.
    assert {"train", "export", "serve", "embed", "index", "evaluate", "convert", "data", "show", "info", "demo",
            "build", "search", "inspect", "to-tfrecord"} <= set(found)  # fmt: skip
    missing = [sub.prog for sub in found.values() if not (sub.description or "").strip()]
    assert not missing, f"no description in --help: {missing}"
    assert "inspect training data" in found["data"].format_help()


_NOISE = (
    "E0000 00:00:1796185192.639853   12247 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: "
    "Failed call to cuInit: UNKNOWN ERROR (303)\n"
)


@pytest.mark.integration
def test_start_up_filter_drops_only_the_cuda_init_lines_and_keeps_real_errors():
    code = (
        "import os, sys\n"
        "from dolg_tf.cli import _common\n"
        "_common.has_nvidia_driver = lambda: False\n"
        f"noise = {_NOISE!r}\n"
        "def start():\n"
        "    os.write(2, b'before\\n' + noise.encode() + b'E0000 real_failure.cc:1] something broke\\n')\n"
        "    sys.stderr.write('python warning\\n')\n"
        "_common.import_tensorflow_quietly(start)\n"
        "os.write(2, b'after\\n')\n"
        "_common.has_nvidia_driver = lambda: True  # a driver: CUDA errors are real and shown\n"
        "_common.import_tensorflow_quietly(lambda: os.write(2, noise.encode()))\n"
    )
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "before\nE0000 real_failure.cc:1] something broke\npython warning\nafter\n" + _NOISE


@pytest.mark.integration
def test_dolg_commands_start_tensorflow_without_the_cuda_init_error_line():
    # On a machine without an NVIDIA driver, TensorFlow's CUDA build prints the line at start-up
    # unless the command filters it (with a driver there is nothing to filter and it must not appear).
    # dolg train starts TensorFlow before it reads its flags; a typo then ends it quickly.
    train = _run("train", "--set", "lrr=0.1", module=True)
    assert train.returncode == 2 and "did you mean lr?" in train.stderr, train.stderr
    assert "failed call to cuInit" not in train.stderr


@pytest.mark.integration
def test_package_exports_resolve_lazily_without_tensorflow():
    """Each package's lazy names are listed by dir(), resolve to their defining module's object on first use
    (then cached), and an unknown name is an AttributeError; none of it loads TensorFlow until a heavy name is used."""
    code = (
        "import importlib, sys\n"
        "import dolg_tf, dolg_tf.data, dolg_tf.demo, dolg_tf.export, dolg_tf.server, dolg_tf.training\n"
        "from dolg_tf.data.config import DataConfig\n"
        "from dolg_tf.demo.photos import demo_photos\n"
        "from dolg_tf.server.preflight import VersionPolicy\n"
        "assert 'DataConfig' in dir(dolg_tf.data) and 'run_demo' in dir(dolg_tf.demo), dir(dolg_tf.demo)\n"
        "assert dolg_tf.data.DataConfig is DataConfig and vars(dolg_tf.data)['DataConfig'] is DataConfig\n"
        "assert dolg_tf.demo.demo_photos is demo_photos and dolg_tf.server.VersionPolicy is VersionPolicy\n"
        "for package in (dolg_tf, dolg_tf.data, dolg_tf.export, dolg_tf.training):\n"
        "    try:\n        package.no_such_name\n    except AttributeError as e:\n"
        "        assert repr(package.__name__) in str(e) and 'no_such_name' in str(e), e\n"
        "    else:\n        raise SystemExit(f'{package.__name__}.no_such_name resolved')\n"
        "assert 'tensorflow' not in sys.modules\n"
        "assert dolg_tf.build_dolg is importlib.import_module('dolg_tf.model').build_dolg\n"
        "assert 'tensorflow' in sys.modules\n"
    )
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr[-2000:]
