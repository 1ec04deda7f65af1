"""``train`` on two processes (``accelerate launch``, DDP over gloo on the CPU) on the tiny Llama.

Two processes on the same global batch give one process's losses, metrics and weights up to
float rounding; only rank 0 writes checkpoints and the adapter; a learner killed with kill -9
mid-run takes its training processes with it, and the next run resumes from the checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tiller.learner import distributed
from tiller.learner.checkpoints import latest_checkpoint
from tiller.learner.data.examples import PreferencePair, SFTExample
from tiller.learner.trainer import TrainConfig, TrainResult, train

PAIRS = [
    PreferencePair(prompt="def add(a, b):", chosen=" return a + b", rejected=" import os"),
    PreferencePair(prompt="class Foo:", chosen=" pass", rejected=" return None"),
    PreferencePair(prompt="for i in range(3):", chosen=" print(i)", rejected=" raise"),
    PreferencePair(prompt="if x is None:", chosen=" return", rejected=" while True"),
    PreferencePair(prompt="with open(p) as f:", chosen=" data = f.read()", rejected=" del f"),
    PreferencePair(prompt="try:", chosen=" yield", rejected=" except", label_confidence=0.75),
]
SFT = [
    SFTExample(prompt=f"Lowest Toxicity input: {p}<|separator|>", completion=c, weight=w)
    for p, c, w in [
        ("def add(a, b):", " return a + b", 1.0),
        ("class Foo:", " pass", 0.5),
        ("for i in range(3):", " print(i)", 1.0),
        ("if x is None:", " return None", 2.0),
    ]
]
RTOL = 1e-4

# The learner's stand-in: starts the launch the way ``distributed.launch`` does, with the
# worker script below instead of the module.
LEARNER = textwrap.dedent(
    """
    import json, subprocess, sys
    from pathlib import Path
    from tiller.learner import distributed
    spec = Path(sys.argv[1])
    config = distributed.config_from_json(json.loads(spec.read_text())["config"])
    cmd, env = distributed.launch_command(spec, config, script=(sys.argv[2], sys.argv[3]))
    sys.exit(subprocess.run(cmd, env=env).returncode)
    """
)
# Each launched process: notes its pids and every checkpoint it writes; after writing step 2,
# rank 0 holds (rank 1 then waits in the next all-reduce) until the test kills the learner.
WORKER = textwrap.dedent(
    """
    import os, sys, time
    from tiller.learner import distributed, trainer
    rank = os.environ["RANK"]
    def note(line):
        with open(sys.argv[1], "a") as f:
            f.write(line + "\\n")
    note(f"pids {rank} {os.getpid()} {os.getppid()}")
    real_save = trainer.save_checkpoint
    def save(root, model, optimizer, scheduler, state, keep):
        out = real_save(root, model, optimizer, scheduler, state, keep)
        note(f"checkpoint {rank} {state['step']}")
        if state["step"] == 2:
            time.sleep(600)
        return out
    trainer.save_checkpoint = save
    sys.exit(distributed.main(["run", sys.argv[2]]))
    """
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """One intra-op thread, as torchrun gives each launched process (2 cores are shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _config(**kw: Any) -> TrainConfig:
    base: dict[str, Any] = {"batch_size": 2, "grad_accum": 2, "lr": 2e-3, "seed": 5}
    return TrainConfig(**{**base, "progress": False, **kw})


def _assert_same_history(got: TrainResult, want: TrainResult) -> None:
    assert len(got.history) == len(want.history) > 0
    for g, w in zip(got.history, want.history, strict=True):
        assert g.keys() == w.keys()
        for k in w:
            assert g[k] == pytest.approx(w[k], rel=RTOL, abs=1e-6), (k, g["step"])


def _assert_close_weights(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    wa, wb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=RTOL, atol=1e-6)


def _gone(pid: int) -> bool:
    """The process has exited (a zombie nobody reaps counts as exited)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def _wait_for(what: str, done: Any, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + 240
    while not done():
        if proc is not None:
            assert proc.poll() is None, f"exited ({proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what}"
        time.sleep(0.1)


def test_alt_on_two_processes_matches_one(tiny_model: Path, tmp_path: Path) -> None:
    cfg = {"objective": "alt", "max_steps": 3}
    one = train(tiny_model, SFT, _config(**cfg), tmp_path / "one")
    two = train(tiny_model, SFT, _config(**cfg, processes=2), tmp_path / "two")
    assert {"kl", "nll", "entropy", "grad_norm"} <= two.history[0].keys()
    _assert_same_history(two, one)
    _assert_close_weights(tmp_path / "two", tmp_path / "one")


def test_dpo_two_processes_kill_9_and_resume(
    tiny_model: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    steps = {"objective": "dpo", "max_steps": 6, "warmup_steps": 1}
    plain = train(tiny_model, PAIRS, _config(**steps), tmp_path / "plain")

    ckpt, out = tmp_path / "ckpt", tmp_path / "adapter"
    cfg = _config(**steps, processes=2, checkpoint_dir=ckpt, checkpoint_every=2, keep_checkpoints=5)
    spec = distributed.write_spec(tiny_model, PAIRS, cfg, out, resume=True)
    (tmp_path / "learner.py").write_text(LEARNER)
    (tmp_path / "worker.py").write_text(WORKER)
    notes = tmp_path / "notes.txt"
    notes.touch()
    args = [tmp_path / "learner.py", spec, tmp_path / "worker.py", notes]
    learner = subprocess.Popen([sys.executable, *map(str, args)])
    try:
        _wait_for("checkpoint at step 2", lambda: "checkpoint 0 2" in notes.read_text(), learner)
        os.kill(learner.pid, signal.SIGKILL)
    finally:
        learner.kill()
        learner.wait(timeout=60)
    lines = notes.read_text().split("\n")
    pids = {int(p) for line in lines if line.startswith("pids ") for p in line.split()[2:]}
    assert len(pids) == 3  # two workers and their launcher
    _wait_for("exit of the launched processes", lambda: all(_gone(p) for p in pids))
    assert [line for line in lines if line.startswith("checkpoint")] == ["checkpoint 0 2"]
    killed_at = latest_checkpoint(ckpt)
    assert killed_at is not None and killed_at.name == "step-00000002"
    assert not out.exists()

    capfd.readouterr()
    resumed = train(tiny_model, PAIRS, cfg, out, resume=True)  # the real launch
    err = capfd.readouterr().err
    assert resumed.resumed_from_step == 2 and resumed.steps == 6
    _assert_same_history(resumed, plain)
    _assert_close_weights(out, tmp_path / "plain")
    # Rank 0 wrote the later checkpoints and the adapter, rank 1 nothing.
    assert err.count("rank 0 wrote checkpoint step 4") == 1
    assert err.count(f"rank 0 wrote the adapter to {out}") == 1
    assert "rank 1 wrote" not in err
    result = json.loads((distributed.launch_dir(out) / "result.json").read_text())
    assert result["resumed_from_step"] == 2
