"""The processes of one alignment run: the run directory's layout, and each child's command
line, environment and readiness check (server, judge, annotator, learner) as a ``ChildSpec``.

Nothing here starts a process; ``run.AlignRun`` hands these specs to the ``Supervisor``.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tiller.server.tools.models import DEFAULT_CACHE

from .config import AlignConfig, annotator_section, learner_section
from .supervisor import ChildSpec, wait_for_file

# The run's `tiller serve` children: the users' server, and (with ``[sampler]``) the replica that
# serves only the loop's own generations (the learner's sampling and gate, the "self" judge).
Role = Literal["server", "sampler"]
SERVER: Role = "server"
SAMPLER: Role = "sampler"


@dataclass(frozen=True)
class RunPaths:
    """The run directory's layout (see ``run``'s module docstring)."""

    root: Path

    @property
    def db(self) -> Path:
        return self.root / "log.sqlite"

    @property
    def registry(self) -> Path:
        return self.root / "registry"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def port_file(self) -> Path:
        return self.ports(SERVER)[0]

    @property
    def http_port_file(self) -> Path:
        return self.ports(SERVER)[1]

    def ports(self, role: Role) -> tuple[Path, Path]:
        """The files a ``tiller serve`` child writes its gRPC and HTTP ports to."""
        return self.root / f"{role}.port", self.root / f"{role}.http_port"

    @property
    def learner_workdir(self) -> Path:
        return self.root / "learner"

    def log(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def resolve_model(name: str, base: Path, cache_dir: Path) -> Path:
    """``"smollm2"`` (converted once into ``cache_dir``) or a model directory under ``base``;
    raises ``ValueError`` when the directory does not exist."""
    if name == "smollm2":
        from tiller.server.tools.models import prepare_smollm2

        return prepare_smollm2(cache_dir)
    path = (base / name).expanduser()
    if not path.is_dir():
        raise ValueError(f"model {name!r}: no such directory {path}")
    return path


def wait_serving(target: str, timeout_s: float) -> None:
    """Block until the gRPC health check at ``target`` says SERVING; ``TimeoutError`` if not."""
    import grpc

    from tiller.client.health import SERVING, check

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if check(target, timeout=10) == SERVING:
                return
        except grpc.RpcError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{target} not SERVING after {timeout_s:.0f} s")
        time.sleep(0.5)


def wait_http(url: str, timeout_s: float) -> None:
    """Block until ``url`` answers a GET; ``TimeoutError`` if it does not in time."""
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} not up after {timeout_s:.0f} s") from None
            time.sleep(1.0)


def child_env(**extra: str) -> dict[str, str]:
    """Environment for every child of ``tiller align``, plus ``extra``.

    Passive OpenMP waits (unless ``OMP_WAIT_POLICY`` is set): the children share the CPUs, and
    one process's spinning OpenMP barriers burn the cores the others wait for."""
    return {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")} | extra


@dataclass(frozen=True)
class CpuSplit:
    """Which CPUs the server's vLLM engine threads use and which the other children keep to."""

    engine: tuple[int, ...]
    workers: tuple[int, ...]

    def engine_env(self) -> dict[str, str]:
        """vLLM's CPU worker binds its OpenMP threads to exactly these CPUs."""
        return _omp_bind(self.engine)

    def workers_engine_env(self) -> dict[str, str]:
        """The judge's and the sampler replica's vLLM engines keep to the workers' CPUs."""
        return _omp_bind(self.workers)

    def worker_env(self) -> dict[str, str]:
        return {"OMP_NUM_THREADS": str(len(self.workers))}


def _omp_bind(cpus: Sequence[int]) -> dict[str, str]:
    return {"VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cpus))}


def cpu_split(worker_cpus: int, usable: Sequence[int], cuda: bool) -> CpuSplit | None:
    """The run's CPU split on a host without CUDA: training and annotation on ``worker_cpus``
    of the ``usable`` CPUs (-1: a quarter, at least 1), the engine on the rest, so that a
    training step never takes a core from the users' decode steps. None: no pinning (CUDA,
    ``worker_cpus`` 0, or a single CPU). ``ValueError`` if nothing would be left for the engine."""
    if cuda or worker_cpus == 0 or len(usable) < 2:
        return None
    k = worker_cpus if worker_cpus > 0 else max(1, len(usable) // 4)
    if k >= len(usable):
        raise ValueError(
            f"worker_cpus {k} leaves no CPU for the engine ({len(usable)} usable: {sorted(usable)})"
        )
    cpus = sorted(usable)
    return CpuSplit(engine=tuple(cpus[:-k]), workers=tuple(cpus[-k:]))


def host_cpu_split(cfg: AlignConfig) -> CpuSplit | None:
    """``cpu_split`` for this host: its usable CPUs, and whether torch sees a CUDA device.
    A sampler replica needs CPUs apart from the users' engine: with ``[sampler]``, worker_cpus
    0 means the automatic split (-1)."""
    workers = cfg.worker_cpus or (-1 if cfg.sampler is not None else 0)
    if workers == 0:
        return None  # the default: no torch import in the supervisor for nothing
    import torch

    return cpu_split(workers, sorted(os.sched_getaffinity(0)), torch.cuda.is_available())


def tiller_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "tiller.client.cli", *args]


def judge_spec(
    cfg: AlignConfig, paths: RunPaths, split: CpuSplit | None = None
) -> tuple[ChildSpec, str]:
    """vLLM's OpenAI server for ``[judge]`` on a free port; returns the spec and its ``/v1`` URL.
    Resolves (and may convert) the judge model now. With a ``split`` it keeps to the workers'
    CPUs: it is the annotator's tool, not the users'."""
    assert cfg.judge is not None
    port = free_port()
    model = resolve_model(cfg.judge.model, cfg.base, DEFAULT_CACHE)
    argv = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model), "--served-model-name", "judge",
        "--host", "127.0.0.1", "--port", str(port),
        "--gpu-memory-utilization", "0.1", "--enforce-eager", *cfg.judge.args,
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    spec = ChildSpec(
        "judge",
        argv,
        paths.log("judge"),
        lambda: wait_http(url + "/health", 600),
        env=child_env(
            # the engine core in the API server's process: no IPC hop, faster on CPUs
            VLLM_ENABLE_V1_MULTIPROCESSING="0",
            VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
            **(split.workers_engine_env() if split else {}),
        ),
        cpus=frozenset(split.workers) if split else None,
        idle=cfg.background_workers,
    )
    return spec, url + "/v1"


def bound_port(paths: RunPaths, role: Role = SERVER) -> int:
    """The gRPC port a ``tiller serve`` child of the run wrote to its port file."""
    return int(paths.ports(role)[0].read_text().strip())


def bound_http_port(paths: RunPaths, role: Role = SERVER) -> int:
    """The port of that child's OpenAI-compatible API."""
    return int(paths.ports(role)[1].read_text().strip())


def server_spec(
    cfg: AlignConfig,
    paths: RunPaths,
    model: Path,
    port: int,
    exit_status: Callable[[], int | None],
    http_port: int = 0,
    split: CpuSplit | None = None,
    role: Role = SERVER,
) -> ChildSpec:
    """``tiller serve`` on ``port`` and its OpenAI-compatible API on ``http_port`` (0: the
    server binds free ones and writes them to the port files) over the run's log and registry,
    with the admin API. ``exit_status`` polls the running server process (its readiness check
    gives up if it exits).

    ``role`` "sampler": the loop's own replica (``[sampler]``). Same log (SQLite serialises the
    two writers; seqs stay in commit order), same registry; its engine on the workers' CPUs and,
    with background workers, under ``SCHED_IDLE`` like them; no seat share for background
    requests, which are all it serves."""
    port_file, http_port_file = paths.ports(role)
    sampler = role == SAMPLER
    extra = cfg.sampler.args if sampler and cfg.sampler else cfg.server_args
    argv = tiller_argv(
        "serve", "--model", str(model), "--port", str(port),
        "--port-file", str(port_file), "--log-db", str(paths.db),
        "--http-port", str(http_port), "--http-port-file", str(http_port_file),
        "--registry", str(paths.registry), "--registry-poll", "0.5", "--enable-admin",
        # the learner's gate loads candidates from its workdir; nothing else is loadable
        "--adapter-root", str(paths.registry), "--adapter-root", str(paths.learner_workdir),
        *(["--background-seat-share", "1"] if sampler else []),
        *extra,
    )  # fmt: skip

    def ready() -> None:
        wait_for_file(port_file, exit_status, 600)
        wait_serving(f"127.0.0.1:{bound_port(paths, role)}", 120)

    # On CPUs vLLM sizes its KV cache from free memory unless told: with a judge, a trainer
    # and the server on one machine that over-commits. 2 GiB holds ~90k SmolLM2 tokens.
    kv = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1" if sampler else "2")
    bind = (split.workers_engine_env() if sampler else split.engine_env()) if split else {}
    # the users' server's own threads are vLLM's business; the sampler keeps to the workers'
    return ChildSpec(
        role,
        argv,
        paths.log(role),
        ready,
        env=child_env(VLLM_CPU_KVCACHE_SPACE=kv, **bind),
        cpus=frozenset(split.workers) if split and sampler else None,
        idle=sampler and cfg.background_workers,
    )


def worker_specs(
    cfg: AlignConfig,
    paths: RunPaths,
    model: Path,
    server: str,
    judge_url: str | None,
    self_url: str,
    split: CpuSplit | None = None,
) -> list[ChildSpec]:
    """The annotator and the learner, in start order. Writes their configs as run
    (``annotator.json``, ``learner.json``) into the run directory first."""
    annotator_cfg = paths.root / "annotator.json"
    annotator_cfg.write_text(
        json.dumps(
            annotator_section(
                cfg, db=paths.db, judge_url=judge_url, self_url=self_url, base_model=model.name
            ),
            indent=2,
        )
    )
    learner = learner_section(
        cfg,
        db=paths.db,
        registry=paths.registry,
        workdir=paths.learner_workdir,
        model=model,
        server=server,
    )
    learner_cfg = paths.root / "learner.json"
    learner_cfg.write_text(json.dumps(learner, indent=2))
    cpus = frozenset(split.workers) if split else None
    idle = cfg.background_workers
    annotator = ChildSpec(
        "annotator",
        tiller_argv("annotate", "--config", str(annotator_cfg)),
        paths.log("annotator"),
        env=child_env(**(split.worker_env() if split else {})),
        cpus=cpus,
        idle=idle,
    )
    trainer = ChildSpec(
        "learner",
        tiller_argv("learn", "--config", str(learner_cfg), "--no-progress"),
        paths.log("learner"),
        finishes=learner.get("max_iterations") is not None,
        stop_grace_s=120.0,
        # glibc's mmap threshold at its dynamic maximum (32 MiB): only the largest buffers are
        # mmapped per step, which keeps page faults out of the training step. The learner
        # container keeps glibc's 128 KiB: under a memory limit the lower peak matters more.
        env=child_env(
            MALLOC_MMAP_THRESHOLD_=os.environ.get("MALLOC_MMAP_THRESHOLD_", "33554432"),
            **(split.worker_env() if split else {}),
        ),
        cpus=cpus,
        idle=idle,
    )
    return [annotator, trainer]
