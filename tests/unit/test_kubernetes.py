"""The Kubernetes manifests (deploy/kubernetes), checked without a cluster: each kustomization is
rendered with `kubectl kustomize`, every resource is validated against the Kubernetes schemas
(kubernetes_validate, strict) or, for the Prometheus Operator's ServiceMonitor, which has no
schema there, by hand; then what the manifests promise is checked against the code they deploy:
the container arguments are parsed by `ecomsearch`'s own parser, the ports are the contract's,
the Secret's keys, probes, selectors and the autoscaler's metric fit together. Each check is
also run on a broken copy of the rendered resources, to show it can fail."""

from __future__ import annotations

import argparse
import copy
import functools
import inspect
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate import SchemaNotFoundError

from ecomsearch import contract
from ecomsearch.cli import ADMIN_KEY_ENV, build_parser
from ecomsearch.live.location import STORE_URL_ENV, WRITE_KEY_ENV
from ecomsearch.server.launcher import REAPER_EXIT_TIMEOUT_S, TritonServer
from tests.project import MODEL_REPOSITORY, PROJECT_ROOT

KUBERNETES_DIR = PROJECT_ROOT / "deploy" / "kubernetes"
OVERLAYS = ("cpu", "gpu")
LOAD_CATALOG = "load-catalog"
PROMETHEUS_ADAPTER = "prometheus-adapter"
KUSTOMIZATIONS = (
    *(f"overlays/{overlay}" for overlay in OVERLAYS),
    LOAD_CATALOG,
    PROMETHEUS_ADAPTER,
)
SECRET_EXAMPLE = KUBERNETES_DIR / "examples" / "secret.example.yaml"
# The kubectl the project is checked with (Debian's, which .ci/run installs); the schemas of the
# same Kubernetes release.
KUBERNETES_VERSION = "1.32"
KUSTOMIZE_TIMEOUT_S = 60
KUBECTL_MISSING = (
    "kubectl was not found on PATH; .ci/run installs Debian's `kubectl` package "
    "(apt-get install kubectl), whose `kubectl kustomize` renders offline"
)

SERVER = "server"
BUILD_INDEX = "build-index"
SEED_RETRIEVE_VERSION = "seed-retrieve-version"
SECRET_NAME = "ecomsearch-secrets"
# What the server reads each credential from, and the Secret key that holds it.
SECRET_KEY_OF_ENV = {
    STORE_URL_ENV: "store-url",
    ADMIN_KEY_ENV: "admin-key",
    WRITE_KEY_ENV: "write-key",
}
GPU_RESOURCE = "nvidia.com/gpu"
GPU_PROFILE = "gpu"
TRITONSERVER = Path("/opt/tritonserver/bin/tritonserver")
NON_ROOT_UID = 1000
LIVE_PATH = "/v2/health/live"
READY_PATH = "/v2/health/ready"
METRICS_PATH = "/metrics"
# The alert rules (deploy/monitoring) select job="ecomsearch"; the Prometheus Operator names a
# ServiceMonitor's job after the Service unless told otherwise (jobLabel).
PROMETHEUS_JOB = "ecomsearch"
SEARCH_CONFIG = MODEL_REPOSITORY / contract.SEARCH_MODEL / "config.pbtxt"
QUEUE_COUNTER = "nv_inference_queue_duration_us"
SUCCESS_COUNTER = "nv_inference_request_success"
# "over 1-2 minutes": long enough to span several 15 s scrapes, short enough to react.
RATE_WINDOW_MINUTES = range(1, 3)
# What an overlay deploys; no Secret (credentials are created outside these files).
OVERLAY_KINDS = (
    "Deployment",
    "Service",
    "PodDisruptionBudget",
    "HorizontalPodAutoscaler",
    "ServiceMonitor",
)


# --- Rendering and reading ----------------------------------------------------------------------


@functools.cache
def _render(kustomization: str) -> tuple[dict[str, Any], ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail(KUBECTL_MISSING)
    result = subprocess.run(
        [kubectl, "kustomize", str(KUBERNETES_DIR / kustomization)],
        capture_output=True,
        text=True,
        timeout=KUSTOMIZE_TIMEOUT_S,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"kubectl kustomize {kustomization} failed:\n{result.stderr}")
    return tuple(document for document in yaml.safe_load_all(result.stdout) if document)


def rendered(kustomization: str) -> list[dict[str, Any]]:
    """A copy of the kustomization's resources, free to be broken by a test."""
    return copy.deepcopy(list(_render(kustomization)))


def overlay(name: str) -> list[dict[str, Any]]:
    return rendered(f"overlays/{name}")


def secret_example() -> dict[str, Any]:
    return yaml.safe_load(SECRET_EXAMPLE.read_text())


def one(resources: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [resource for resource in resources if resource["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def all_containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(workload)
    return [*spec.get("initContainers", []), *spec["containers"]]


def container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    found = [c for c in all_containers(workload) if c["name"] == name]
    assert len(found) == 1, f"expected one container {name!r}, found {len(found)}"
    return found[0]


def volume(workload: dict[str, Any], name: str) -> dict[str, Any]:
    found = [v for v in pod_spec(workload).get("volumes", []) if v["name"] == name]
    assert len(found) == 1, f"expected one volume {name!r}, found {len(found)}"
    return found[0]


def mount_at(c: dict[str, Any], path: str) -> dict[str, Any]:
    found = [m for m in c.get("volumeMounts", []) if m["mountPath"] == path]
    assert len(found) == 1, f"container {c['name']!r}: expected one mount at {path}, found {found}"
    return found[0]


def mount_of(c: dict[str, Any], volume_name: str) -> dict[str, Any]:
    found = [m for m in c.get("volumeMounts", []) if m["name"] == volume_name]
    assert len(found) == 1, f"container {c['name']!r} mounts volume {volume_name!r} {len(found)}x"
    return found[0]


def container_port(c: dict[str, Any], port: int | str) -> int:
    """A port as a probe or a Service's targetPort names it: by number or by name."""
    if isinstance(port, int):
        return port
    found = [p["containerPort"] for p in c.get("ports", []) if p.get("name") == port]
    assert len(found) == 1, f"container {c['name']!r} has no port named {port!r}"
    return found[0]


def env_entry(c: dict[str, Any], name: str) -> dict[str, Any] | None:
    found = [e for e in c.get("env", []) if e["name"] == name]
    assert len(found) <= 1, f"container {c['name']!r} sets {name} twice"
    return found[0] if found else None


# --- `ecomsearch` arguments, parsed by the real parser -----------------------------------------


def _subcommand_parser(subcommand: str) -> argparse.ArgumentParser:
    (subcommands,) = [
        action
        for action in build_parser()._actions
        if isinstance(action, argparse._SubParsersAction)
    ]
    return subcommands.choices[subcommand]


def parse_ecomsearch(args: list[str], subcommand: str) -> argparse.Namespace:
    """A container's `ecomsearch <subcommand> ...` arguments, as the command will read them.
    Options must be spelled out: argparse would take an abbreviation (`--startup-timeout`), and
    a later option of the same prefix would change its meaning."""
    assert args[:2] == ["ecomsearch", subcommand], f"not `ecomsearch {subcommand}`: {args}"
    known = _subcommand_parser(subcommand)._option_string_actions
    flags = [token.split("=", 1)[0] for token in args[2:] if token.startswith("-")]
    unknown = [flag for flag in flags if flag not in known]
    assert not unknown, f"`ecomsearch {subcommand}` has no option {unknown} (spelled in full?)"
    repeated = sorted({flag for flag in flags if flags.count(flag) > 1})
    assert not repeated, f"options given twice (the last one wins): {repeated}"
    try:
        return build_parser().parse_args(args[1:])
    except SystemExit as e:  # argparse has printed why
        raise AssertionError(f"`ecomsearch {' '.join(args[1:])}` does not parse") from e


def serve_args(deployment: dict[str, Any]) -> argparse.Namespace:
    return parse_ecomsearch(container(deployment, SERVER)["args"], "serve")


# --- The ServiceMonitor, by hand ---------------------------------------------------------------

# The fields of monitoring.coreos.com/v1 ServiceMonitor these manifests may use (a subset of the
# CRD's); anything else is a typo the API server would reject, or a field nobody reviewed.
SERVICE_MONITOR_SPEC_FIELDS = {
    "selector",
    "endpoints",
    "namespaceSelector",
    "jobLabel",
    "targetLabels",
    "podTargetLabels",
    "sampleLimit",
}
SERVICE_MONITOR_ENDPOINT_FIELDS = {
    "port",
    "path",
    "scheme",
    "interval",
    "scrapeTimeout",
    "honorLabels",
    "relabelings",
    "metricRelabelings",
}
LABEL_SELECTOR_FIELDS = {"matchLabels", "matchExpressions"}
# Prometheus's duration syntax, the CRD's pattern for interval and scrapeTimeout.
PROMETHEUS_DURATION = re.compile(r"^((?P<h>\d+)h)?((?P<m>\d+)m)?((?P<s>\d+)s)?((?P<ms>\d+)ms)?$")
_SECONDS_PER_UNIT = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def duration_s(text: str) -> float:
    match = PROMETHEUS_DURATION.match(text)
    assert match and text, f"not a Prometheus duration: {text!r}"
    return sum(int(v) * _SECONDS_PER_UNIT[unit] for unit, v in match.groupdict().items() if v)


def validate_service_monitor(resource: dict[str, Any]) -> None:
    assert set(resource) == {"apiVersion", "kind", "metadata", "spec"}, sorted(resource)
    assert isinstance(resource["metadata"].get("name"), str) and resource["metadata"]["name"]
    spec = resource["spec"]
    assert set(spec) <= SERVICE_MONITOR_SPEC_FIELDS, sorted(set(spec) - SERVICE_MONITOR_SPEC_FIELDS)
    selector = spec["selector"]
    assert selector and set(selector) <= LABEL_SELECTOR_FIELDS, selector
    assert all(
        isinstance(k, str) and isinstance(v, str)
        for k, v in selector.get("matchLabels", {}).items()
    ), selector
    endpoints = spec["endpoints"]
    assert isinstance(endpoints, list) and endpoints, "a ServiceMonitor needs endpoints"
    for endpoint in endpoints:
        extra = set(endpoint) - SERVICE_MONITOR_ENDPOINT_FIELDS
        assert not extra, f"unknown endpoint fields {sorted(extra)}"
        assert isinstance(endpoint["port"], str), "endpoints name the Service's port"
        assert endpoint.get("path", METRICS_PATH).startswith("/")
        interval = duration_s(endpoint.get("interval", "30s"))
        timeout = duration_s(endpoint.get("scrapeTimeout", "10s"))
        assert 0 < timeout <= interval, "Prometheus refuses a scrape timeout above the interval"


# Kinds kubernetes_validate has no schema for (CustomResourceDefinitions), each with its check.
HAND_CHECKED: dict[tuple[str, str], Callable[[dict[str, Any]], None]] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): validate_service_monitor,
}


def validate(resource: dict[str, Any]) -> None:
    check = HAND_CHECKED.get((resource["apiVersion"], resource["kind"]))
    if check is not None:
        check(resource)
    else:
        # Raises SchemaNotFoundError for any other kind it does not know: never skipped.
        kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)


# --- What the manifests promise ----------------------------------------------------------------


def check_kinds(resources: list[dict[str, Any]], profile: str) -> None:
    kinds = sorted(resource["kind"] for resource in resources)
    assert kinds == sorted(OVERLAY_KINDS), kinds


def check_profile(resources: list[dict[str, Any]], profile: str) -> None:
    deployment = one(resources, "Deployment")
    args = serve_args(deployment)
    gpu_requests = [
        c["name"]
        for c in all_containers(deployment)
        for part in ("requests", "limits")
        if GPU_RESOURCE in c.get("resources", {}).get(part, {})
    ]
    gpu_tolerations = [
        t for t in pod_spec(deployment).get("tolerations", []) if t.get("key") == GPU_RESOURCE
    ]
    server = container(deployment, SERVER)
    if profile == "gpu":
        assert args.model_config_name == GPU_PROFILE
        assert int(server["resources"]["limits"][GPU_RESOURCE]) >= 1
        assert gpu_tolerations, "GPU nodes are usually tainted nvidia.com/gpu"
    else:
        assert args.model_config_name is None, "the CPU profile is each model's config.pbtxt"
        assert not gpu_requests, f"the CPU profile asks for a GPU in {gpu_requests}"
        assert not gpu_tolerations
    server_resources = server["resources"]
    assert {"cpu", "memory"} <= set(server_resources["requests"]), server_resources
    assert "memory" in server_resources["limits"], server_resources


def check_serve_args(resources: list[dict[str, Any]], profile: str) -> None:
    deployment = one(resources, "Deployment")
    server = container(deployment, SERVER)
    args = serve_args(deployment)
    assert args.tritonserver == TRITONSERVER, "the NGC image's own tritonserver"
    assert args.address == "0.0.0.0", "the Service reaches the pod's address, not loopback"
    assert not args.http, "Triton's HTTP API stays off (docs/security.md)"
    assert args.grpc_port == contract.DEFAULT_GRPC_PORT
    assert args.metrics_port == contract.DEFAULT_METRICS_PORT
    assert container_port(server, "grpc") == args.grpc_port
    assert container_port(server, "metrics") == args.metrics_port
    assert not any(arg.startswith("--store") for arg in server["args"]), (
        "the store URL carries a password: the environment, from the Secret"
    )


def check_index_build(resources: list[dict[str, Any]], profile: str) -> None:
    deployment = one(resources, "Deployment")
    server = container(deployment, SERVER)
    model_repository = serve_args(deployment).model_repository
    served = mount_at(server, str(model_repository / contract.RETRIEVE_MODEL / "1"))
    assert "emptyDir" in volume(deployment, served["name"]), "compaction writes beside the index"
    assert not served.get("readOnly"), "compaction writes beside the index"
    init_names = [c["name"] for c in pod_spec(deployment)["initContainers"]]
    assert init_names == [SEED_RETRIEVE_VERSION, BUILD_INDEX], init_names
    seed = container(deployment, SEED_RETRIEVE_VERSION)
    assert mount_of(seed, served["name"])
    builder = container(deployment, BUILD_INDEX)
    build = parse_ecomsearch(builder["args"], "build-index")
    built_into = Path(mount_of(builder, served["name"])["mountPath"]) / "index"
    assert build.index_dir == built_into, f"{build.index_dir} is not where the server looks"
    assert not build.force, "a forced build would ignore an index that is up to date"
    assert same_build(builder["image"], server["image"]), (builder["image"], server["image"])
    job = one(rendered(LOAD_CATALOG), "Job")
    job_build = parse_ecomsearch(container(job, BUILD_INDEX)["args"], "build-index")
    assert job_build.catalog == build.catalog, "another file would replace the served catalog"
    assert container(job, BUILD_INDEX)["image"] == builder["image"]


def same_build(artefacts_image: str, serving_image: str) -> bool:
    """The artefacts stage and the serving image of one build: names `<x>-artefacts` and `<x>`,
    one tag."""
    artefacts_name, _, artefacts_tag = artefacts_image.rpartition(":")
    serving_name, _, serving_tag = serving_image.rpartition(":")
    return artefacts_name == f"{serving_name}-artefacts" and artefacts_tag == serving_tag != ""


def _probe(c: dict[str, Any], kind: str) -> dict[str, Any]:
    probe = c.get(kind)
    assert probe is not None, f"container {c['name']!r} has no {kind}"
    return probe


def check_probes(resources: list[dict[str, Any]], profile: str) -> None:
    deployment = one(resources, "Deployment")
    server = container(deployment, SERVER)
    args = serve_args(deployment)
    for kind, path in (
        ("startupProbe", READY_PATH),
        ("readinessProbe", READY_PATH),
        ("livenessProbe", LIVE_PATH),
    ):
        probe = _probe(server, kind)["httpGet"]
        assert probe["path"] == path, f"{kind} asks {probe['path']}"
        assert container_port(server, probe["port"]) == args.metrics_port, (
            f"{kind} must ask the launcher's ops endpoint"
        )
    startup = _probe(server, "startupProbe")
    window_s = (
        startup.get("initialDelaySeconds", 0)
        + startup["periodSeconds"] * startup["failureThreshold"]
    )
    assert window_s > args.startup_timeout_s, (
        f"the startup probe gives up after {window_s} s, before the launcher's own "
        f"{args.startup_timeout_s:.0f} s (which logs tritonserver's errors)"
    )
    assert deployment["spec"]["progressDeadlineSeconds"] > window_s


def check_graceful_shutdown(resources: list[dict[str, Any]], profile: str) -> None:
    deployment = one(resources, "Deployment")
    server = container(deployment, SERVER)
    pre_stop_s = server["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pre_stop_s > 0, "endpoint removal needs time to reach kube-proxy and clients"
    launcher_stop_s = inspect.signature(TritonServer.stop).parameters["timeout_s"].default
    needed_s = pre_stop_s + launcher_stop_s + REAPER_EXIT_TIMEOUT_S
    grace_s = pod_spec(deployment)["terminationGracePeriodSeconds"]
    assert grace_s >= needed_s, f"{grace_s} s of grace for {needed_s} s of stopping"


RESTRICTED_CONTAINER = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
}


def check_security(resources: list[dict[str, Any]], profile: str) -> None:
    workloads = [r for r in resources if r["kind"] in ("Deployment", "Job")]
    assert workloads
    for workload in workloads:
        pod = pod_spec(workload)["securityContext"]
        assert pod["runAsNonRoot"] is True
        assert pod["runAsUser"] == NON_ROOT_UID, "the image's triton-server user"
        assert pod["runAsGroup"] == NON_ROOT_UID
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod_spec(workload).get("automountServiceAccountToken") is False
        for c in all_containers(workload):
            context = c.get("securityContext", {})
            assert context == RESTRICTED_CONTAINER, f"{c['name']}: {context}"


def check_writable_paths(resources: list[dict[str, Any]], profile: str) -> None:
    deployment = one(resources, "Deployment")
    for c in all_containers(deployment):
        for mount in c.get("volumeMounts", []):
            source = volume(deployment, mount["name"])
            assert "emptyDir" in source, f"{c['name']} mounts {source} (only emptyDirs here)"
            assert source["emptyDir"].get("sizeLimit"), f"{mount['name']}: no sizeLimit"
        home = env_entry(c, "HOME")
        if home is not None:
            assert any(
                Path(home["value"]).is_relative_to(m["mountPath"]) for m in c["volumeMounts"]
            ), f"{c['name']}: HOME={home['value']} is on the read-only root filesystem"
    server = container(deployment, SERVER)
    shm = volume(deployment, mount_at(server, "/dev/shm")["name"])["emptyDir"]
    assert shm.get("medium") == "Memory", "the Python backend's shared memory must be tmpfs"
    tmp = volume(deployment, mount_at(server, "/tmp")["name"])["emptyDir"]
    assert tmp.get("medium") != "Memory", "TensorRT's engine cache need not take memory"
    assert env_entry(server, "HOME") is not None, "the image's HOME is read-only here"


def check_secrets(resources: list[dict[str, Any]], profile: str) -> None:
    workloads = [r for r in resources if r["kind"] in ("Deployment", "Job")]
    assert workloads
    example_keys = set(secret_example()["stringData"])
    assert not [r for r in resources if r["kind"] == "Secret"], "credentials in the manifests"
    for workload in workloads:
        for c in all_containers(workload):
            for entry in c.get("env", []):
                if "value" in entry:
                    assert entry["name"] not in SECRET_KEY_OF_ENV, (
                        f"{c['name']}: {entry['name']} is a literal; it belongs in the Secret"
                    )
                    assert "://" not in entry["value"], f"{c['name']}: {entry['name']} is a URL"
                    continue
                assert entry["name"] in SECRET_KEY_OF_ENV, f"{c['name']}: {entry['name']}?"
                reference = entry["valueFrom"]["secretKeyRef"]
                assert reference["name"] == SECRET_NAME
                assert reference["key"] == SECRET_KEY_OF_ENV[entry["name"]], entry
                assert reference["key"] in example_keys, f"{reference['key']} not in the example"
    deployment = next((r for r in workloads if r["kind"] == "Deployment"), None)
    if deployment is not None:
        server = container(deployment, SERVER)
        for name in SECRET_KEY_OF_ENV:
            assert env_entry(server, name) is not None, f"the server lacks {name}"
        builder = container(deployment, BUILD_INDEX)
        given = {e["name"] for e in builder.get("env", []) if "valueFrom" in e}
        assert given == {STORE_URL_ENV}, f"build-index needs the store, nothing else: {given}"


def check_service(resources: list[dict[str, Any]], profile: str) -> None:
    deployment = one(resources, "Deployment")
    service = one(resources, "Service")
    server = container(deployment, SERVER)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = service["spec"]["selector"]
    assert selector == deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items(), "the Service selects no pod"
    ports = {port["name"]: port for port in service["spec"]["ports"]}
    assert set(ports) == {"grpc", "metrics"}, sorted(ports)
    assert ports["grpc"]["port"] == contract.DEFAULT_GRPC_PORT
    assert ports["metrics"]["port"] == contract.DEFAULT_METRICS_PORT
    for port in ports.values():
        assert container_port(server, port["targetPort"]) == port["port"], port
    assert contract.DEFAULT_HTTP_PORT not in {p["port"] for p in ports.values()}


def check_service_monitor(resources: list[dict[str, Any]], profile: str) -> None:
    service = one(resources, "Service")
    monitor = one(resources, "ServiceMonitor")
    validate_service_monitor(monitor)
    wanted = monitor["spec"]["selector"]["matchLabels"]
    assert wanted and wanted.items() <= service["metadata"]["labels"].items(), (
        f"selects {wanted}, the Service is labelled {service['metadata']['labels']}"
    )
    assert "namespaceSelector" not in monitor["spec"], "the Service is in its own namespace"
    port_names = {port["name"] for port in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in port_names, f"the Service has no port {endpoint['port']!r}"
        assert endpoint.get("path", METRICS_PATH) == METRICS_PATH
    job_label = monitor["spec"].get("jobLabel")
    job = service["metadata"]["labels"][job_label] if job_label else service["metadata"]["name"]
    assert job == PROMETHEUS_JOB, f"Prometheus would call the job {job!r}"


def check_disruption_budget(resources: list[dict[str, Any]], profile: str) -> None:
    deployment = one(resources, "Deployment")
    budget = one(resources, "PodDisruptionBudget")
    autoscaler = one(resources, "HorizontalPodAutoscaler")
    assert budget["spec"]["selector"] == deployment["spec"]["selector"]
    max_unavailable = budget["spec"]["maxUnavailable"]
    assert 1 <= max_unavailable < autoscaler["spec"]["minReplicas"], (
        "a drain must be able to evict a pod, and one must keep serving"
    )


def adapter_rules() -> list[dict[str, Any]]:
    config_map = one(rendered(PROMETHEUS_ADAPTER), "ConfigMap")
    return yaml.safe_load(config_map["data"]["config.yaml"])["rules"]


def search_steps() -> set[str]:
    return set(re.findall(r'model_name:\s*"([^"]+)"', SEARCH_CONFIG.read_text()))


def check_autoscaling(resources: list[dict[str, Any]], profile: str) -> None:
    deployment = one(resources, "Deployment")
    autoscaler = one(resources, "HorizontalPodAutoscaler")
    target = autoscaler["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        deployment["apiVersion"],
        deployment["kind"],
        deployment["metadata"]["name"],
    )
    assert "replicas" not in deployment["spec"], "the autoscaler owns the replica count"
    assert autoscaler["spec"]["minReplicas"] >= 2
    produced = {rule["name"]["as"]: rule for rule in adapter_rules()}
    pods_metrics = [
        m["pods"]["metric"]["name"] for m in autoscaler["spec"]["metrics"] if m["type"] == "Pods"
    ]
    assert pods_metrics, "scales on a Pods metric from Triton's queue time"
    for name in pods_metrics:
        assert name in produced, f"no prometheus-adapter rule produces {name!r}"
        check_queue_rule(produced[name])


def check_queue_rule(rule: dict[str, Any]) -> None:
    """Average queue time of a search, per pod: the steps' queue counters over the searches."""
    assert QUEUE_COUNTER in rule["seriesQuery"]
    assert {"namespace", "pod"} <= set(rule["resources"]["overrides"])
    assert all(
        rule["resources"]["overrides"][label]["resource"] == label for label in ("namespace", "pod")
    )
    query = rule["metricsQuery"]
    assert query.count("<<.LabelMatchers>>") == 2 and "<<.GroupBy>>" in query, query
    numerator, _, denominator = query.partition("/\n")
    steps = re.search(rf'{QUEUE_COUNTER}\{{[^}}]*model=~"([^"]+)"', numerator)
    assert steps, f"no {QUEUE_COUNTER} of the search steps in {numerator}"
    assert set(steps[1].split("|")) == search_steps(), (
        f"the rule's steps {steps[1]} are not those of {SEARCH_CONFIG}"
    )
    assert re.search(rf'{SUCCESS_COUNTER}\{{[^}}]*model="{contract.SEARCH_MODEL}"', denominator)
    windows = {int(m) for m in re.findall(r"\[(\d+)m\]", query)}
    assert len(windows) == 1 and windows <= set(RATE_WINDOW_MINUTES), windows
    assert query.count("rate(") == 2, "both counters as rates"


OVERLAY_CHECKS = (
    check_kinds,
    check_profile,
    check_serve_args,
    check_index_build,
    check_probes,
    check_graceful_shutdown,
    check_security,
    check_writable_paths,
    check_secrets,
    check_service,
    check_service_monitor,
    check_disruption_budget,
    check_autoscaling,
)


# --- Tests --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_rendered_resource_is_valid(kustomization: str) -> None:
    resources = rendered(kustomization)
    assert resources, f"{kustomization} renders nothing"
    for resource in resources:
        validate(resource)


def test_the_secret_example_is_valid_and_only_placeholders() -> None:
    secret = secret_example()
    validate(secret)
    assert secret["metadata"]["name"] == SECRET_NAME
    assert set(secret["stringData"]) == set(SECRET_KEY_OF_ENV.values())
    assert all("REPLACE-ME" in value for value in secret["stringData"].values())


def test_the_secret_example_is_in_no_kustomization() -> None:
    for kustomization in KUBERNETES_DIR.rglob("kustomization.yaml"):
        assert SECRET_EXAMPLE.name not in kustomization.read_text(), kustomization


def test_hand_checked_kinds_have_no_schema_to_validate_against() -> None:
    """Why the ServiceMonitor is checked by hand: kubernetes_validate knows the built-in kinds
    only. Should it ever ship a schema for one of these, use it instead."""
    for api_version, kind in HAND_CHECKED:
        stub = {"apiVersion": api_version, "kind": kind, "metadata": {"name": "x"}}
        with pytest.raises(SchemaNotFoundError):
            kubernetes_validate.validate(stub, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("profile", OVERLAYS)
@pytest.mark.parametrize("check", OVERLAY_CHECKS, ids=lambda check: check.__name__)
def test_overlay(profile: str, check: Callable[[list[dict[str, Any]], str], None]) -> None:
    check(overlay(profile), profile)


def test_load_catalog_job() -> None:
    resources = rendered(LOAD_CATALOG)
    job = one(resources, "Job")
    args = parse_ecomsearch(container(job, BUILD_INDEX)["args"], "build-index")
    scratch = mount_at(container(job, BUILD_INDEX), str(args.index_dir.parent))
    assert "emptyDir" in volume(job, scratch["name"]), "the Job's index is thrown away"
    check_security(resources, "")
    check_secrets(resources, "")


# --- The checks can fail -------------------------------------------------------------------------


def _deployment(resources: list[dict[str, Any]]) -> dict[str, Any]:
    return one(resources, "Deployment")


def _server(resources: list[dict[str, Any]]) -> dict[str, Any]:
    return container(_deployment(resources), SERVER)


def _replace_arg(resources: list[dict[str, Any]], old: str, new: str | None) -> None:
    for c in all_containers(_deployment(resources)):
        if "args" in c and old in c["args"]:
            c["args"] = [a for a in (new if a == old else a for a in c["args"]) if a is not None]
            return
    raise AssertionError(f"no container has the argument {old}")


def _set(path: str, value: Any) -> Callable[[list[dict[str, Any]]], None]:
    """Sets a value at a dotted path of the first resource of the path's first part (a kind)."""
    kind, *keys = path.split(".")

    def mutate(resources: list[dict[str, Any]]) -> None:
        node: Any = one(resources, kind)
        for key in keys[:-1]:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[keys[-1]] = value

    return mutate


def _literal_store_url(resources: list[dict[str, Any]]) -> None:
    entry = env_entry(_server(resources), STORE_URL_ENV)
    assert entry is not None
    entry.pop("valueFrom")
    entry["value"] = "postgresql://ecomsearch:hunter2@db:5432/ecomsearch"


def _shm_on_disk(resources: list[dict[str, Any]]) -> None:
    volume(_deployment(resources), "dshm")["emptyDir"].pop("medium")


def _request_gpu(resources: list[dict[str, Any]]) -> None:
    _server(resources)["resources"]["limits"][GPU_RESOURCE] = "1"


def _probe_grpc(resources: list[dict[str, Any]]) -> None:
    _server(resources)["livenessProbe"]["httpGet"]["port"] = "grpc"


def _short_startup(resources: list[dict[str, Any]]) -> None:
    _server(resources)["startupProbe"]["failureThreshold"] = 30


def _writable_root(resources: list[dict[str, Any]]) -> None:
    _server(resources)["securityContext"]["readOnlyRootFilesystem"] = False


def _typo_in_container(resources: list[dict[str, Any]]) -> None:
    _server(resources)["securityContext"]["readOnlyRootFileSystem"] = True


def _unknown_monitor_field(resources: list[dict[str, Any]]) -> None:
    one(resources, "ServiceMonitor")["spec"]["endpoints"][0]["scrapeInterval"] = "15s"


def _validate_all(resources: list[dict[str, Any]], profile: str) -> None:
    for resource in resources:
        validate(resource)


BROKEN = [
    # (what is broken, profile, how, the check that must notice, what it raises)
    (
        "a Service selector label no pod has",
        "cpu",
        _set("Service.spec.selector", {"app.kubernetes.io/name": "ecomsearc"}),
        check_service,
        AssertionError,
    ),
    (
        "ServiceMonitor on a port the Service does not name",
        "cpu",
        _set("ServiceMonitor.spec.endpoints.0.port", "http-metrics"),
        check_service_monitor,
        AssertionError,
    ),
    (
        "ServiceMonitor selecting another label",
        "gpu",
        _set("ServiceMonitor.spec.selector", {"matchLabels": {"app": "ecomsearch"}}),
        check_service_monitor,
        AssertionError,
    ),
    (
        "a ServiceMonitor field the CRD does not have",
        "gpu",
        _unknown_monitor_field,
        _validate_all,
        AssertionError,
    ),
    (
        "a container field misspelled",
        "cpu",
        _typo_in_container,
        _validate_all,
        kubernetes_validate.ValidationError,
    ),
    (
        "an autoscaler metric no adapter rule produces",
        "cpu",
        _set("HorizontalPodAutoscaler.spec.metrics.0.pods.metric.name", "search_queue_us"),
        check_autoscaling,
        AssertionError,
    ),
    (
        "a disruption budget over other pods",
        "gpu",
        _set(
            "PodDisruptionBudget.spec.selector",
            {"matchLabels": {"app.kubernetes.io/name": "ecomsearch"}},
        ),
        check_disruption_budget,
        AssertionError,
    ),
    (
        "the GPU overlay without the GPU profile",
        "gpu",
        lambda resources: _replace_arg(resources, "--model-config-name=gpu", None),
        check_profile,
        AssertionError,
    ),
    ("the CPU overlay asking for a GPU", "cpu", _request_gpu, check_profile, AssertionError),
    (
        "an abbreviated serve option (argparse would accept it)",
        "cpu",
        lambda resources: _replace_arg(
            resources, "--startup-timeout-s=600", "--startup-timeout=600"
        ),
        check_probes,
        AssertionError,
    ),
    (
        "the index built where the server does not look",
        "gpu",
        lambda resources: _replace_arg(
            resources, "--index-dir=/work/retrieve-version/index", "--index-dir=/work/index"
        ),
        check_index_build,
        AssertionError,
    ),
    ("the store URL as a literal", "cpu", _literal_store_url, check_secrets, AssertionError),
    ("liveness asked on the gRPC port", "cpu", _probe_grpc, check_probes, AssertionError),
    (
        "a startup probe shorter than the launcher's timeout",
        "gpu",
        _short_startup,
        check_probes,
        AssertionError,
    ),
    ("a writable root filesystem", "gpu", _writable_root, check_security, AssertionError),
    ("/dev/shm on disk", "cpu", _shm_on_disk, check_writable_paths, AssertionError),
]


@pytest.mark.parametrize(
    ("profile", "break_it", "check", "error"),
    [case[1:] for case in BROKEN],
    ids=[case[0] for case in BROKEN],
)
def test_a_broken_overlay_fails_its_check(
    profile: str,
    break_it: Callable[[list[dict[str, Any]]], None],
    check: Callable[[list[dict[str, Any]], str], None],
    error: type[Exception],
) -> None:
    resources = overlay(profile)
    check(resources, profile)  # intact, it passes
    break_it(resources)
    with pytest.raises(error):
        check(resources, profile)
