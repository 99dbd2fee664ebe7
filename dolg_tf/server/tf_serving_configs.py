"""Strict parsers for TF Serving's text-protobuf config files (``serving/*.config``).

``models.config`` is parsed with the real ``ModelServerConfig`` message that
``tensorflow-serving-api`` ships. The batching and monitoring messages
(``BatchingParameters`` in ``session_bundle_config.proto``,
``MonitoringConfig`` in ``monitoring_config.proto``) are *not* shipped in the
Python package, so their schemas are declared here from the documented
``.proto`` definitions — field names, numbers and types — and the files are
parsed with protobuf's own ``text_format`` against them: an unknown field, a
wrong type or a typo fails exactly as it would in ``tensorflow_model_server``.
Only the fields TF Serving 2.x documents are declared; a newer field used in a
config must be added here first (which is the point: nothing passes unchecked).
"""

from __future__ import annotations

import os

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format, wrappers_pb2
from tensorflow_serving.config import model_server_config_pb2

from dolg_tf.errors import ConfigError

_LABEL = descriptor_pb2.FieldDescriptorProto
# (name, number, label, type, type_name) per message, as in the .proto files.
_WRAPPED = {
    "Int64": ".google.protobuf.Int64Value",
    "String": ".google.protobuf.StringValue",
    "Bool": ".google.protobuf.BoolValue",
}
_SCHEMA = {
    # tensorflow_serving/servables/tensorflow/session_bundle_config.proto
    "BatchingParameters": [
        ("max_batch_size", 1, _LABEL.LABEL_OPTIONAL, _LABEL.TYPE_MESSAGE, _WRAPPED["Int64"]),
        ("batch_timeout_micros", 2, _LABEL.LABEL_OPTIONAL, _LABEL.TYPE_MESSAGE, _WRAPPED["Int64"]),
        ("max_enqueued_batches", 3, _LABEL.LABEL_OPTIONAL, _LABEL.TYPE_MESSAGE, _WRAPPED["Int64"]),
        ("num_batch_threads", 4, _LABEL.LABEL_OPTIONAL, _LABEL.TYPE_MESSAGE, _WRAPPED["Int64"]),
        ("thread_pool_name", 5, _LABEL.LABEL_OPTIONAL, _LABEL.TYPE_MESSAGE, _WRAPPED["String"]),
        ("allowed_batch_sizes", 6, _LABEL.LABEL_REPEATED, _LABEL.TYPE_INT64, None),
        ("pad_variable_length_inputs", 7, _LABEL.LABEL_OPTIONAL, _LABEL.TYPE_BOOL, None),
        ("enable_large_batch_splitting", 8, _LABEL.LABEL_OPTIONAL, _LABEL.TYPE_MESSAGE, _WRAPPED["Bool"]),
        ("max_execution_batch_size", 9, _LABEL.LABEL_OPTIONAL, _LABEL.TYPE_MESSAGE, _WRAPPED["Int64"]),
    ],
    # tensorflow_serving/config/monitoring_config.proto
    "PrometheusConfig": [
        ("enable", 1, _LABEL.LABEL_OPTIONAL, _LABEL.TYPE_BOOL, None),
        ("path", 2, _LABEL.LABEL_OPTIONAL, _LABEL.TYPE_STRING, None),
    ],
    "MonitoringConfig": [
        ("prometheus_config", 1, _LABEL.LABEL_OPTIONAL, _LABEL.TYPE_MESSAGE, ".tensorflow.serving.PrometheusConfig"),
    ],
}


def _build_classes() -> dict[str, type]:
    # A private pool: these names never clash with protos loaded elsewhere.
    pool = descriptor_pool.DescriptorPool()
    wrappers = descriptor_pb2.FileDescriptorProto()
    wrappers_pb2.DESCRIPTOR.CopyToProto(wrappers)
    pool.Add(wrappers)
    file = descriptor_pb2.FileDescriptorProto(
        name="dolg_tf/tf_serving_configs.proto",
        package="tensorflow.serving",
        syntax="proto3",
        dependency=[wrappers.name],
    )
    for message_name, fields in _SCHEMA.items():
        message = file.message_type.add(name=message_name)
        for name, number, label, kind, type_name in fields:
            field = message.field.add(name=name, number=number, label=label, type=kind)
            if type_name:
                field.type_name = type_name
    pool.Add(file)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"tensorflow.serving.{name}"))
        for name in _SCHEMA
    }


_CLASSES = _build_classes()
BatchingParameters = _CLASSES["BatchingParameters"]
MonitoringConfig = _CLASSES["MonitoringConfig"]


def _parse(path: str | os.PathLike, message):
    path = os.fspath(path)
    try:
        with open(path) as f:
            text = f.read()
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err}") from None
    try:
        return text_format.Parse(text, message)
    except text_format.ParseError as err:
        raise ConfigError(f"{path}: not a valid {message.DESCRIPTOR.full_name}: {err}") from None


def parse_model_server_config(path: str | os.PathLike) -> model_server_config_pb2.ModelServerConfig:
    """Parses ``--model_config_file`` with TF Serving's own ``ModelServerConfig`` message."""
    config = _parse(path, model_server_config_pb2.ModelServerConfig())
    if config.WhichOneof("config") != "model_config_list" or not config.model_config_list.config:
        raise ConfigError(f"{path}: expected a non-empty model_config_list")
    for model in config.model_config_list.config:
        if not model.name or not model.base_path:
            raise ConfigError(f"{path}: every model needs a name and a base_path, got {model}")
        policy = model.model_version_policy
        if policy.WhichOneof("policy_choice") == "specific":
            unserved = {k: v for k, v in model.version_labels.items() if v not in policy.specific.versions}
            if unserved:
                raise ConfigError(f"{path}: labels {unserved} name versions the specific policy does not load")
    return config


def parse_batching_parameters(path: str | os.PathLike):
    """Parses ``--batching_parameters_file`` and checks TF Serving's rules on it.

    Raises:
        ConfigError: unknown field, or ``allowed_batch_sizes`` not strictly
            increasing with its last entry equal to ``max_batch_size``, or a
            non-positive size / thread count.
    """
    params = _parse(path, BatchingParameters())
    if not params.HasField("max_batch_size") or params.max_batch_size.value < 1:
        raise ConfigError(f"{path}: max_batch_size must be set and >= 1")
    if params.HasField("num_batch_threads") and params.num_batch_threads.value < 1:
        raise ConfigError(f"{path}: num_batch_threads must be >= 1, got {params.num_batch_threads.value}")
    sizes = list(params.allowed_batch_sizes)
    if sizes:
        if sizes[0] < 1 or any(b <= a for a, b in zip(sizes, sizes[1:])):
            raise ConfigError(f"{path}: allowed_batch_sizes must be positive and strictly increasing, got {sizes}")
        if sizes[-1] != params.max_batch_size.value:
            raise ConfigError(
                f"{path}: the last allowed_batch_sizes entry ({sizes[-1]}) must equal max_batch_size "
                f"({params.max_batch_size.value})"
            )
    return params


def parse_monitoring_config(path: str | os.PathLike):
    """Parses ``--monitoring_config_file``; an enabled Prometheus path must be absolute and outside ``/v1/``."""
    config = _parse(path, MonitoringConfig())
    prometheus = config.prometheus_config
    if prometheus.enable and (not prometheus.path.startswith("/") or prometheus.path.lower().startswith("/v1/")):
        raise ConfigError(f"{path}: prometheus path must start with / and not with /v1/, got {prometheus.path!r}")
    return config
