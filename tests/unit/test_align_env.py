"""The environment ``tiller align`` gives its children."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tiller.learner.align.children import (
    SAMPLER,
    CpuSplit,
    RunPaths,
    child_env,
    cpu_split,
    host_cpu_split,
    server_spec,
    worker_specs,
)
from tiller.learner.align.config import AlignConfig, ServerSection
from tiller.learner.align.supervisor import ChildSpec, Supervisor


def test_children_wait_passively_in_openmp_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert child_env() == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert child_env(X="1") == {"OMP_WAIT_POLICY": "PASSIVE", "X": "1"}


def test_an_operators_wait_policy_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert child_env()["OMP_WAIT_POLICY"] == "ACTIVE"


def test_cpu_split_keeps_training_off_the_engine_cpus() -> None:
    assert cpu_split(-1, [0, 1], cuda=False) == CpuSplit(engine=(0,), workers=(1,))
    split = cpu_split(-1, list(range(16)), cuda=False)
    assert split is not None and split.workers == (12, 13, 14, 15) and len(split.engine) == 12
    assert cpu_split(3, [4, 5, 6, 7], cuda=False) == CpuSplit(engine=(4,), workers=(5, 6, 7))
    assert split.engine_env() == {"VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, range(12)))}
    assert split.worker_env() == {"OMP_NUM_THREADS": "4"}
    # No pinning on a GPU host, when asked for none, or with one CPU.
    assert cpu_split(-1, [0, 1], cuda=True) is None
    assert cpu_split(0, [0, 1], cuda=False) is None
    assert cpu_split(-1, [3], cuda=False) is None
    with pytest.raises(ValueError, match="leaves no CPU for the engine"):
        cpu_split(2, [0, 1], cuda=False)


def test_the_split_reaches_the_server_and_worker_specs(tmp_path: Path) -> None:
    cfg = AlignConfig(name="t", annotator={"providers": []}, learner={"adapter": "a"})
    split = CpuSplit(engine=(0,), workers=(1,))
    paths = RunPaths(tmp_path)
    server = server_spec(cfg, paths, tmp_path, 0, lambda: None, split=split)
    assert server.env is not None and server.env["VLLM_CPU_OMP_THREADS_BIND"] == "0"
    assert server.cpus is None  # the server's own threads are vLLM's business
    for spec in worker_specs(cfg, paths, tmp_path, "127.0.0.1:1", None, "http://x/v1", split):
        assert spec.cpus == frozenset({1}), spec.name
        assert spec.env is not None and spec.env["OMP_NUM_THREADS"] == "1", spec.name
    unpinned = worker_specs(cfg, paths, tmp_path, "127.0.0.1:1", None, "http://x/v1")
    assert all(s.cpus is None and "OMP_NUM_THREADS" not in (s.env or {}) for s in unpinned)


def test_workers_are_background_work_unless_asked_otherwise(tmp_path: Path) -> None:
    paths = RunPaths(tmp_path)
    cfg = AlignConfig(name="t", annotator={"providers": []}, learner={"adapter": "a"})
    assert not server_spec(cfg, paths, tmp_path, 0, lambda: None).idle  # users come first
    specs = worker_specs(cfg, paths, tmp_path, "127.0.0.1:1", None, "http://x/v1")
    assert [s.name for s in specs if s.idle] == ["annotator", "learner"]
    normal = AlignConfig(
        name="t", annotator={"providers": []}, learner={"adapter": "a"}, worker_priority="normal"
    )
    assert not any(s.idle for s in worker_specs(normal, paths, tmp_path, "x:1", None, "http://x"))


def test_a_background_child_and_its_threads_run_under_sched_idle(tmp_path: Path) -> None:
    code = (
        "import os, threading; out = []; "
        "t = threading.Thread(target=lambda: out.append(os.sched_getscheduler(0))); "
        "t.start(); t.join(); print(os.sched_getscheduler(0) == os.SCHED_IDLE, "
        "out[0] == os.SCHED_IDLE)"
    )
    sup = Supervisor(report=lambda _: None)
    for idle, want in ((True, "True True"), (False, "False False")):
        log = tmp_path / f"probe-{idle}.log"
        spec = ChildSpec("probe", [sys.executable, "-c", code], log, finishes=True, idle=idle)
        child = sup.start(spec)
        assert child.proc is not None and child.proc.wait(timeout=60) == 0
        assert log.read_text().strip() == want


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two usable CPUs")
def test_a_pinned_child_runs_on_its_cpus_only(tmp_path: Path) -> None:
    cpu = max(os.sched_getaffinity(0))
    code = "import os; print(sorted(os.sched_getaffinity(0)))"
    spec = ChildSpec(
        "probe", [sys.executable, "-c", code], tmp_path / "probe.log", finishes=True,
        cpus=frozenset({cpu}),
    )  # fmt: skip
    sup = Supervisor(report=lambda _: None)
    child = sup.start(spec)
    assert child.proc is not None and child.proc.wait(timeout=60) == 0
    assert (tmp_path / "probe.log").read_text().strip() == f"[{cpu}]"


def _sampler_cfg(**kw: object) -> AlignConfig:
    return AlignConfig(
        name="t", annotator={"providers": []}, learner={"adapter": "a"},
        sampler=ServerSection(args=("--max-num-seqs", "8")), **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def test_the_sampler_replica_is_background_work_on_the_workers_cpus(tmp_path: Path) -> None:
    cfg = _sampler_cfg(server_args=("--users-flag",))
    split = CpuSplit(engine=(0,), workers=(1,))
    paths = RunPaths(tmp_path)
    spec = server_spec(cfg, paths, tmp_path, 0, lambda: None, split=split, role=SAMPLER)
    assert spec.name == "sampler" and spec.idle and spec.cpus == frozenset({1})
    assert spec.env is not None and spec.env["VLLM_CPU_OMP_THREADS_BIND"] == "1"
    argv = list(spec.argv)
    # its own port files, the run's one log and registry, all its seats for background work
    assert argv[argv.index("--port-file") + 1] == str(tmp_path / "sampler.port")
    assert argv[argv.index("--http-port-file") + 1] == str(tmp_path / "sampler.http_port")
    assert argv[argv.index("--log-db") + 1] == str(paths.db)
    assert argv[argv.index("--background-seat-share") + 1] == "1"
    assert argv[-2:] == ["--max-num-seqs", "8"] and "--users-flag" not in argv
    users = server_spec(cfg, paths, tmp_path, 0, lambda: None, split=split)
    assert "--background-seat-share" not in users.argv and "--users-flag" in users.argv
    assert users.env is not None and users.env["VLLM_CPU_OMP_THREADS_BIND"] == "0"
    normal = _sampler_cfg(worker_priority="normal")
    assert not server_spec(normal, paths, tmp_path, 0, lambda: None, role=SAMPLER).idle


def test_a_sampler_replica_splits_the_cpus_even_when_pinning_is_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch

    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    plain = AlignConfig(name="t", annotator={"providers": []}, learner={"adapter": "a"})
    assert host_cpu_split(plain) is None
    assert host_cpu_split(_sampler_cfg()) == CpuSplit(engine=(0,), workers=(1,))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert host_cpu_split(_sampler_cfg()) is None  # GPUs: engine args share the device
