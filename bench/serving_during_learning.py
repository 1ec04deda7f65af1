"""Users' service while Tiller learns (#23): one closed-loop user load against an idle server,
then while the ``tiller align`` loop learns on that same server, then the loop alone.

``--users`` users, each sending its next Generate as soon as its last one finished: the held-out
movie-review openings, ``--max-tokens`` new tokens with ``ignore_eos`` (every request generates
exactly that many), temperature 1.0, interactive priority, ``log=False`` (users' requests never
become training data). One run of ``--config``'s loop, started by align's own code
(``AlignRun``: the server's flags, registry, log and children as ``tiller align`` has them;
align's closing evaluation is not run), in three phases:

1. idle: the server alone with the users on it; after ``--warmup`` s, ``--duration`` s measured.
2. learning: the annotator and the learner start against that server, the users stay on. The
   window runs from the start of the learner's first iteration (its model load is not counted)
   to the end of the first iteration that ends ``--duration`` s or more later: whole iterations.
3. alone (``--skip-alone`` leaves it out): the users stop; the loop runs on to the end of the
   first iteration that ends ``--duration`` s or more after phase 2's end.

Figures, one line each, ratio first:

- ``user tok/s kept``: users' completed tokens/s in phase 2 over phase 1.
- ``user p99 latency ratio``: the users' 99th-percentile request latency, phase 2 over phase 1.
- ``learner pairs/s beside users`` (phase 2) and ``learner pairs/s kept beside users`` (phase 2
  over phase 3): trained pairs (examples x epochs of each trained iteration in the
  ``learner_iterations`` records) that ended in the window, per second.

Targets on SmolLM2 (CPU, the defaults): user tok/s kept >= 0.85, user p99 latency ratio <= 1.5.

Writes ``--out`` (JSON, every user request's start and end included) and a PNG beside it: the
users' tok/s and latencies over time through the phases, with the learner's iteration
boundaries. The run directory (log, registry, the children's logs) is ``<out>-work/run``.

    python bench/serving_during_learning.py [--model smollm2|tiny] [--users 4] [--duration 300]
        [--max-tokens 32] [--config deploy/align/oaif-critic.toml] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from align_vs_trl import CONFIG, ENV, HELDOUT, ITERATION_KEYS, LOAD_CONCURRENCY, LOAD_TOKENS, lines
from tqdm import tqdm
from user_load import UserLoad, pairs_lines, ratio, report, trained_pairs, user_lines

ROOT = Path(__file__).resolve().parent.parent


class Phases:
    """Waits out the phases of one ``AlignRun`` while keeping its children supervised (a crashed
    child restarts as under ``tiller align``; one that keeps crashing raises ``ChildFailed``)."""

    def __init__(self, run: Any, adapter: str) -> None:
        self.run = run
        self.adapter = adapter
        self.load: UserLoad | None = None
        self._db: Any = None

    def iterations(self) -> list[dict[str, Any]]:
        from tiller.server.formats.logstore import iterations, open_readonly

        if self._db is None:
            self._db = open_readonly(self.run.paths.db)
        return iterations(self._db, self.adapter)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()

    def wait(self, desc: str, total_s: float, done: Callable[[float], float | None]) -> float:
        """Poll until ``done(now)`` returns a time (which this returns), with a progress bar."""
        began = time.time()
        with tqdm(total=round(total_s), desc=desc, unit="s", leave=True) as bar:
            while True:
                self.run.sup.poll()
                now = time.time()
                end = done(now)
                bar.n = round(now - began)
                bar.total = max(bar.total, bar.n)  # waiting for an iteration end runs past it
                bar.set_postfix_str(self.status(now), refresh=False)
                bar.refresh()
                if end is not None:
                    return end
                time.sleep(1.0)

    def status(self, now: float) -> str:
        parts = [f"{len(self.iterations())} iterations"]
        if self.load is not None:
            tok = sum(n for _, e, n in list(self.load.requests) if e > now - 10)
            parts.insert(0, f"users {tok / 10:.1f} tok/s")
        return ", ".join(parts)

    def iteration_end(
        self, after: Callable[[list[dict[str, Any]]], float | None], deadline: float
    ) -> Callable[[float], float | None]:
        """``done`` for ``wait``: the first iteration end at or after ``after(rows)`` (None: not
        known yet); past ``deadline``, now (``RuntimeError`` if no iteration was recorded)."""

        def done(now: float) -> float | None:
            rows = self.iterations()
            t = after(rows)
            ends = [] if t is None else [float(r["finished_at"]) for r in rows]
            ends = [e for e in ends if t is not None and e >= t]
            if ends:
                return min(ends)
            if now > deadline:
                if not rows:
                    raise RuntimeError(
                        f"no learner iteration by the deadline; see {self.run.paths.root}"
                    )
                tqdm.write(f"no iteration ended in time: the window ends now ({now:.0f})")
                return now
            return None

        return done


def measure(a: argparse.Namespace, cfg: Any, model: Path, work: Path) -> dict[str, Any]:
    """The three phases on one ``AlignRun``; the users' and the learner's figures of each."""
    from tiller.learner.align.run import AlignRun

    run_dir = work / "run"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    r = AlignRun(cfg, run_dir, model, lambda m: tqdm.write(f"align: {m}"))
    ph = Phases(r, cfg.adapter)
    marks: dict[str, float] = {}
    try:
        judge_url = r.start_server()
        marks["ready"] = time.time()
        load = UserLoad(
            r.target,
            lines(HELDOUT),
            a.users,
            max_tokens=a.max_tokens,
            temperature=1.0,
            ignore_eos=True,
            log=False,
        ).start()
        ph.load = load
        try:
            t = marks["ready"] + a.warmup
            marks["idle_start"] = ph.wait("warm-up", a.warmup, lambda now: t if now >= t else None)
            t1 = marks["idle_start"] + a.duration
            marks["idle_end"] = ph.wait("idle", a.duration, lambda now: t1 if now >= t1 else None)
            r.start_workers(judge_url)
            marks["workers_started"] = time.time()

            def learning_end(rows: list[dict[str, Any]]) -> float | None:
                return float(rows[0]["started_at"]) + a.duration if rows else None

            deadline = marks["workers_started"] + a.duration + a.timeout
            marks["learning_end"] = ph.wait(
                "learning", a.duration, ph.iteration_end(learning_end, deadline)
            )
        finally:
            ph.load = None
            load.stop()
        rows = ph.iterations()
        marks["learning_start"] = float(rows[0]["started_at"])
        if not a.skip_alone:
            t2 = marks["learning_end"] + a.duration
            marks["alone_end"] = ph.wait(
                "learner alone", a.duration, ph.iteration_end(lambda _: t2, t2 + a.timeout)
            )
        rows = ph.iterations()
    finally:
        ph.close()
        r.sup.stop_all()
    epochs = int(cfg.learner.get("train", {}).get("epochs", 1))
    res: dict[str, Any] = {
        "marks": marks,
        "idle": load.window(marks["idle_start"], marks["idle_end"]),
        "learning": load.window(marks["learning_start"], marks["learning_end"]),
        "learner": trained_pairs(rows, epochs, marks["learning_start"], marks["learning_end"]),
        "learner_alone": (
            trained_pairs(rows, epochs, marks["learning_end"], marks["alone_end"])
            if "alone_end" in marks
            else None
        ),
        "epochs": epochs,
        "iterations": [{k: row.get(k) for k in ITERATION_KEYS} for row in rows],
        "requests": load.requests,
        "failures": load.failures[:20],
        "run_dir": str(run_dir),
    }
    return res


def summarize(res: dict[str, Any]) -> list[str]:
    users = f"{res['users']} users, {res['max_tokens']} tokens each"
    out = user_lines(res["idle"], res["learning"], users)
    out += pairs_lines(res["learner"], res["learner_alone"], users)
    if res["learning"]["errors"]:
        out.append(
            f"user request errors: {res['learning']['errors']} (first: {res['failures'][0]})"
        )
    return out


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = res["marks"]
    t0 = m["ready"]
    reqs = [(s - t0, e - t0, n) for s, e, n in res["requests"]]
    bin_s = max(2.0, res["duration_s"] / 40)
    tok = [0.0] * (int(max(e for _, e, _ in reqs) // bin_s) + 1)
    for _, e, n in reqs:
        tok[int(e // bin_s)] += n
    fig, (ax, lat) = plt.subplots(2, 1, figsize=(12, 7), sharex=True)
    ax.step(
        [k * bin_s for k in range(len(tok))],
        [x / bin_s for x in tok],
        where="post",
        color="black",
        lw=1,
        label=f"users' tok/s ({bin_s:.0f} s bins)",
    )
    spans = [
        ("idle", "idle_start", "idle_end", "grey"),
        ("learning", "learning_start", "learning_end", "tab:blue"),
        ("learner alone", "learning_end", "alone_end", "tab:green"),
    ]
    for label, a, b, colour in spans:
        if a in m and b in m:
            for axis in (ax, lat):
                axis.axvspan(
                    m[a] - t0,
                    m[b] - t0,
                    color=colour,
                    alpha=0.12,
                    label=label if axis is ax else None,
                )
    for name, colour in (("idle", "grey"), ("learning", "tab:blue")):
        w = res[name]
        a_, b_ = (
            (m["idle_start"], m["idle_end"])
            if name == "idle"
            else (m["learning_start"], m["learning_end"])
        )
        ax.hlines(w["tok_per_s"], a_ - t0, b_ - t0, colors=colour, lw=2)
        lat.hlines(
            w["p99_s"],
            a_ - t0,
            b_ - t0,
            colors=colour,
            lw=2,
            linestyles="--",
            label=f"p99 {name} {w['p99_s']:.2f} s",
        )
    for k, it in enumerate(res["iterations"]):
        for axis in (ax, lat):
            axis.axvline(
                float(it["finished_at"]) - t0,
                color="tab:red",
                ls=":",
                lw=0.9,
                label="learner iteration end" if k == 0 and axis is ax else None,
            )
    ax.axvline(m["workers_started"] - t0, color="tab:orange", lw=1, label="learner starts")
    ax.set_ylabel("users' completed tok/s")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8, loc="lower left")
    lat.scatter([e for _, e, _ in reqs], [e - s for s, e, _ in reqs], s=4, color="black", alpha=0.4)
    lat.set_ylabel("request latency (s)")
    lat.set_xlabel("seconds since the server was up")
    lat.set_ylim(bottom=0)
    lat.legend(fontsize=8, loc="upper left")
    idle, busy = res["idle"], res["learning"]
    fig.suptitle(
        f"{res['users']} users x {res['max_tokens']} tokens beside {res['config_name']} on "
        f"{res['model_name']}: user tok/s kept {ratio(busy['tok_per_s'], idle['tok_per_s']):.2f}, "
        f"user p99 latency ratio {ratio(busy['p99_s'], idle['p99_s']):.2f}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    p.add_argument("--users", type=int, default=LOAD_CONCURRENCY)
    p.add_argument("--duration", type=float, default=300.0, help="seconds per phase (at least)")
    p.add_argument("--max-tokens", type=int, default=LOAD_TOKENS)
    p.add_argument("--config", type=Path, default=CONFIG)
    p.add_argument("--warmup", type=float, default=10.0, help="users on the idle server first")
    p.add_argument(
        "--timeout",
        type=float,
        default=1200.0,
        help="how long past a phase's duration to wait for its iteration end",
    )
    p.add_argument("--skip-alone", action="store_true", help="no phase 3 (the loop alone)")
    p.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "out" / "serving_during_learning.json"
    )
    a = p.parse_args()
    if a.users < 1 or a.max_tokens < 1 or a.duration <= 0:
        p.error("--users and --max-tokens must be >= 1 and --duration > 0")
    os.environ.update(ENV)  # the children (server, annotator, learner) inherit it

    from serve_throughput import resolve_model

    from tiller.learner.align.config import load_config

    try:
        cfg = load_config(a.config)
    except ValueError as e:
        p.error(str(e))
    model = resolve_model(a.model)
    # The loop trains adapters of the model served, whatever the config names.
    cfg = replace(cfg, model=str(model), learner={**cfg.learner, "base_model": model.name})
    a.out = a.out.resolve()  # align's children run in the run directory
    work = a.out.with_name(a.out.stem + "-work")
    work.mkdir(parents=True, exist_ok=True)
    res = measure(a, cfg, model, work)
    res |= {
        "users": a.users,
        "max_tokens": a.max_tokens,
        "duration_s": a.duration,
        "config": str(a.config),
        "config_name": cfg.name,
        "model": str(model),
        "model_name": model.name,
    }
    report(res, a.out, summarize, plot)


if __name__ == "__main__":
    main()
