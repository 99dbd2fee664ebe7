"""Test set-up: CPU only, few threads, quiet TF, seeded, float32 policy restored; the shared fixtures.

Shared fixtures (session scope, built once, read-only for every test):

- ``tiny_export_factory``: exports ``build_dolg("tiny")`` once per (seed, export options) and returns the
  version directory; ``tiny_export`` is the base path of the default one (:data:`TINY_EXPORT`, version 1).
- ``tiny_server``: ``dolg serve`` on ``tiny_export`` (:class:`dolg_tf.server.process.ServerProcess`).
- ``serve``: a factory of private servers for tests that stop, kill or restart them; stopped after the test.

Tests that change what is served copy versions into a base path of their own with :func:`install_version`.
"""

import os
import shutil
import sys

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras
import numpy as np
import pytest
import tensorflow as tf

try:
    tf.config.threading.set_intra_op_parallelism_threads(2)
    tf.config.threading.set_inter_op_parallelism_threads(2)
except RuntimeError:  # already initialised by an earlier import
    pass


def pytest_collection_modifyitems(config, items):
    """Runs the long tests first, so that the short ones fill the end of the run on every pytest-xdist worker
    (the Makefile's ``--dist loadgroup --no-loadscope-reorder`` hands tests out in this order): the
    distributed-training runs, the longest single tests; then integration tests and the ``xdist_group`` modules,
    which share module fixtures (a server, exports) and stay on one worker; then the unit tests. The sort is
    stable, so each module keeps its own order."""

    def rank(item) -> int:
        integration = item.get_closest_marker("integration") is not None
        if integration and item.nodeid.startswith("tests/test_training.py"):
            return 0
        return 1 if integration or item.get_closest_marker("xdist_group") else 2

    items.sort(key=rank)


def pytest_collection_finish(session):
    """Under ``--dist loadgroup``, pytest-xdist marks each ``xdist_group`` test by suffixing its node id with the
    group; a pytest with which that suffix does not take effect would spread a group's tests over the workers
    (and build its module fixtures on each) without a word, so this stops the run instead."""
    if not session.config.getoption("loadgroup", default=False):  # set on the workers of a loadgroup run
        return
    ungrouped = [
        item.nodeid for item in session.items if item.get_closest_marker("xdist_group") and "@" not in item.nodeid
    ]
    if ungrouped:
        message = (
            f"pytest-xdist did not group {len(ungrouped)} xdist_group tests (e.g. {ungrouped[0]}) with pytest "
            f"{pytest.__version__}: install the pytest that pyproject.toml pins (pip install -e '.[dev]')"
        )
        print(f"\nERROR: {message}", file=sys.__stderr__, flush=True)  # a worker's error is not shown otherwise
        raise pytest.UsageError(message)


@pytest.fixture(autouse=True)
def _seed_and_policy():
    keras.utils.set_random_seed(1234)
    keras.config.set_dtype_policy("float32")
    yield
    keras.config.set_dtype_policy("float32")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# The session's tiny export: 64-pixel images, two scales, at most 4 images per request.
TINY_EXPORT = dict(image_size=64, scales=(0.7071, 1.0), max_batch_size=4)
TINY_SEED = 5
# A second configuration shared by the server and fault tests: one scale, no warm-up records, 32 images a request.
ONE_SCALE_EXPORT = dict(scales=(1.0,), warmup_batch_sizes=(), max_batch_size=32)
# dolg serve flags of the shared server: no polling (its base never changes), few threads.
SERVE_FLAGS = (
    "--poll-seconds", "0", "--tensorflow-intra-op-parallelism", "1", "--tensorflow-inter-op-parallelism", "2",
)  # fmt: skip


def install_version(version_dir: str, base: str, version: int) -> str:
    """Copies an exported version directory to ``base/<version>`` atomically (a hidden copy, then a rename), so a
    server polling ``base`` never sees half a version. Returns the new directory."""
    os.makedirs(base, exist_ok=True)
    target = os.path.join(base, str(version))
    staging = os.path.join(base, f".incoming-{version}")
    shutil.copytree(version_dir, staging)
    os.rename(staging, target)
    return target


@pytest.fixture(scope="session")
def tiny_export_factory(tmp_path_factory):
    """``make(seed=TINY_SEED, **options)``: the version directory of ``build_dolg("tiny")`` (weights drawn after
    ``keras.utils.set_random_seed(seed)``) exported with :data:`TINY_EXPORT` updated by ``options``. Each
    (seed, options) is exported once per session; the directory is shared, so copy it before changing it."""
    from dolg_tf.export import export_saved_model
    from dolg_tf.model import build_dolg

    cache: dict[tuple, str] = {}

    def make(seed: int = TINY_SEED, **options) -> str:
        options = {**TINY_EXPORT, **options}
        key = (seed, tuple(sorted((k, repr(v)) for k, v in options.items())))
        if key not in cache:
            keras.utils.set_random_seed(seed)
            base = tmp_path_factory.mktemp(f"tiny-export-{len(cache)}") / "dolg"
            cache[key] = str(export_saved_model(build_dolg("tiny"), str(base), version=1, **options))
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_export(tiny_export_factory) -> str:
    """Base path holding version 1 of the tiny model exported with :data:`TINY_EXPORT` (seed 5). Read-only."""
    return os.path.dirname(tiny_export_factory())


@pytest.fixture(scope="session")
def tiny_server(tiny_export, tmp_path_factory):
    """``dolg serve`` on :func:`tiny_export` for the whole session. Tests must not stop it or change its base."""
    from dolg_tf.server.process import ServerProcess

    log = tmp_path_factory.mktemp("tiny-server") / "serve.log"
    with ServerProcess(tiny_export, extra=SERVE_FLAGS, log_path=str(log)) as server:
        yield server


@pytest.fixture
def serve(tmp_path):
    """``serve(base, start=True, **ServerProcess arguments)``: a private ``dolg serve`` (stderr logged under
    ``tmp_path``), started unless ``start=False``; every one is stopped when the test ends."""
    from dolg_tf.server.process import ServerProcess

    servers = []

    def make(base: str, start: bool = True, **kwargs):
        kwargs.setdefault("log_path", str(tmp_path / f"serve-{len(servers)}.log"))
        server = ServerProcess(base, **kwargs)
        servers.append(server)
        return server.start() if start else server

    yield make
    for server in servers:
        server.stop()
