"""serving/: every TF Serving config parses with the protobuf messages, and compose / k8s files agree with them."""

from __future__ import annotations

import pathlib

import pytest
import tensorflow as tf
import yaml

from dolg_tf.errors import ConfigError
from dolg_tf.export import ExportConfig
from dolg_tf.server.tf_serving_configs import (
    parse_batching_parameters,
    parse_model_server_config,
    parse_monitoring_config,
)

SERVING = pathlib.Path(__file__).resolve().parents[1] / "serving"
# tensorflow_model_server flags this deployment may use (names as main.cc declares them).
KNOWN_FLAGS = {
    "port", "rest_api_port", "rest_api_num_threads", "rest_api_timeout_in_ms", "model_config_file",
    "model_config_file_poll_wait_seconds", "file_system_poll_wait_seconds", "enable_batching",
    "batching_parameters_file", "monitoring_config_file", "enable_model_warmup",
    "tensorflow_intra_op_parallelism", "tensorflow_inter_op_parallelism", "per_process_gpu_memory_fraction",
    "grpc_max_threads", "grpc_channel_arguments",
}  # fmt: skip
REQUIRED_FLAGS = {
    "port", "rest_api_port", "model_config_file", "enable_batching", "batching_parameters_file", "monitoring_config_file",
}  # fmt: skip
TF_MAJOR_MINOR = ".".join(tf.__version__.split(".")[:2])


def _flags(args: list[str]) -> dict[str, str]:
    flags = {}
    for arg in args:
        assert arg.startswith("--") and "=" in arg, f"flags must be written --name=value, got {arg!r}"
        name, value = arg[2:].split("=", 1)
        assert name in KNOWN_FLAGS, f"unknown tensorflow_model_server flag --{name}"
        assert name not in flags, f"--{name} given twice"
        flags[name] = value
    assert REQUIRED_FLAGS <= set(flags), f"missing flags: {REQUIRED_FLAGS - set(flags)}"
    assert flags["enable_batching"] == "true"
    return flags


@pytest.fixture(scope="module")
def configs():
    return {
        "models": parse_model_server_config(SERVING / "models.config"),
        "batching": parse_batching_parameters(SERVING / "batching.config"),
        "monitoring": parse_monitoring_config(SERVING / "monitoring.config"),
    }


def _model(configs):
    (model,) = configs["models"].model_config_list.config
    return model


def test_models_config(configs):
    model = _model(configs)
    assert model.name == "dolg" and model.base_path == "/models/dolg" and model.model_platform == "tensorflow"
    assert model.model_version_policy.WhichOneof("policy_choice") == "latest"
    assert model.model_version_policy.latest.num_versions >= 1
    assert dict(model.version_labels) == {"stable": 1}


def test_batching_config_rules(configs):
    params = configs["batching"]
    sizes = list(params.allowed_batch_sizes)
    assert sizes == sorted(set(sizes)) and sizes[-1] == params.max_batch_size.value
    # The graph refuses batches above the export's max_batch_size, and TF Serving merges up to this size.
    assert params.max_batch_size.value <= ExportConfig().max_batch_size
    assert params.num_batch_threads.value >= 1 and not params.pad_variable_length_inputs


def test_monitoring_config(configs):
    prometheus = configs["monitoring"].prometheus_config
    assert prometheus.enable and prometheus.path == "/monitoring/prometheus/metrics"


@pytest.mark.parametrize(
    "parser, text, message",
    [
        (parse_batching_parameters, "max_batch_size { value: 8 }\nallowed_batch_sizes: 4\nallowed_batch_sizes: 6\n", "must equal"),
        (parse_batching_parameters, "max_batch_size { value: 8 }\nallowed_batch_sizes: 8\nallowed_batch_sizes: 4\n", "increasing"),
        (parse_batching_parameters, "max_batch_sise { value: 8 }\n", "no field named"),
        (parse_batching_parameters, "max_batch_size: 8\n", "max_batch_size"),
        (parse_monitoring_config, "prometheus_config { enable: true path: 3 }\n", "path"),
        (parse_monitoring_config, "prometheus_config { enabled: true }\n", "no field named"),
        (parse_model_server_config, "model_config_list { config { name: 'dolg' base_path: '/m' policy: 1 } }\n", "no field"),
        (
            parse_model_server_config,
            "model_config_list { config { name: 'dolg' base_path: '/m' model_version_policy { specific { versions: 2 } }"
            " version_labels { key: 'stable' value: 1 } } }\n",
            "labels",
        ),
    ],
)
def test_parsers_reject_typos_and_rule_breaks(tmp_path, parser, text, message):
    path = tmp_path / "bad.config"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        parser(path)


def _compose(name: str) -> dict:
    return yaml.safe_load((SERVING / name).read_text())


def test_docker_compose_matches_configs(configs):
    service = _compose("docker-compose.yml")["services"]["dolg-serving"]
    image, tag = service["image"].split(":")
    assert image == "tensorflow/serving" and tag.startswith(TF_MAJOR_MINOR + "."), (tag, tf.__version__)
    assert service["entrypoint"] == ["/usr/bin/tensorflow_model_server"]
    flags = _flags(service["command"])
    published = {p.split(":")[1] for p in service["ports"]}
    assert {flags["port"], flags["rest_api_port"]} == published == {"8500", "8501"}
    mounts = {}
    for volume in service["volumes"]:
        host, container, *mode = volume.split(":")
        assert mode == ["ro"], f"mount {volume} should be read-only"
        mounts[container] = (SERVING / host).resolve()
    for flag in ("model_config_file", "batching_parameters_file", "monitoring_config_file"):
        host = mounts[flags[flag]]
        assert host.parent == SERVING and host.exists(), (flag, host)
    model = _model(configs)
    assert mounts[model.base_path] == (SERVING.parent / "saved_models" / model.name).resolve()

    gpu = _compose("docker-compose.gpu.yml")["services"]["dolg-serving"]
    assert gpu["image"] == f"tensorflow/serving:{tag}-gpu"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]


def _k8s(name: str) -> dict:
    (doc,) = list(yaml.safe_load_all((SERVING / "k8s" / name).read_text()))
    return doc


@pytest.mark.parametrize("name, gpu", [("deployment.yaml", False), ("deployment-gpu.yaml", True)])
def test_k8s_deployment_matches_configs(configs, name, gpu):
    deployment = _k8s(name)
    assert deployment["kind"] == "Deployment"
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    flags = _flags(container["args"])
    assert container["image"].split(":")[1].startswith(TF_MAJOR_MINOR + ".")
    assert container["image"].endswith("-gpu") == gpu
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": int(flags["port"]), "http": int(flags["rest_api_port"])}

    model = _model(configs)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == f"/v1/models/{model.name}" and get["port"] == ports["http"], probe
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(ports["http"])
    assert annotations["prometheus.io/path"] == configs["monitoring"].prometheus_config.path

    resources = container["resources"]
    assert resources["requests"]["cpu"] and resources["limits"]["memory"]
    assert ("nvidia.com/gpu" in resources["limits"]) == gpu

    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert model.base_path.startswith(mounts["models"] + "/")
    config_map = volumes["config"]["configMap"]["name"]
    kustomization = yaml.safe_load((SERVING / "kustomization.yaml").read_text())
    (generator,) = kustomization["configMapGenerator"]
    assert generator["name"] == config_map and kustomization["generatorOptions"]["disableNameSuffixHash"]
    for flag in ("model_config_file", "batching_parameters_file", "monitoring_config_file"):
        directory, filename = flags[flag].rsplit("/", 1)
        assert directory == mounts["config"] and filename in generator["files"], flag
        assert (SERVING / filename).exists()


def test_k8s_service_and_hpa_target_the_deployment():
    deployment = _k8s("deployment.yaml")
    service = _k8s("service.yaml")
    hpa = _k8s("hpa.yaml")
    kustomization = yaml.safe_load((SERVING / "kustomization.yaml").read_text())
    assert {"k8s/deployment.yaml", "k8s/service.yaml", "k8s/hpa.yaml"} <= set(kustomization["resources"])
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    container_ports = {p["name"] for p in container["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} == container_ports
    assert {p["port"] for p in service["spec"]["ports"]} == {8500, 8501}
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu" and 0 < metric["resource"]["target"]["averageUtilization"] <= 100
