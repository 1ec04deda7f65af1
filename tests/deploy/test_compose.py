"""deploy/compose.yaml (+ the GPU override) against the Compose Specification schema, and the
wiring the stack depends on: one shared volume, one log shard, healthchecks, start order."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from .files import DEPLOY, ENTRYPOINTS, entrypoint_name, known_settings, ours

SCHEMA = json.loads((DEPLOY / "schemas" / "compose-spec.json").read_text())
FILES = (DEPLOY / "compose.yaml", DEPLOY / "compose.gpu.yaml")


def _load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())  # resolves the x- anchors and << merges
    assert isinstance(data, dict)
    return data


def _errors(doc: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(SCHEMA)
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(doc)]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _load(FILES[0])


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_valid_against_the_compose_spec(path: Path) -> None:
    assert _errors(_load(path)) == []


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d["services"]["annotator"]["depends_on"]["server"].update(
            condition="service_helthy"
        ),
        lambda d: d["services"]["server"].update(helthcheck={"test": ["CMD", "true"]}),
        lambda d: d["services"]["server"]["healthcheck"].update(test={"cmd": "true"}),
        lambda d: d["volumes"].update({"tiller-data": {"drivr": "local"}}),
    ],
    ids=["bad-condition", "misspelt-key", "bad-type", "misspelt-volume-key"],
)
def test_schema_rejects_mistakes(compose: dict[str, Any], mutate: Any) -> None:
    doc = copy.deepcopy(compose)
    mutate(doc)
    assert _errors(doc)


def test_services_and_their_entrypoints(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"server", "annotator", "learner", "judge"}
    scripts = {name: entrypoint_name(s["entrypoint"][0]) for name, s in services.items()}
    assert scripts == {
        "server": "server.sh",
        "annotator": "annotator.sh",
        "learner": "learner.sh",
        "judge": "judge.sh",
    }
    for name in ("server", "judge"):
        test = services[name]["healthcheck"]["test"]
        assert test[0] == "CMD" and entrypoint_name(test[1]) in ENTRYPOINTS, (name, test)


def test_shared_volume_and_one_log_shard(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(compose["volumes"]) == {"tiller-data"}
    for name in ("server", "annotator", "learner"):
        assert "tiller-data:/data" in services[name]["volumes"], name
    shards = {services[n]["environment"]["TILLER_LOG_SHARD"] for n in ("server", "annotator")}
    shards.add(services["learner"]["environment"]["TILLER_LOG_SHARD"])
    assert len(shards) == 1, "server, annotator and learner must use the same log shard"
    assert services["learner"]["environment"]["TILLER_TARGET"] == "server:50051"
    assert services["annotator"]["environment"]["TILLER_JUDGE_URL"] == "http://judge:8000/v1"


def test_start_order_waits_for_health(compose: dict[str, Any]) -> None:
    s = compose["services"]
    assert s["annotator"]["depends_on"]["server"]["condition"] == "service_healthy"
    assert s["annotator"]["depends_on"]["judge"]["condition"] == "service_healthy"
    assert s["learner"]["depends_on"]["server"]["condition"] == "service_healthy"
    # the server drains for --drain-grace (30 s) after SIGTERM before compose kills it
    assert s["server"]["stop_grace_period"] == "45s"


def test_gpu_override_names_existing_services(compose: dict[str, Any]) -> None:
    gpu = _load(FILES[1])
    assert set(gpu["services"]) <= set(compose["services"])
    for name in ("server", "judge", "learner"):
        (device,) = gpu["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert {s["build"]["dockerfile"] for s in gpu["services"].values()} == {
        "deploy/docker/Dockerfile.gpu"
    }


def test_every_setting_is_read_by_an_entrypoint(compose: dict[str, Any]) -> None:
    known = known_settings()
    for path in FILES:
        for name, service in _load(path)["services"].items():
            unknown = ours(service.get("environment", {})) - known
            assert not unknown, f"{path.name}: {name} sets {unknown}, which nothing reads"


def test_the_settings_check_can_fail() -> None:
    assert "TILLER_LOG_SHARD" in known_settings()
    assert "TILLER_LOG_SHRAD" not in known_settings()
