"""The end of an alignment run: the held-out evaluation (and weight sweep) against the running
server, the plots, and ``report.json`` in the run directory; plus its summary lines.

``write_report`` needs the server still up when ``[eval]`` is configured; the annotator and the
learner should already be stopped, so that the registry's active version holds still.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

from ..annotate.consistency import judge_report
from .children import RunPaths
from .config import AlignConfig, EvalConfig

# Columns of the learner's iteration rows copied into the report.
ITERATION_FIELDS = (
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
    "sampled_version",
    "served_at",
    "feedback_to_served_median_s",
    "feedback_to_served_max_s",
)


def write_report(
    cfg: AlignConfig,
    paths: RunPaths,
    *,
    target: str,
    model: Path,
    started: float,
    reason: str,
    say: Any,
) -> dict[str, Any]:
    """Evaluate (with ``[eval]``), plot, write ``report.json``; returns the report.

    ``target``: the running server; ``started``: the run's start (epoch seconds); ``reason``:
    why the loop ended; ``say``: one-line progress messages."""
    from tiller.server.formats.logstore import connect, count_generations, iterations
    from tiller.server.formats.registry import read_state

    from . import plots

    paths.plots.mkdir(exist_ok=True)
    db = connect(paths.db)
    active = read_state(paths.registry, cfg.adapter).active
    rows = iterations(db, cfg.adapter)
    report: dict[str, Any] = {
        "name": cfg.name,
        "ended": reason,
        "wall_s": time.time() - started,
        "adapter": cfg.adapter,
        "promoted_version": active,
        # .get: a table an older Tiller wrote lacks the newer columns
        "iterations": [{k: r.get(k) for k in ITERATION_FIELDS} for r in rows],
        "samples_logged": count_generations(db),
        "plots": [],
    }
    judges = judge_report(db, cfg.annotator)
    drawn: list[str] = report["plots"]
    if judges:
        report["judges"] = judges
        out = paths.plots / "judges.png"
        drawn.append(str(plots.judge_consistency(judges, out)))
    if cfg.eval is not None:
        say("evaluating on held-out prompts ...")
        _evaluate(cfg, cfg.eval, paths, target, model, active, report)
        if cfg.eval.sweep is not None and active is not None:
            say("attribute-weight sweep on held-out prompts ...")
            report["sweep"] = sweep(cfg, cfg.eval, paths, target, active)
            drawn.append(report["sweep"]["plot"])
    if cfg.reward_provider:
        out = paths.plots / "reward_by_version.png"
        drawn.append(str(plots.reward_by_version(db, cfg.reward_provider, cfg.adapter, out)))
    data = cfg.learner.get("data", {})
    if data.get("tags") and data.get("provider"):
        out = paths.plots / "tags_by_version.png"
        drawn.append(
            str(plots.tags_by_version(db, data["provider"], cfg.adapter, data["tags"], out))
        )
    if rows:
        out = paths.plots / "heldout_vs_time.png"
        drawn.append(str(plots.heldout_vs_time(db, cfg.adapter, started, out)))
    served = [r for r in rows if r.get("feedback_to_served_median_s") is not None]
    if served:
        report["feedback_to_served"] = feedback_summary(served)
        out = paths.plots / "feedback_to_served.png"
        drawn.append(str(plots.feedback_to_served(db, cfg.adapter, started, out)))
    (paths.root / "report.json").write_text(json.dumps(report, indent=2, default=str))
    return report


def feedback_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The served versions' feedback-to-served times: per version (median, max seconds) and
    the run's median of medians and its max."""
    per = {
        int(r["version"]): {
            "median_s": r["feedback_to_served_median_s"],
            "max_s": r["feedback_to_served_max_s"],
        }
        for r in rows
    }
    medians = sorted(v["median_s"] for v in per.values())
    return {
        "versions": per,
        "median_s": statistics.median(medians),
        "max_s": max(v["max_s"] for v in per.values()),
    }


def _evaluate(
    cfg: AlignConfig,
    ev: EvalConfig,
    paths: RunPaths,
    target: str,
    model: Path,
    active: int | None,
    report: dict[str, Any],
) -> None:
    """The held-out conditions scored and compared; fills ``report["eval"]`` and its plot."""
    from tiller.client import AsyncClient
    from tiller.server.formats.manifest import load_manifest
    from tiller.server.formats.registry import version_path

    from ..learn.publish import bootstrap_version
    from . import plots
    from .evaluate import Stats, compare, conditions, evaluate, spread

    boot = bootstrap_version(paths.registry, cfg.adapter)
    report["prompted_version"] = boot
    prompted = None
    if boot is not None:
        rendering = load_manifest(version_path(paths.registry, cfg.adapter, boot)).conditioning
        prompted = None if rendering is None else (boot, rendering)

    async def run_eval() -> list[Stats]:
        async with AsyncClient(target, timeout=600) as client:
            if ev.guidance > 0 and prompted is not None and prompted[0] != active:
                # The server mixes only the tags of a version it serves: load the bootstrap
                # again (not activated; a no-op while it is still the previous version).
                await client.load_adapter(cfg.adapter, registry_version=prompted[0])
            conds = conditions(ev, cfg.adapter, active, prompted)
            return await evaluate(client, conds, ev, model)

    stats = asyncio.run(run_eval())
    sign = 1.0 if ev.higher_is_better else -1.0

    def gain(a: Stats, b: Stats) -> dict[str, float]:
        c = compare(a, b)
        return c | {"gain": sign * c["diff"]}

    out: dict[str, Any] = {"conditions": [s.to_json() for s in stats]}
    base = stats[0]
    for s in stats[1:]:
        out[f"{s.label} vs base"] = gain(s, base)
    if len(stats) >= 3:  # ALT: the two extreme tags, then (maybe) prompted-only
        trained = spread(stats[1], stats[2], "tag spread")
        out["tag spread"] = gain(stats[1], stats[2])
        if len(stats) == 5:
            out["tag spread, prompted only"] = gain(stats[3], stats[4])
            prompted_spread = spread(stats[3], stats[4], "prompted spread")
            out["tag spread, trained over prompted"] = gain(trained, prompted_spread)
    report["eval"] = out
    report["plots"].append(str(plots.eval_bars(stats, ev.scorer, paths.plots / "heldout_eval.png")))


def sweep(
    cfg: AlignConfig, ev: EvalConfig, paths: RunPaths, target: str, version: int
) -> dict[str, Any]:
    """The CMPO attribute-weight sweep of ``version`` (``sweep`` module); JSON + plot."""
    from tiller.client import AsyncClient

    from . import sweep as sweeping

    assert ev.sweep is not None

    async def go() -> list[sweeping.SweepPoint]:
        async with AsyncClient(target, timeout=600) as client:
            return await sweeping.sweep(client, ev, cfg.adapter, version)

    points = asyncio.run(go())
    out = sweeping.plot(points, ev.sweep, cfg.adapter, paths.plots / "sweep.png")
    return {
        "points": sweeping.to_json(points),
        "heads": sweeping.heads(points, ev.sweep),
        "plot": str(out),
    }


def _paired(v: dict[str, Any]) -> str:
    over = f" over {v['blocks']} prompts" if "blocks" in v else ""  # older reports: per sample
    return f"paired{over}: p={v['p']:.2g}, Welch p={v['p_welch']:.2g}"


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The report's comparisons, its feedback-to-served time, its conditions and its judges'
    consistency, one line each."""
    ev = report.get("eval") or {}
    lines = [
        f"  {k}: gain {v['gain']:+.4f} ± {v['ci95']:.4f} ({_paired(v)})"
        for k, v in ev.items()
        if k != "conditions"
    ]
    for h in (report.get("sweep") or {}).get("heads", []):
        lines.append(
            f"  head {h['attribute']} ({h['scorer']}) at λ={h['lambda']:g}: gain "
            f"{h['gain']:+.4f} ± {h['ci95']:.4f} over base (paired p={h['p']:.2g}); "
            f"sweep {'strictly monotone' if h['monotone'] else 'not strictly monotone'}, "
            f"trend p={h['trend_p']:.2g}, "
            + (
                "no significant reversal"
                if not h["reversals"]
                else "reversed at λ " + ", ".join(f"{a:g}→{b:g}" for a, b in h["reversals"])
            )
        )
    fts = report.get("feedback_to_served")
    if fts:
        lines.append(
            f"  feedback to served: {fts['median_s']:.1f}s median, {fts['max_s']:.1f}s max "
            f"over {len(fts['versions'])} served versions"
        )
    for s in ev.get("conditions", []):
        ppl = "-" if s["perplexity"] is None else f"{s['perplexity']:.1f}"
        lines.append(
            f"  {s['label']}: mean {s['mean']:+.4f} ± {s['ci95']:.4f} "
            f"distinct-2 {s['distinct2']:.3f} ppl {ppl}"
        )
    for name, j in (report.get("judges") or {}).items():
        rate = j["order_consistency"]
        line = f"  judge {name}: order consistency {'-' if rate is None else f'{rate:.2f}'} "
        line += f"({j['consistent']}/{j['verdicts']}, {j['errors']} errors)"
        for scorer, a in j.get("scorer_agreement", {}).items():
            r = a["rate"]
            line += f"; agrees with {scorer} {'-' if r is None else f'{r:.2f}'} ({a['compared']})"
        lines.append(line)
    return lines
