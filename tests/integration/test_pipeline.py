"""The pipelined learner on a live server (``pipeline = true``): iteration k+1 samples while
iteration k trains, gates and publishes, from the version served then, and every promoted
iteration records its feedback-to-served time.

Everything is real: a ``tiller serve`` process on the tiny model following a registry, the
annotator's score provider over the SQLite log, the trainer, the gate's admin ``LoadAdapter``.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.conftest import ServerProc, stop_server
from tests.integration.test_learn import _config
from tests.learning import run_learner, start_learn_server
from tiller.learner.annotate.quantile import ScoreConfig, ScoreProvider
from tiller.learner.annotate.runner import Annotator
from tiller.learner.learn.cli import learn
from tiller.server.formats.logstore import connect, iterations
from tiller.server.formats.manifest import load_manifest
from tiller.server.formats.registry import version_path


@pytest.fixture(scope="module")
def pipe_server(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProc, Path, Path]]:
    srv, db, registry = start_learn_server(
        tiny_model, tmp_path_factory.mktemp("pipeline"), tmp_path_factory.getbasetemp()
    )
    yield srv, db, registry
    stop_server(srv)


@pytest.mark.timeout(900)
async def test_pipelined_iterations_sample_before_the_previous_is_served(
    tiny_model: Path, pipe_server: tuple[ServerProc, Path, Path], tmp_path: Path
) -> None:
    srv, db, registry = pipe_server
    cfg = _config(tiny_model, srv, db, registry, tmp_path / "work", pipeline=True, max_iterations=3)
    began = time.time()
    lines = await run_learner(
        cfg, [ScoreProvider(ScoreConfig(scorer="length", provider_name="len"))], 540
    )
    ended = time.time()

    rows = iterations(connect(db), "critic")
    assert [(r["iteration"], r["status"], r["version"]) for r in rows] == [
        (1, "promoted", 1),
        (2, "promoted", 2),
        (3, "promoted", 3),
    ], lines
    details = [json.loads(r["details_json"]) for r in rows]
    sampling = [d["sampling"] for d in details]
    # Iteration 1 samples on its own; 2 and 3 run ahead, from the version served while the
    # previous iteration trained: the base (v1 is not served yet), then v1 (lag one).
    assert [s["pipelined"] for s in sampling] == [False, True, True]
    assert [r["sampled_version"] for r in rows] == [0, 0, 1]
    log = connect(db)
    for prev, row, s in ((rows[i - 1], rows[i], sampling[i]) for i in (1, 2)):
        ((after, upto),) = s["generations"].values()
        gens = log.execute(
            "SELECT created_at, adapter, adapter_version FROM generations "
            "WHERE seq > ? AND seq <= ?",
            [after, upto],
        ).fetchall()
        assert len(gens) == 16  # 8 prompts x 2 samples, all of this iteration's sampling
        version = row["sampled_version"]
        assert {(a, v) for _, a, v in gens} == {("critic" if version else "", version)}
        # Sent, answered and logged before the previous iteration's version was served.
        assert s["started_at"] < prev["served_at"]
        assert max(created for created, _, _ in gens) < prev["served_at"], (gens, prev)
        assert prev["started_at"] < s["started_at"]
    # Iterations 1 and 2 both sampled the base: 2 leaves out the pairs 1 trained on (v1 holds
    # them), so on-policy data is never trained twice.
    assert details[1]["skipped"]["trained_before"] == rows[0]["examples"]
    assert "trained_before" not in details[2]["skipped"]
    windows = [load_manifest(version_path(registry, "critic", v)).extra["data_window"]
               for v in (1, 2, 3)]  # fmt: skip
    assert [w["sampled_version"] for w in windows] == [0, 0, 1]
    assert [w["served_version"] for w in windows] == [None, 1, 2]

    for r in rows:
        assert began < r["served_at"] < ended
        median, longest = r["feedback_to_served_median_s"], r["feedback_to_served_max_s"]
        assert 0 < median <= longest <= ended - began, r
        # The window's labels all landed after the run began, before the version was served.
        assert longest <= r["served_at"] - began
    assert any("feedback to served" in line for line in lines), lines

    result = CliRunner(env={"COLUMNS": "200"}).invoke(
        learn, ["history", "--db", str(db), "--adapter", "critic"]
    )
    assert result.exit_code == 0, result.output
    assert "fb→served" in result.output
    for r in rows:
        shown = f"{r['feedback_to_served_median_s']:.1f} / {r['feedback_to_served_max_s']:.1f}"
        assert shown in result.output, result.output


@pytest.mark.timeout(1200)
def test_pipelined_learner_killed_mid_training_resumes(
    tiny_model: Path, pipe_server: tuple[ServerProc, Path, Path], tmp_path: Path
) -> None:
    """kill -9 while iteration 1 trains and iteration 2 samples ahead: the restarted learner
    resumes iteration 1 from its frozen data and checkpoint, samples iteration 2 again, and
    records and publishes each iteration once."""
    srv, db, registry = pipe_server
    work = tmp_path / "work"
    config = {
        "db": str(db), "registry": str(registry), "workdir": str(work),
        "model": str(tiny_model), "adapter": "killed", "base_model": "tiny-llama",
        "server": srv.target, "max_iterations": 2, "pipeline": True,
        "trigger": {"min_annotations": 1, "min_examples": 2, "poll_s": 0.1},
        "sample": {"prompts": [f"Say {i} things." for i in range(8)], "per_iteration": 8,
                   "n": 2, "max_tokens": 8},
        "data": {"kind": "pairs", "source": "score", "provider": "len"},
        "train": {"objective": "dpo", "lora_r": 4, "lora_alpha": 8,
                  "target_modules": ["q_proj", "v_proj"], "batch_size": 2, "max_steps": 150,
                  "max_length": 64},
    }  # fmt: skip
    path = tmp_path / "learn.json"
    path.write_text(json.dumps(config))
    argv = [sys.executable, "-m", "tiller.client.cli", "learn", "--config", str(path),
            "--no-progress"]  # fmt: skip
    stop = threading.Event()
    labeller = threading.Thread(target=_label_until, args=(db, stop), daemon=True)
    labeller.start()
    try:
        with (tmp_path / "learn.log").open("wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        ckpt, deadline = work / "iter-0001" / "ckpt", time.monotonic() + 300
        while not any(ckpt.glob("step-*")):
            assert proc.poll() is None, (tmp_path / "learn.log").read_text()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert iterations(connect(db), "killed") == []
        done = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    finally:
        stop.set()
        labeller.join(timeout=30)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming with its" in done.stderr
    rows = iterations(connect(db), "killed")
    assert [(r["iteration"], r["version"]) for r in rows] == [(1, 1), (2, 2)], rows
    assert json.loads(rows[0]["details_json"])["resumed_from_step"] >= 1
    assert sorted(p.name for p in (registry / "killed").glob("v*")) == ["v0001", "v0002"]


def _label_until(db: Path, stop: threading.Event) -> None:
    """The annotator sidecar ('len' scores) on a thread of its own until ``stop``."""

    async def run() -> None:
        provider = ScoreProvider(ScoreConfig(scorer="length", provider_name="len"))
        annotator = Annotator(connect(db), [provider], batch_size=64)
        while not stop.is_set():
            await annotator.drain()
            await asyncio.sleep(0.1)

    asyncio.run(run())
