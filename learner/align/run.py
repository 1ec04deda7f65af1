"""One alignment run: server, (judge,) annotator and learner as supervised processes, a live view,
then the held-out evaluation, the plots and ``report.json`` in the run directory.

Run directory::

    config.toml  annotator.json  learner.json   the configs as run
    server.port  log.sqlite  registry/  learner/  the live state (sampler.port with [sampler])
    logs/{server,sampler,annotator,learner,judge}.log
    plots/*.png  report.json                      written at the end

The run ends when ``duration_s`` has passed, the learner finished its ``max_iterations``, a
SIGINT/SIGTERM arrives, or a child keeps crashing (``ChildFailed``: exit status 1). The learner
and the annotator are stopped first, the evaluation uses the still-running sampler replica (or
server), then the servers (and judge) stop. Children never outlive the run (``supervisor``).
Each child's command line and environment come from ``children``; the evaluation and the report
from ``report``.
"""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path
from typing import Any

from .children import (
    SAMPLER,
    SERVER,
    Role,
    RunPaths,
    bound_http_port,
    bound_port,
    host_cpu_split,
    judge_spec,
    server_spec,
    worker_specs,
)
from .config import AlignConfig
from .report import summary_lines, write_report
from .supervisor import ChildFailed, Supervisor


class AlignRun:
    """One run's children under a ``Supervisor``, its live view and its end (``report``)."""

    def __init__(self, cfg: AlignConfig, root: Path, model: Path, report: Any) -> None:
        self.cfg = cfg
        self.paths = RunPaths(root)
        self.model = model
        self.report = report
        self.sup = Supervisor(report=report)
        self.port = 0  # the server binds a free port itself; start_server reads it back
        self.http_port = 0  # likewise for its OpenAI-compatible API (the "self" judge)
        self.target = ""
        # where the loop's own generations go: the sampler replica's, else the server's
        self.loop_target = ""
        self.loop_http_port = 0
        self.started = time.time()
        self.split = host_cpu_split(cfg)
        if self.split is not None:
            report(
                f"CPUs: engine threads on {list(self.split.engine)}, "
                f"annotator/learner/judge on {list(self.split.workers)}"
            )

    # ----------------------------------------------------------------- children

    def start(self) -> None:
        judge_url = self.start_server()
        self.start_workers(judge_url)

    def start_server(self) -> str | None:
        """The judge (with ``[judge]``) and the server; returns the judge's URL."""
        self.paths.registry.mkdir(parents=True, exist_ok=True)
        judge_url = None
        if self.cfg.judge is not None:
            spec, judge_url = judge_spec(self.cfg, self.paths, self.split)
            self.sup.start(spec)
        self.port, self.http_port = self._serve(SERVER)
        self.target = self.loop_target = f"127.0.0.1:{self.port}"
        self.loop_http_port = self.http_port
        return judge_url

    def _serve(self, role: Role) -> tuple[int, int]:
        """Start the ``tiller serve`` child ``role``; returns its gRPC and HTTP ports."""
        p = self.paths
        for f in p.ports(role):
            f.unlink(missing_ok=True)

        def exit_status() -> int | None:
            child = next(c for c in self.sup.children if c.spec.name == role)
            assert child.proc is not None
            return child.proc.poll()

        spec = server_spec(self.cfg, p, self.model, 0, exit_status, split=self.split, role=role)
        child = self.sup.start(spec)
        # Restarts keep the ports the workers already talk to.
        port, http_port = bound_port(p, role), bound_http_port(p, role)
        child.spec = server_spec(
            self.cfg, p, self.model, port, exit_status, http_port, self.split, role
        )
        return port, http_port

    def start_workers(self, judge_url: str | None) -> None:
        """The sampler replica (with ``[sampler]``), the annotator, then the learner. The loop's
        own generations go to the replica when there is one."""
        if self.cfg.sampler is not None:
            port, self.loop_http_port = self._serve(SAMPLER)
            self.loop_target = f"127.0.0.1:{port}"
        self_url = f"http://127.0.0.1:{self.loop_http_port}/v1"
        specs = worker_specs(
            self.cfg, self.paths, self.model, self.loop_target, judge_url, self_url, self.split
        )
        for spec in specs:
            self.sup.start(spec)

    def stop_children(self, *names: str) -> None:
        keep = [c for c in self.sup.children if c.spec.name not in names]
        self.sup.children = [c for c in self.sup.children if c.spec.name in names]
        self.sup.stop_all()
        self.sup.children = keep

    # ----------------------------------------------------------------- the loop

    def watch(self, stop: list[bool]) -> str:
        """Poll children and show progress until the run should end; returns why it ended."""
        from rich.console import Console
        from rich.live import Live

        from tiller.server.formats.logstore import connect

        from .dashboard import line, snapshot, table

        db = connect(self.paths.db)
        console = Console(stderr=True)
        deadline = self.started + self.cfg.duration_s
        last_line = 0.0
        with Live(console=console, refresh_per_second=1, transient=False) as live:
            while True:
                if stop:
                    return "interrupted"
                finished = self.sup.poll()
                if "learner" in finished:
                    return "learner finished its iterations"
                now = time.time()
                snap = snapshot(db, self.cfg.adapter, now - self.started)
                if console.is_terminal:
                    live.update(table(snap, self.cfg.duration_s, self.cfg.name))
                elif now - last_line >= 30:
                    console.print(line(snap, self.cfg.duration_s))
                    last_line = now
                if now >= deadline:
                    return "duration reached"
                time.sleep(1.0)

    # ----------------------------------------------------------------- the end

    def finish(self, reason: str) -> dict[str, Any]:
        """Evaluate, plot, write ``report.json``; returns the report (``report.write_report``)."""
        return write_report(
            self.cfg,
            self.paths,
            target=self.loop_target,
            model=self.model,
            started=self.started,
            reason=reason,
            say=self.report,
        )


def first_generation_at(db_path: Path) -> float | None:
    """When the run's first generation was logged (an existing run's start, near enough)."""
    if not db_path.exists():
        return None
    from tiller.server.formats.logstore import first_generation_at as first_at
    from tiller.server.formats.logstore import open_readonly

    db = open_readonly(db_path)
    try:
        return first_at(db)
    finally:
        db.close()


def run(
    cfg: AlignConfig,
    config_path: Path,
    root: Path,
    model: Path,
    report: Any,
    evaluate_only: bool = False,
) -> int:
    """The whole run; returns the process exit status. ``evaluate_only``: an existing run
    directory is evaluated again (server only, on its registry's active version): no sampling,
    annotating or training."""
    began = None
    if evaluate_only:
        began = first_generation_at(RunPaths(root).db)
        if began is None:
            report(f"{root}: no generation log to evaluate")
            return 2
    else:
        root.mkdir(parents=True, exist_ok=True)
        shutil.copy(config_path, root / "config.toml")
    r = AlignRun(cfg, root, model, report)
    if evaluate_only and began is not None:
        r.started = began
    stop: list[bool] = []

    def on_signal(*_: object) -> None:
        if stop:  # a second signal: skip the evaluation, stop everything now
            raise KeyboardInterrupt
        stop.append(True)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    status = 0
    try:
        if evaluate_only:
            r.start_server()
            reason = "evaluate only"
        else:
            r.start()
            reason = r.watch(stop)
            report(f"stopping the loop: {reason}")
            r.stop_children("learner", "annotator")
        summary = r.finish(reason)
        report(f"report: {root / 'report.json'}")
        for line in summary_lines(summary):
            report(line)
    except ChildFailed as e:
        report(f"run failed: {e}")
        status = 1
    except KeyboardInterrupt:
        report("interrupted twice: stopping without the evaluation")
        status = 130
    finally:
        r.sup.stop_all()
    return status
