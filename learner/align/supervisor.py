"""Supervised child processes: start in order, restart on a crash, stop all cleanly, no orphans.

Each child runs in its own session (process group), so stopping it reaches the engine
processes it spawned too, and a terminal's Ctrl-C reaches only the supervisor, which then stops
the children in reverse start order: SIGTERM to the group, a grace period, SIGKILL to the group.
On Linux every child also gets ``PR_SET_PDEATHSIG`` = SIGTERM: if the supervisor itself is
killed (even with SIGKILL), the kernel signals the children, which drain and exit.

A child that exits while the run goes on is restarted up to ``max_restarts`` times (its
``ready`` check runs again); beyond that ``poll`` raises ``ChildFailed`` and the caller stops
everything. A child marked ``finishes`` (the learner with ``max_iterations``) may exit 0: that
is reported as done, not restarted. Not thread-safe; one supervisor per run.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _child_setup(cpus: frozenset[int] | None, idle: bool = False) -> Callable[[], None]:
    """What runs in a child between fork and exec: die with the parent, keep to ``cpus``, and
    with ``idle`` run under ``SCHED_IDLE`` (its threads get a CPU only when nothing else on it
    wants one; inherited by every thread and process it starts)."""

    def setup() -> None:
        _die_with_parent()
        if cpus:
            os.sched_setaffinity(0, cpus)
        if idle:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))

    return setup


class ChildFailed(RuntimeError):
    """A child kept crashing (or could not start); the run must stop."""


@dataclass
class ChildSpec:
    name: str
    argv: Sequence[str]
    log: Path
    ready: Callable[[], None] | None = None  # blocks until usable; raises if it cannot be
    finishes: bool = False  # exit 0 means done, not a crash
    max_restarts: int = 3
    stop_grace_s: float = 60.0
    env: dict[str, str] | None = None
    cpus: frozenset[int] | None = None  # the CPUs it may run on (None: any)
    idle: bool = False  # SCHED_IDLE: background work that yields the CPU to everything else


@dataclass
class Child:
    spec: ChildSpec
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    done: bool = False
    exits: list[int] = field(default_factory=list)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None


class Supervisor:
    def __init__(self, report: Callable[[str], None] = print) -> None:
        self.children: list[Child] = []
        self.report = report

    def _spawn(self, child: Child) -> None:
        spec = child.spec
        spec.log.parent.mkdir(parents=True, exist_ok=True)
        with spec.log.open("ab") as out:
            child.proc = subprocess.Popen(
                list(spec.argv),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_child_setup(spec.cpus, spec.idle),
                env={**os.environ, **(spec.env or {})},
            )
        if spec.ready is not None:
            try:
                spec.ready()
            except Exception as e:
                raise ChildFailed(f"{spec.name} did not become ready: {e} (log: {spec.log})") from e

    def start(self, spec: ChildSpec) -> Child:
        """Start a child and wait for its ``ready`` check."""
        child = Child(spec)
        self.children.append(child)
        self._spawn(child)
        self.report(f"started {spec.name} (pid {child.pid})")
        return child

    def poll(self) -> list[str]:
        """Check every child; restart crashed ones; return the names of finished ones."""
        finished = []
        for child in self.children:
            if child.done or child.proc is None:
                continue
            code = child.proc.poll()
            if code is None:
                continue
            child.exits.append(code)
            if code == 0 and child.spec.finishes:
                child.done = True
                finished.append(child.spec.name)
                continue
            _kill_group(child.proc.pid, signal.SIGKILL)  # leftovers of the crashed child
            if child.restarts >= child.spec.max_restarts:
                raise ChildFailed(
                    f"{child.spec.name} exited with {code} after {child.restarts} restarts "
                    f"(log: {child.spec.log})"
                )
            child.restarts += 1
            self.report(f"{child.spec.name} exited with {code}; restart {child.restarts}")
            self._spawn(child)
        return finished

    def stop_all(self) -> None:
        """SIGTERM each child's group in reverse start order, wait, then SIGKILL leftovers."""
        for child in reversed(self.children):
            proc = child.proc
            if proc is None:
                continue
            if proc.poll() is None:
                _kill_group(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=child.spec.stop_grace_s)
                except subprocess.TimeoutExpired:
                    self.report(f"{child.spec.name} did not stop in time; killing it")
            _kill_group(proc.pid, signal.SIGKILL)
            proc.wait()
            self.report(f"stopped {child.spec.name} (exit {proc.returncode})")


def _kill_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def wait_for_file(path: Path, proc: Callable[[], int | None], timeout_s: float) -> str:
    """The content of ``path`` once it exists; raises if the process exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while not path.exists() or not path.read_text().strip():
        if proc() is not None:
            raise RuntimeError("the process exited")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear in {timeout_s:.0f} s")
        time.sleep(0.2)
    return path.read_text().strip()
