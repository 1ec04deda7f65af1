"""One alignment run: server, (judge,) annotator and learner as supervised processes, a live view,
then the held-out evaluation, the plots and ``report.json`` in the run directory.

Run directory::

    config.toml  annotator.json  learner.json   the configs as run
    server.port  log.sqlite  registry/  learner/  the live state
    logs/{server,annotator,learner,judge}.log
    plots/*.png  report.json                      written at the end

The run ends when ``duration_s`` has passed, the learner finished its ``max_iterations``, a
SIGINT/SIGTERM arrives, or a child keeps crashing (``ChildFailed``: exit status 1). The learner
and the annotator are stopped first, the evaluation uses the still-running server, then the
server (and judge) stop. Children never outlive the run (``supervisor``).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tiller.server.tools.models import DEFAULT_CACHE

from .config import AlignConfig, EvalConfig
from .supervisor import ChildFailed, ChildSpec, Supervisor, wait_for_file


@dataclass(frozen=True)
class RunPaths:
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

    def log(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def resolve_model(name: str, base: Path, cache_dir: Path) -> Path:
    if name == "smollm2":
        from tiller.server.tools.models import prepare_smollm2

        return prepare_smollm2(cache_dir)
    path = (base / name).expanduser()
    if not path.is_dir():
        raise ValueError(f"model {name!r}: no such directory {path}")
    return path


def _health(target: str, timeout_s: float) -> None:
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


def _http_ready(url: str, timeout_s: float) -> None:
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

    Passive OpenMP waits (unless ``OMP_WAIT_POLICY`` is set): the server, the learner and the
    annotator share the CPUs, and spinning OpenMP barriers of one process burn the cores the
    others wait for (16 x 4 tokens of SmolLM2 generation beside a training process took 89 s
    spinning vs 3 s passive, bench/align_vs_trl.py)."""
    return {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")} | extra


def tiller_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "tiller.client.cli", *args]


class AlignRun:
    def __init__(self, cfg: AlignConfig, root: Path, model: Path, report: Any) -> None:
        self.cfg = cfg
        self.paths = RunPaths(root)
        self.model = model
        self.report = report
        self.sup = Supervisor(report=report)
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.started = time.time()

    # ----------------------------------------------------------------- children

    def _start_judge(self) -> str | None:
        j = self.cfg.judge
        if j is None:
            return None
        port = free_port()
        model = resolve_model(j.model, self.cfg.base, DEFAULT_CACHE)
        argv = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model), "--served-model-name", "judge",
            "--host", "127.0.0.1", "--port", str(port),
            "--gpu-memory-utilization", "0.1", "--enforce-eager", *j.args,
        ]  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        self.sup.start(
            ChildSpec(
                "judge",
                argv,
                self.paths.log("judge"),
                lambda: _http_ready(url + "/health", 600),
                env=child_env(
                    VLLM_ENABLE_V1_MULTIPROCESSING="0",  # worker in-process: ~1.75x on CPUs
                    VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
                ),
            )
        )
        return url + "/v1"

    def start(self) -> None:
        judge_url = self.start_server()
        self.start_workers(judge_url)

    def start_server(self) -> str | None:
        """The judge (with ``[judge]``) and the server; returns the judge's URL."""
        p = self.paths
        p.registry.mkdir(parents=True, exist_ok=True)
        judge_url = self._start_judge()
        port_file = p.root / "server.port"
        port_file.unlink(missing_ok=True)
        server_argv = tiller_argv(
            "serve", "--model", str(self.model), "--port", str(self.port),
            "--port-file", str(port_file), "--log-db", str(p.db),
            "--registry", str(p.registry), "--registry-poll", "0.5", "--enable-admin",
            # the learner's gate loads candidates from its workdir; nothing else is loadable
            "--adapter-root", str(p.registry), "--adapter-root", str(p.root / "learner"),
            *self.cfg.server_args,
        )  # fmt: skip

        def server_ready() -> None:
            server = next(c for c in self.sup.children if c.spec.name == "server")
            assert server.proc is not None
            wait_for_file(port_file, server.proc.poll, 600)
            _health(self.target, 120)

        # On CPUs vLLM sizes its KV cache from free memory unless told: with a judge, a trainer
        # and the server on one machine that over-commits. 2 GiB holds ~90k SmolLM2 tokens.
        kv = child_env(VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"))
        self.sup.start(ChildSpec("server", server_argv, p.log("server"), server_ready, env=kv))
        return judge_url

    def start_workers(self, judge_url: str | None) -> None:
        from .config import annotator_section, learner_section

        p = self.paths
        (p.root / "annotator.json").write_text(
            json.dumps(annotator_section(self.cfg, db=p.db, judge_url=judge_url), indent=2)
        )
        learner = learner_section(
            self.cfg,
            db=p.db,
            registry=p.registry,
            workdir=p.root / "learner",
            model=self.model,
            server=self.target,
        )
        (p.root / "learner.json").write_text(json.dumps(learner, indent=2))
        self.sup.start(
            ChildSpec(
                "annotator",
                tiller_argv("annotate", "--config", str(p.root / "annotator.json")),
                p.log("annotator"),
                env=child_env(),
            )
        )
        self.sup.start(
            ChildSpec(
                "learner",
                tiller_argv("learn", "--config", str(p.root / "learner.json"), "--no-progress"),
                p.log("learner"),
                finishes=learner.get("max_iterations") is not None,
                stop_grace_s=120.0,
                # glibc's mmap threshold at its dynamic maximum (32 MiB): only the largest
                # buffers (the logits) are mapped and unmapped per step. At 128 KiB, every
                # activation was, and the page faults made a SmolLM2 DPO step 1.44x slower
                # (9.5 vs 6.6 s; 32 s vs 9 s of system time for 3 steps) for a lower peak (2.5
                # vs 3.2 GiB, batch 8). The learner container keeps 128 KiB: under a memory
                # limit, 3.2 vs 6.8 GiB at batch 16 x 128 (bench/learner_memory.py) matters more.
                env=child_env(
                    MALLOC_MMAP_THRESHOLD_=os.environ.get("MALLOC_MMAP_THRESHOLD_", "33554432")
                ),
            )
        )

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
        """Evaluate, plot, write ``report.json``; returns the report."""
        from tiller.client import AsyncClient
        from tiller.server.formats.logstore import connect, count_generations, iterations
        from tiller.server.formats.manifest import load_manifest
        from tiller.server.formats.registry import read_state, version_path

        from ..learn.publish import bootstrap_version
        from . import plots
        from .evaluate import compare, conditions, evaluate, spread

        p = self.paths
        p.plots.mkdir(exist_ok=True)
        db = connect(p.db)
        cfg = self.cfg
        active = read_state(p.registry, cfg.adapter).active
        rows = iterations(db, cfg.adapter)
        report: dict[str, Any] = {
            "name": cfg.name,
            "ended": reason,
            "wall_s": time.time() - self.started,
            "adapter": cfg.adapter,
            "promoted_version": active,
            "iterations": [
                {
                    k: r[k]
                    for k in (
                        "iteration",
                        "status",
                        "version",
                        "examples",
                        "steps",
                        "final_loss",
                        "samples_per_s",
                        "candidate_value",
                        "incumbent_value",
                        "candidate_distinct2",
                        "reason",
                        "started_at",
                        "finished_at",
                    )
                }
                for r in rows
            ],
            "samples_logged": count_generations(db),
            "plots": [],
        }
        if cfg.eval is not None:
            self.report("evaluating on held-out prompts ...")

            boot = bootstrap_version(p.registry, cfg.adapter)
            report["prompted_version"] = boot
            prompted = None
            if boot is not None:
                rendering = load_manifest(version_path(p.registry, cfg.adapter, boot)).conditioning
                prompted = None if rendering is None else (boot, rendering)

            async def run_eval() -> Any:
                async with AsyncClient(self.target, timeout=600) as client:
                    conds = conditions(cfg.eval, cfg.adapter, active, prompted)  # type: ignore[arg-type]
                    return await evaluate(client, conds, cfg.eval, self.model)  # type: ignore[arg-type]

            stats = asyncio.run(run_eval())
            ev: dict[str, Any] = {"conditions": [s.to_json() for s in stats]}
            base = stats[0]
            sign = 1.0 if cfg.eval.higher_is_better else -1.0
            for s in stats[1:]:
                c = compare(s, base)
                ev[f"{s.label} vs base"] = c | {"gain": sign * c["diff"]}
            if len(stats) >= 3:  # ALT: the two extreme tags, then (maybe) prompted-only
                trained = spread(stats[1], stats[2], "tag spread")
                c = compare(stats[1], stats[2])
                ev["tag spread"] = c | {"gain": sign * c["diff"]}
                if len(stats) == 5:
                    c = compare(stats[3], stats[4])
                    ev["tag spread, prompted only"] = c | {"gain": sign * c["diff"]}
                    c = compare(trained, spread(stats[3], stats[4], "prompted spread"))
                    ev["tag spread, trained over prompted"] = c | {"gain": sign * c["diff"]}
            report["eval"] = ev
            report["plots"].append(
                str(plots.eval_bars(stats, cfg.eval.scorer, p.plots / "heldout_eval.png"))
            )
            if cfg.eval.sweep is not None and active is not None:
                self.report("attribute-weight sweep on held-out prompts ...")
                report["sweep"] = self.sweep(cfg.eval, active)
                report["plots"].append(report["sweep"]["plot"])
        drawn = report["plots"]
        if cfg.reward_provider:
            out = p.plots / "reward_by_version.png"
            drawn.append(str(plots.reward_by_version(db, cfg.reward_provider, cfg.adapter, out)))
        data = cfg.learner.get("data", {})
        if data.get("tags") and data.get("provider"):
            out = p.plots / "tags_by_version.png"
            drawn.append(
                str(plots.tags_by_version(db, data["provider"], cfg.adapter, data["tags"], out))
            )
        if rows:
            out = p.plots / "heldout_vs_time.png"
            drawn.append(str(plots.heldout_vs_time(db, cfg.adapter, self.started, out)))
        (p.root / "report.json").write_text(json.dumps(report, indent=2, default=str))
        return report

    def sweep(self, ev: EvalConfig, version: int) -> dict[str, Any]:
        """The CMPO attribute-weight sweep of ``version`` (``sweep`` module); JSON + plot."""
        from tiller.client import AsyncClient

        from . import sweep

        assert ev.sweep is not None

        async def go() -> list[sweep.SweepPoint]:
            async with AsyncClient(self.target, timeout=600) as client:
                return await sweep.sweep(client, ev, self.cfg.adapter, version)

        points = asyncio.run(go())
        out = sweep.plot(points, ev.sweep, self.cfg.adapter, self.paths.plots / "sweep.png")
        return {"points": sweep.to_json(points), "plot": str(out)}


def first_generation_at(db_path: Path) -> float | None:
    """When the run's first generation was logged (an existing run's start, near enough)."""
    if not db_path.exists():
        return None
    import sqlite_utils

    from tiller.server.formats.logstore import first_generation_at as first_at

    db = sqlite_utils.Database(db_path)
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
        for k, v in (summary.get("eval") or {}).items():
            if k != "conditions":
                report(
                    f"  {k}: gain {v['gain']:+.4f} ± {v['ci95']:.4f} "
                    f"(paired p={v['p']:.2g}, Welch p={v['p_welch']:.2g})"
                )
        for s in (summary.get("eval") or {}).get("conditions", []):
            ppl = "-" if s["perplexity"] is None else f"{s['perplexity']:.1f}"
            report(
                f"  {s['label']}: mean {s['mean']:+.4f} ± {s['ci95']:.4f} "
                f"distinct-2 {s['distinct2']:.3f} ppl {ppl}"
            )
    except ChildFailed as e:
        report(f"run failed: {e}")
        status = 1
    except KeyboardInterrupt:
        report("interrupted twice: stopping without the evaluation")
        status = 130
    finally:
        r.sup.stop_all()
    return status
