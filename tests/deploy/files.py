"""What the deploy tests read: the repository's deploy files, parsed without docker.

``ENTRYPOINTS`` are the scripts ``test_entrypoints.py`` runs outside docker; the static tests
check that every Dockerfile, compose service and Kubernetes container runs one of them.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
import sysconfig
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
IMAGE_ROOT = "/opt/tiller/"  # where the Dockerfiles put the repository
ENTRYPOINTS = frozenset(
    {"server.sh", "healthcheck.sh", "annotator.sh", "learner.sh", "judge.sh", "judge-health.sh"}
)
DOCKERFILES = (DEPLOY / "docker" / "Dockerfile.cpu", DEPLOY / "docker" / "Dockerfile.gpu")


def tool(name: str) -> str:
    """A console script installed by the dev extra, from this interpreter's scripts folder."""
    for folder in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        path = Path(folder) / name
        if path.exists():
            return str(path)
    raise AssertionError(f"{name} is not installed: run deploy/install.sh --dev")


def in_repo(image_path: str) -> Path:
    """The repository file an absolute path inside the image refers to."""
    assert image_path.startswith(IMAGE_ROOT), f"{image_path} is not under {IMAGE_ROOT}"
    return REPO / image_path.removeprefix(IMAGE_ROOT)


def entrypoint_name(image_path: str) -> str:
    """The script name of ``/opt/tiller/deploy/entrypoints/X.sh``; it must exist, executable."""
    path = in_repo(image_path)
    assert path.parent == DEPLOY / "entrypoints", f"{image_path} is not an entrypoint script"
    assert path.is_file(), f"{image_path}: no such file in the repository"
    assert path.stat().st_mode & 0o111, f"{path} is not executable"
    return path.name


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case
    args: str
    line: int


def instructions(text: str) -> list[Instruction]:
    """Dockerfile instructions with line continuations joined and comments dropped."""
    out: list[Instruction] = []
    buf, start = "", 0
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if not buf:
            start = n
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        keyword, _, args = buf.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
        buf = ""
    return out


def final_stage(text: str) -> list[Instruction]:
    """The instructions of the last ``FROM`` stage (what the image runs)."""
    ins = instructions(text)
    last = max(i for i, x in enumerate(ins) if x.keyword == "FROM")
    return ins[last:]


def exec_form(args: str) -> list[str]:
    """A JSON-array (exec form) argument; shell form is refused (signals would miss PID 1)."""
    assert args.startswith("["), f"not exec form: {args}"
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value


def root_problems(text: str) -> list[str]:
    """Why the image would run as root (empty list: it runs as a non-root user).

    The final stage must set USER, and the last USER must not be root (name or uid 0)."""
    users = [i for i in final_stage(text) if i.keyword == "USER"]
    if not users:
        return ["the final stage has no USER: the container runs as root"]
    user = users[-1].args.split(":")[0].strip()
    if user in ("root", "0"):
        return [f"line {users[-1].line}: the last USER is {user}"]
    return []


def healthcheck_command(text: str) -> list[str]:
    """The final stage's HEALTHCHECK command (exec form)."""
    checks = [i for i in final_stage(text) if i.keyword == "HEALTHCHECK"]
    assert len(checks) == 1, "the final stage needs exactly one HEALTHCHECK"
    words = shlex.split(checks[0].args.partition("[")[0])
    assert words and words[-1] == "CMD", f"HEALTHCHECK without CMD: {checks[0].args}"
    return exec_form("[" + checks[0].args.partition("[")[2])


def entrypoint_command(text: str) -> list[str]:
    entries = [i for i in final_stage(text) if i.keyword == "ENTRYPOINT"]
    assert entries, "the final stage has no ENTRYPOINT"
    return exec_form(entries[-1].args)


def known_settings() -> set[str]:
    """Every TILLER_/JUDGE_ variable the entrypoints or the config templates read (VLLM_ ones
    are vLLM's own)."""
    texts = [p.read_text() for p in (DEPLOY / "entrypoints").glob("*.sh")]
    texts += [p.read_text() for p in (DEPLOY / "config").glob("*.toml")]
    found = set()
    for text in texts:
        found |= set(re.findall(r"\$\{?((?:TILLER|JUDGE)_[A-Z0-9_]+)", text))
        found |= set(re.findall(r'"((?:TILLER|JUDGE)_[A-Z0-9_]+)"', text))  # *_env keys
    return found


def ours(names: Iterable[object]) -> set[str]:
    """The TILLER_/JUDGE_ names among ``names``."""
    return {n for n in names if isinstance(n, str) and n.startswith(("TILLER_", "JUDGE_"))}
