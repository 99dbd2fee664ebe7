"""``tf.distribute`` strategies by name, and which process is the chief."""

from __future__ import annotations

import json
import logging
import os

import tensorflow as tf

from dolg_tf.errors import ConfigError

log = logging.getLogger(__name__)


def split_cpu(num_devices: int) -> list[str]:
    """Splits the physical CPU into ``num_devices`` logical devices.

    Must run before TensorFlow initialises its devices (before the first op).

    Returns:
        The logical CPU device names.

    Raises:
        ConfigError: TensorFlow has already initialised a different device layout.
    """
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(num_devices)]
        )
    except RuntimeError as err:
        logical = tf.config.list_logical_devices("CPU")
        if len(logical) != num_devices:
            raise ConfigError(
                f"cannot split the CPU into {num_devices} devices: TensorFlow is already initialised "
                f"with {len(logical)} ({err})"
            ) from err
    return [d.name for d in tf.config.list_logical_devices("CPU")]


def make_strategy(name: str, *, cpu_replicas: int = 1, tpu: str = "") -> tf.distribute.Strategy:
    """Creates the named strategy.

    Args:
        name: ``mirrored`` (all local GPUs; with none, one CPU device, or
            ``cpu_replicas`` logical CPU devices), ``multiworker``
            (``MultiWorkerMirroredStrategy`` from ``TF_CONFIG``), ``tpu``
            (``TPUStrategy``; untested here) or ``one_device`` (the first GPU, else the CPU).
        cpu_replicas: logical CPU devices to mirror over when there is no GPU.
        tpu: TPU name or address (``tpu`` only).

    Raises:
        ConfigError: unknown name, malformed ``TF_CONFIG``, or no TPU.
    """
    gpus = tf.config.list_physical_devices("GPU")
    if name == "mirrored":
        if gpus:
            return tf.distribute.MirroredStrategy()
        if cpu_replicas > 1:
            devices = split_cpu(cpu_replicas)
            # No NCCL on a CPU: reduce on one device.
            return tf.distribute.MirroredStrategy(
                devices=devices, cross_device_ops=tf.distribute.ReductionToOneDevice()
            )
        return tf.distribute.MirroredStrategy(devices=["/cpu:0"])
    if name == "multiworker":
        _check_tf_config()
        if not gpus and cpu_replicas > 1:
            raise ConfigError("cpu_replicas > 1 is only supported by the mirrored strategy")
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or "")
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
        except (ValueError, RuntimeError, tf.errors.OpError) as err:
            raise ConfigError(f"no TPU found (tpu={tpu!r}): {err}") from err
        return tf.distribute.TPUStrategy(resolver)
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")
    raise ConfigError(f"unknown strategy {name!r}")


def _check_tf_config() -> None:
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        log.warning("TF_CONFIG is not set: multiworker runs as a single worker")
        return
    try:
        spec = json.loads(raw)
        cluster, task = spec["cluster"], spec["task"]
        task_type, index = task["type"], int(task["index"])
        members = cluster[task_type]
        if not 0 <= index < len(members):
            raise IndexError(f"task index {index} outside {task_type}'s {len(members)} members")
    except (ValueError, KeyError, TypeError, IndexError) as err:
        raise ConfigError(
            'TF_CONFIG must be JSON like {"cluster": {"worker": ["host:port", ...]}, '
            f'"task": {{"type": "worker", "index": 0}}}}: {err}'
        ) from err


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes checkpoints, logs and exports.

    Single-process strategies: always. Multi-worker: the ``chief`` task, or worker 0
    when the cluster has no chief.
    """
    resolver = getattr(strategy, "cluster_resolver", None)
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or resolver is None:
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    if task_type is None:
        return True
    if task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return task_type == "worker" and task_id == 0 and not has_chief


def worker_id(strategy: tf.distribute.Strategy) -> int:
    """This process's worker index (0 for single-process strategies)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and resolver is not None:
        return int(resolver.task_id or 0)
    return 0
