"""The architecture contracts in pyproject.toml (import-linter): kept by the tree, and they bite.

The second test copies the four packages into a scratch ``tiller`` namespace, adds one forbidden
import, and runs the project's own contracts over that copy (it comes first on PYTHONPATH).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("server", "learner", "client", "protos")
# Same interpreter as the tests, whatever is on PATH.
LINT_IMPORTS = [
    sys.executable,
    "-c",
    "from importlinter.cli import lint_imports_command; lint_imports_command()",
]


def _lint(cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LINT_IMPORTS, "--no-cache"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_tree_keeps_every_contract() -> None:
    done = _lint(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


@pytest.mark.parametrize(
    ("path", "line", "contract"),
    [
        (
            "learner/stats.py",
            "from tiller.server import engine",
            "The learner imports from the server only its formats and offline tools",
        ),
        (
            "server/formats/manifest.py",
            "import torch",
            "The formats import no grpc, torch or vLLM and no other Tiller module",
        ),
        (
            "server/service.py",
            "from tiller.server import servicer",
            "Server layers are one-way: edge -> request service -> engine -> formats",
        ),
        (
            "client/results.py",
            "from tiller.server import values",
            "The client is grpc, protobuf and the stubs: no server, learner, torch or vLLM",
        ),
    ],
)
def test_a_forbidden_import_breaks_its_contract(
    tmp_path: Path, path: str, line: str, contract: str
) -> None:
    ignore = shutil.ignore_patterns("__pycache__")
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / "tiller" / package, ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    assert _lint(tmp_path, env).returncode == 0  # the copy is analysed and clean ...

    target = tmp_path / "tiller" / path
    target.write_text(target.read_text() + f"\n{line}\n")
    done = _lint(tmp_path, env)  # ... until the forbidden import
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"{contract} BROKEN" in done.stdout
    assert f"tiller.{path.removesuffix('.py').replace('/', '.')} ->" in done.stdout
