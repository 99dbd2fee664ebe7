"""serving/: every TF Serving config parses with the protobuf messages, and compose / k8s files agree with them."""

from __future__ import annotations

import http.server
import json
import pathlib
import re
import subprocess
import threading

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
# The flags tensorflow_model_server 2.21 declares (main.cc), one name a line after a header naming the source.
FLAG_LIST = pathlib.Path(__file__).resolve().parent / "data" / "tensorflow_model_server_2.21_flags.txt"
REQUIRED_FLAGS = {
    "port", "rest_api_port", "model_config_file", "enable_batching", "batching_parameters_file",
    "monitoring_config_file", "tensorflow_intra_op_parallelism", "tensorflow_inter_op_parallelism",
    "rest_api_num_threads",
}  # fmt: skip
# Value types of the flags this deployment uses, as main.cc declares them (bool / int32 / int64).
BOOL_FLAGS = {"enable_batching", "enable_model_warmup", "allow_version_labels_for_unavailable_models"}
INT_FLAGS = {
    "port", "rest_api_port", "rest_api_num_threads", "model_config_file_poll_wait_seconds",
    "file_system_poll_wait_seconds", "tensorflow_intra_op_parallelism", "tensorflow_inter_op_parallelism",
}  # fmt: skip
TF_MAJOR_MINOR = ".".join(tf.__version__.split(".")[:2])


def _read_flag_list(path: pathlib.Path) -> frozenset[str]:
    header, *lines = path.read_text().splitlines()
    assert header.startswith("#") and "tensorflow_serving/model_servers/main.cc" in header, header
    assert f"TensorFlow Serving {TF_MAJOR_MINOR}" in header, (header, tf.__version__)
    names = [line.strip() for line in lines if line.strip()]
    assert len(names) == len(set(names)), "duplicate names in the flag list"
    assert all(re.fullmatch(r"[a-z][a-z0-9_]*", name) for name in names), names
    return frozenset(names)


REAL_FLAGS = _read_flag_list(FLAG_LIST)


def _parse_flags(args: list[str], known: frozenset[str] = REAL_FLAGS) -> tuple[dict[str, str], list[str]]:
    """Reads ``--name=value`` arguments; returns the flags and every problem found, in order."""
    flags, problems = {}, []
    for arg in args:
        if not (arg.startswith("--") and "=" in arg):
            problems.append(f"flags must be written --name=value, got {arg!r}")
            continue
        name, value = arg[2:].split("=", 1)
        if name not in known:
            problems.append(f"unknown tensorflow_model_server flag --{name}")
        elif name in flags:
            problems.append(f"--{name} given twice")
        elif name in BOOL_FLAGS and value not in ("true", "false"):
            problems.append(f"--{name} takes true or false, got {value!r}")
        elif name in INT_FLAGS and not re.fullmatch(r"[0-9]+", value):
            problems.append(f"--{name} takes a non-negative integer, got {value!r}")
        flags[name] = value
    return flags, problems


def _flags(args: list[str]) -> dict[str, str]:
    flags, problems = _parse_flags(args)
    assert not problems, problems
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
        (
            parse_batching_parameters,
            "max_batch_size { value: 8 }\nallowed_batch_sizes: 4\nallowed_batch_sizes: 6\n",
            "must equal",
        ),
        (
            parse_batching_parameters,
            "max_batch_size { value: 8 }\nallowed_batch_sizes: 8\nallowed_batch_sizes: 4\n",
            "increasing",
        ),
        (parse_batching_parameters, "max_batch_sise { value: 8 }\n", "no field named"),
        (parse_batching_parameters, "max_batch_size: 8\n", "max_batch_size"),
        (parse_monitoring_config, "prometheus_config { enable: true path: 3 }\n", "path"),
        (parse_monitoring_config, "prometheus_config { enabled: true }\n", "no field named"),
        (
            parse_model_server_config,
            "model_config_list { config { name: 'dolg' base_path: '/m' policy: 1 } }\n",
            "no field",
        ),
        (
            parse_model_server_config,
            "model_config_list { config { name: 'dolg' base_path: '/m'"
            " model_version_policy { specific { versions: 2 } }"
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


# --- TF Serving 2.21 start-up rules, thread pools, Kubernetes hygiene, compose healthcheck -------------------------


def _all_k8s() -> dict[str, dict]:
    docs = {}
    for path in sorted((SERVING / "k8s").glob("*.yaml")):
        docs[path.name] = _k8s(path.name)
    return docs


def _cpu_count(value) -> float:
    """A Kubernetes CPU quantity ("4", "500m") or a compose ``cpus`` value, in CPUs."""
    text = str(value)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _deployments() -> dict[str, tuple[list[str], float]]:
    """Every place tensorflow_model_server is started: its arguments and its CPU limit."""
    service = _compose("docker-compose.yml")["services"]["dolg-serving"]
    found = {"docker-compose.yml": (service["command"], _cpu_count(service["cpus"]))}
    for name, doc in _all_k8s().items():
        if doc["kind"] == "Deployment":
            (container,) = doc["spec"]["template"]["spec"]["containers"]
            found[name] = (container["args"], _cpu_count(container["resources"]["limits"]["cpu"]))
    return found


DEPLOYMENTS = sorted(_deployments())


def test_flag_list_names_its_source_and_holds_the_flags_tf_serving_documents():
    # Flags TF Serving's configuration guide documents; each must be in the list taken from main.cc.
    documented = {
        "port", "rest_api_port", "model_config_file", "model_config_file_poll_wait_seconds", "enable_batching",
        "batching_parameters_file", "monitoring_config_file", "allow_version_labels_for_unavailable_models",
        "tensorflow_intra_op_parallelism", "tensorflow_inter_op_parallelism", "rest_api_num_threads",
        "file_system_poll_wait_seconds", "enable_model_warmup",
    }  # fmt: skip
    assert documented <= REAL_FLAGS, documented - REAL_FLAGS
    # Flags of other servers or of older TF Serving releases, never in 2.21's main.cc.
    assert not {"model_config", "rest_port", "grpc_port", "enable_warmup", "tensorflow_session_threads"} & REAL_FLAGS


def test_flag_checker_rejects_typos_and_malformed_flags():
    _, problems = _parse_flags(["--rest_api_num_thread=4"])
    assert problems == ["unknown tensorflow_model_server flag --rest_api_num_thread"]
    _, problems = _parse_flags(["--port 8500", "--port=8500", "--port=8501"])
    assert problems == ["flags must be written --name=value, got '--port 8500'", "--port given twice"]
    _, problems = _parse_flags(["--enable_batching=yes", "--tensorflow_intra_op_parallelism=4.0"])
    assert len(problems) == 2 and "true or false" in problems[0] and "integer" in problems[1]
    flags, problems = _parse_flags(["--allow_version_labels_for_unavailable_models=true"])
    assert not problems and flags == {"allow_version_labels_for_unavailable_models": "true"}


def _label_problems(models, flags: dict[str, str]) -> list[str]:
    """TF Serving refuses at start-up a label whose version is not loaded yet, unless allowed by the flag."""
    labelled = [m.name for m in models.model_config_list.config if m.version_labels]
    if labelled and flags.get("allow_version_labels_for_unavailable_models") != "true":
        return [f"models {labelled} have version labels: pass --allow_version_labels_for_unavailable_models=true"]
    return []


def test_label_rule_has_teeth(configs):
    assert dict(_model(configs).version_labels), "models.config no longer labels a version: update this test"
    assert _label_problems(configs["models"], {"port": "8500"})
    assert _label_problems(configs["models"], {"allow_version_labels_for_unavailable_models": "false"})
    assert not _label_problems(configs["models"], {"allow_version_labels_for_unavailable_models": "true"})


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_deployment_starts_with_the_version_label(configs, name):
    args, _ = _deployments()[name]
    assert not _label_problems(configs["models"], _flags(args))


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_thread_pools_follow_the_cpu_limit(configs, name):
    args, cpus = _deployments()[name]
    flags = _flags(args)
    intra, inter = int(flags["tensorflow_intra_op_parallelism"]), int(flags["tensorflow_inter_op_parallelism"])
    # 0 means "auto", which TensorFlow takes from the node's cores: exactly what must not happen here.
    assert cpus == int(cpus) and intra == int(cpus), (intra, cpus)
    assert 1 <= inter <= intra
    # TF Serving's own default is 4 REST threads per core; never more than that per CPU of the limit.
    assert 1 <= int(flags["rest_api_num_threads"]) <= 4 * cpus
    assert configs["batching"].num_batch_threads.value <= cpus


def _selectors_can_overlap(a: dict[str, str], b: dict[str, str]) -> bool:
    """Two matchLabels selectors can select one pod unless they require different values for some key."""
    return all(a[key] == b[key] for key in a.keys() & b.keys())


def test_cpu_and_gpu_selectors_are_disjoint():
    assert _selectors_can_overlap({"app": "dolg-serving"}, {"app": "dolg-serving", "accelerator": "gpu"})
    assert not _selectors_can_overlap({"app": "x", "accelerator": "cpu"}, {"app": "x", "accelerator": "gpu"})

    cpu, gpu = _k8s("deployment.yaml"), _k8s("deployment-gpu.yaml")
    selectors = {d["metadata"]["name"]: d["spec"]["selector"]["matchLabels"] for d in (cpu, gpu)}
    templates = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in (cpu, gpu)}
    assert not _selectors_can_overlap(*selectors.values()), selectors
    for own, selector in selectors.items():
        for other, labels in templates.items():
            assert (selector.items() <= labels.items()) == (own == other), (own, other)
    # The Service balances over both on purpose.
    service = _k8s("service.yaml")["spec"]["selector"]
    assert all(service.items() <= labels.items() for labels in templates.values())


def test_each_deployment_has_its_own_hpa():
    docs = _all_k8s()
    kustomized = set(yaml.safe_load((SERVING / "kustomization.yaml").read_text())["resources"])
    deployments = {d["metadata"]["name"]: f for f, d in docs.items() if d["kind"] == "Deployment"}
    hpas = {f: d for f, d in docs.items() if d["kind"] == "HorizontalPodAutoscaler"}
    assert len(deployments) == 2 and len(hpas) == 2
    targets = {}
    for file, hpa in hpas.items():
        ref = hpa["spec"]["scaleTargetRef"]
        assert (ref["apiVersion"], ref["kind"]) == ("apps/v1", "Deployment") and ref["name"] in deployments, ref
        targets.setdefault(ref["name"], []).append(file)
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        # An HPA is applied together with its Deployment: both in `kubectl apply -k serving/`, or neither.
        assert (f"k8s/{file}" in kustomized) == (f"k8s/{deployments[ref['name']]}" in kustomized), file
    assert sorted(targets) == sorted(deployments) and all(len(v) == 1 for v in targets.values()), targets
    for file in deployments.values():
        # A fixed replica count would fight the HPA on every apply.
        assert "replicas" not in docs[file]["spec"], file


def _pod_spec(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"] if doc["kind"] == "Deployment" else doc["spec"]


@pytest.mark.parametrize("name", ["deployment.yaml", "deployment-gpu.yaml", "models-writer.yaml"])
def test_pods_run_unprivileged_with_a_read_only_root(name):
    pod = _pod_spec(_k8s(name))
    context = pod["securityContext"]
    assert context["runAsNonRoot"] is True
    assert isinstance(context["runAsUser"], int) and context["runAsUser"] > 0
    volumes = {v["name"]: v for v in pod["volumes"]}
    for container in pod["containers"]:
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        (tmp,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
        assert "emptyDir" in volumes[tmp["name"]] and not tmp.get("readOnly", False)


def test_model_volume_claim_is_shared_by_every_pod():
    pvc = _k8s("pvc.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim"
    assert "k8s/pvc.yaml" in yaml.safe_load((SERVING / "kustomization.yaml").read_text())["resources"]
    # Several replicas on several nodes read it while the writer pod adds versions.
    assert "ReadWriteMany" in pvc["spec"]["accessModes"] and pvc["spec"]["resources"]["requests"]["storage"]
    for name, writes in [("deployment.yaml", False), ("deployment-gpu.yaml", False), ("models-writer.yaml", True)]:
        pod = _pod_spec(_k8s(name))
        claims = {v["name"]: v["persistentVolumeClaim"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        ((volume, claim),) = claims.items()
        assert claim["claimName"] == pvc["metadata"]["name"], name
        (mount,) = [m for c in pod["containers"] for m in c["volumeMounts"] if m["name"] == volume]
        assert mount["mountPath"] == "/models" and mount.get("readOnly", False) is not writes, name


def _healthcheck_script(configs) -> str:
    service = _compose("docker-compose.yml")["services"]["dolg-serving"]
    test = service["healthcheck"]["test"]
    assert test[:3] == ["CMD", "bash", "-c"] and len(test) == 4, test
    script = test[3]
    # Compose interpolates $NAME; a literal dollar would have to be written $$.
    assert "$" not in script.replace("$$", ""), script
    script = script.replace("$$", "$")
    # The image ships neither curl nor wget.
    assert not re.search(r"\b(curl|wget)\b", script), script
    rest_port = _flags(service["command"])["rest_api_port"]
    assert f"/dev/tcp/127.0.0.1/{rest_port}" in script and f"GET /v1/models/{_model(configs).name} " in script
    return script


def test_compose_is_hardened_and_has_a_healthcheck(configs):
    service = _compose("docker-compose.yml")["services"]["dolg-serving"]
    _healthcheck_script(configs)
    check = service["healthcheck"]
    assert {"interval", "timeout", "retries", "start_period"} <= set(check)
    uid = service["user"].split(":")[0]
    assert uid.isdigit() and int(uid) > 0
    assert service["read_only"] is True and "ALL" in service["cap_drop"]
    assert any(t.split(":")[0] == "/tmp" for t in service["tmpfs"])
    assert "no-new-privileges:true" in service["security_opt"]


class _StatusHandler(http.server.BaseHTTPRequestHandler):
    responses: dict[str, tuple[int, dict]] = {}

    def do_GET(self):
        code, body = self.responses.get(self.path, (404, {"error": f"Could not find any versions of {self.path}"}))
        data = json.dumps(body, indent=1).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def _model_status(state: str) -> dict:
    # GET /v1/models/{name} as TF Serving's REST API documents it (api_rest.md, "Model status API").
    return {
        "model_version_status": [
            {"version": "1", "state": state, "status": {"error_code": "OK", "error_message": ""}},
        ]
    }


@pytest.mark.integration
def test_compose_healthcheck_passes_only_once_a_version_is_available(configs):
    script = _healthcheck_script(configs)
    rest_port = _flags(_compose("docker-compose.yml")["services"]["dolg-serving"]["command"])["rest_api_port"]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StatusHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        local = script.replace(f"/dev/tcp/127.0.0.1/{rest_port}", f"/dev/tcp/127.0.0.1/{server.server_address[1]}")
        path = f"/v1/models/{_model(configs).name}"

        def run(responses) -> int:
            _StatusHandler.responses = responses
            return subprocess.run(["bash", "-c", local], capture_output=True, timeout=30).returncode

        assert run({path: (200, _model_status("AVAILABLE"))}) == 0
        assert run({path: (200, _model_status("LOADING"))}) != 0
        assert run({}) != 0  # 404: the model is not known (yet)
        assert run({"/v1/models/other": (200, _model_status("AVAILABLE"))}) != 0
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    # Nothing listening: the check must fail, not hang.
    assert subprocess.run(["bash", "-c", local], capture_output=True, timeout=30).returncode != 0
