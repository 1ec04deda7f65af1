"""bench/gpu_check.sh: shellcheck-clean, and its --dry-run prints the commands it would run,
with flags that the bench scripts it calls accept."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

from .files import REPO, tool

SCRIPT = REPO / "bench" / "gpu_check.sh"
BENCHES = ("bench/serve_throughput.py", "bench/steer_overhead.py", "bench/hotswap.py")


def _dry_run(*args: str) -> list[list[str]]:
    r = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [line for line in r.stdout.splitlines() if line.startswith("+ ")]
    return [shlex.split(line[2:]) for line in lines]


def test_gpu_check_is_shellcheck_clean() -> None:
    r = subprocess.run(
        [tool("shellcheck"), str(SCRIPT)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_dry_run_prints_install_serve_and_the_three_benchmarks() -> None:
    cmds = _dry_run("--model", "smollm2", "--out", "/tmp/gpu-check-out")
    install = cmds[0]
    assert install[1:4] == ["-m", "pip", "install"] and ".[gpu]" in install, install
    by_script = {c[1]: c for c in cmds if len(c) > 1 and c[1] in BENCHES}
    assert list(by_script) == list(BENCHES), cmds
    for cmd in by_script.values():
        assert cmd[cmd.index("--model") + 1] == "smollm2"
        assert cmd[cmd.index("--out") + 1].startswith("/tmp/gpu-check-out/")
    # the last command prints the three figures from the benchmarks' JSON
    assert "Tiller ÷ vllm serve tok/s" in cmds[-1][2] and cmds[-1][-1] == "/tmp/gpu-check-out"
    assert "steering k=4 overhead" in cmds[-1][2] and "hot-swap latency" in cmds[-1][2]


def test_the_benchmarks_accept_the_flags_it_passes() -> None:
    checked = set()
    for cmd in _dry_run():
        if len(cmd) < 2 or cmd[1] not in BENCHES:
            continue
        checked.add(cmd[1])
        r = subprocess.run(
            [sys.executable, cmd[1], "--help"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, r.stderr
        for flag in (a for a in cmd[2:] if a.startswith("--")):
            assert re.search(rf"{re.escape(flag)}\b", r.stdout), f"{cmd[1]} has no {flag}"
    assert checked == set(BENCHES), checked


def test_unknown_arguments_are_refused() -> None:
    r = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", "--no-such"], capture_output=True, text=True
    )
    assert r.returncode == 2 and "--no-such" in r.stderr
