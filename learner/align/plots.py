"""PNG pictures of an alignment run, drawn from the generation log and the learner's table.

- ``reward_by_version``: the reward provider's scores of sampled generations, one histogram
  per served version (ALT-style shifting distributions).
- ``tags_by_version``: the share of each tag a tag provider gave each version's samples.
- ``heldout_vs_time``: the gate's held-out value of each candidate and of the served version
  against wall time since the run started (higher is better: the gate's sign convention).
- ``eval_bars``: the final evaluation, mean ± 95% CI per condition.
- ``feedback_to_served``: per served version, the median and max seconds from a label of its
  data window landing in the log to the server serving it, against wall time.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import sqlite_utils

from tiller.server.formats.logstore import iterations, values_by_version

from .evaluate import Stats


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _annotated(db: sqlite_utils.Database, provider: str, adapter: str) -> dict[int, list[Any]]:
    out: dict[int, list[Any]] = defaultdict(list)
    for version, value in values_by_version(db, provider, adapter):
        out[version].append(value)
    return dict(sorted(out.items()))


def reward_by_version(db: sqlite_utils.Database, provider: str, adapter: str, out: Path) -> Path:
    plt = _plt()
    data = {
        v: [x for x in vals if isinstance(x, int | float)]
        for v, vals in _annotated(db, provider, adapter).items()
    }
    fig, ax = plt.subplots(figsize=(8, 4.5))
    cmap = plt.get_cmap("viridis")
    for i, (version, values) in enumerate(data.items()):
        if values:
            label = f"{'base' if version == 0 else f'v{version}'} (n={len(values)})"
            color = cmap(i / max(len(data) - 1, 1))
            ax.hist(values, bins=20, histtype="step", linewidth=2, label=label, color=color)
    ax.set_xlabel(f"reward ({provider})")
    ax.set_ylabel("sampled generations")
    ax.set_title(f"{adapter}: reward of the samples, per served version")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def tags_by_version(
    db: sqlite_utils.Database, provider: str, adapter: str, tags: Sequence[str], out: Path
) -> Path:
    plt = _plt()
    data = _annotated(db, provider, adapter)
    versions = list(data)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    bottom = [0.0] * len(versions)
    for tag in tags:
        shares = [sum(1 for x in data[v] if x == tag) / max(len(data[v]), 1) for v in versions]
        ax.bar(
            [("base" if v == 0 else f"v{v}") for v in versions], shares, bottom=bottom, label=tag
        )
        bottom = [b + s for b, s in zip(bottom, shares, strict=True)]
    ax.set_ylabel("share of samples")
    ax.set_title(f"{adapter}: tags ({provider}) of the samples, per served version")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def heldout_vs_time(db: sqlite_utils.Database, adapter: str, started: float, out: Path) -> Path:
    plt = _plt()
    rows = [r for r in iterations(db, adapter) if r["candidate_value"] is not None]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    t = [(r["finished_at"] - started) / 60 for r in rows]
    ax.plot(t, [r["incumbent_value"] for r in rows], "s--", color="gray", label="served")
    for status, marker, color in (("promoted", "o", "tab:green"), ("rejected", "x", "tab:red")):
        pts = [
            (ti, r["candidate_value"])
            for ti, r in zip(t, rows, strict=True)
            if r["status"] == status
        ]
        if pts:
            ax.scatter(
                *zip(*pts, strict=True),
                marker=marker,
                color=color,
                s=60,
                label=f"candidate, {status}",
            )
    ax.set_xlabel("minutes since start")
    ax.set_ylabel("held-out value (gate; higher is better)")
    ax.set_title(f"{adapter}: held-out reward vs wall time")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def feedback_to_served(db: sqlite_utils.Database, adapter: str, started: float, out: Path) -> Path:
    plt = _plt()
    rows = [
        r
        for r in iterations(db, adapter)
        if r.get("feedback_to_served_median_s") is not None  # .get: older tables lack it
    ]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    t = [(r["served_at"] - started) / 60 for r in rows]
    med = [r["feedback_to_served_median_s"] for r in rows]
    top = [r["feedback_to_served_max_s"] for r in rows]
    ax.vlines(t, med, top, color="tab:blue", alpha=0.4)
    ax.plot(t, med, "o-", color="tab:blue", label="median")
    ax.plot(t, top, "v", color="tab:red", label="max")
    for ti, m, r in zip(t, med, rows, strict=True):
        ax.annotate(f"v{r['version']}", (ti, m), textcoords="offset points", xytext=(4, -10))
    ax.set_xlabel("minutes since start (when served)")
    ax.set_ylabel("seconds from label to served")
    ax.set_title(f"{adapter}: feedback-to-served time per served version")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def eval_bars(stats: Sequence[Stats], scorer: str, out: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    labels = [s.label for s in stats]
    ax.bar(labels, [s.mean for s in stats], yerr=[s.ci95 for s in stats], capsize=6,
           color=["gray", *["tab:blue"] * (len(stats) - 1)])  # fmt: skip
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_ylabel(f"mean {scorer} (95% CI)")
    ax.set_title("held-out evaluation")
    plt.setp(ax.get_xticklabels(), rotation=15, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def judge_consistency(judges: Mapping[str, Mapping[str, Any]], out: Path) -> Path:
    """Per pairwise judge: its both-order agreement rate and its agreement with each offline
    scorer on the pairs both decided (report.json's ``judges``), with the counts on the bars."""
    plt = _plt()
    bars: list[tuple[str, float, str]] = []
    for name, j in judges.items():
        rate = j.get("order_consistency")
        bars.append(
            (f"{name}\norder consistency", rate or 0.0, f"{j['consistent']}/{j['verdicts']}")
        )
        for scorer, a in (j.get("scorer_agreement") or {}).items():
            bars.append((f"{name}\nagrees with {scorer}", a["rate"] or 0.0,
                         f"{a['agreeing']}/{a['compared']}"))  # fmt: skip
    fig, ax = plt.subplots(figsize=(max(4.0, 2.2 * len(bars)), 4.0))
    drawn = ax.bar([b[0] for b in bars], [b[1] for b in bars], color="tab:purple")
    ax.bar_label(drawn, labels=[b[2] for b in bars], fontsize=8)
    ax.axhline(0.5, color="gray", linewidth=0.8, linestyle="--")  # a coin's agreement
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("rate")
    ax.set_title("judges: both-order consistency and agreement with the scorers")
    plt.setp(ax.get_xticklabels(), fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
