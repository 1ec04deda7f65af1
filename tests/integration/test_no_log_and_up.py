"""The server-wide log switch, and the README's first command (`tiller up`) on SmolLM2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from tests.conftest import ServerProc, start_server, stop_server
from tiller.client import Client, TillerClientError


def test_no_log_switch(tiny_model: Path, tmp_path: Path, server: ServerProc) -> None:
    srv = start_server(
        tiny_model, tmp_path / "nolog", "--no-log", "--cache-dir", str(tmp_path / "cache")
    )
    try:
        with Client(srv.target, timeout=60) as c:
            g = c.generate("not recorded", max_tokens=3, temperature=0.0, log=True)
            assert not g.logged
            with pytest.raises(TillerClientError) as info:
                c.submit_feedback(g.generation_id, score=1.0)
            assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
            assert "--no-log" in info.value.message
    finally:
        stop_server(srv)
    assert not (tmp_path / "cache" / "log").exists()


@pytest.mark.slow
def test_readme_main_job_serves_smollm2_and_prints_a_steered_generation(
    tmp_path: Path, server: ServerProc
) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "tiller.client.cli",
            "up",
            "--once",
            "--port",
            "0",
            "--gpu-memory-utilization",
            "0.3",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "serving SmolLM2-135M-Instruct" in out
    assert "[feedback: 'Harmless and very helpful' · adapter feedback@v1]" in out
    answer = out.split("How do I keep a sourdough starter alive?", 1)[1].strip()
    assert len(answer.split()) >= 10, out  # a real model writes real words
