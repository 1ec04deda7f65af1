"""The users beside a learner: closed-loop requests with their latencies, the figures of one
time window (users' tok/s and latency percentiles, the learner's trained pairs/s) and the lines
the benchmarks that run a learner beside serving print (``serving_during_learning``,
``align_vs_trl``), so that both print the same figures the same way."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from closed_loop import ClosedLoop

# Iteration statuses whose examples were trained on (a skipped or failed one trained nothing).
TRAINED = ("promoted", "rejected", "published")


class UserLoad(ClosedLoop):
    """``ClosedLoop`` with the figures of a time window."""

    def window(self, t0: float, t1: float) -> dict[str, Any]:
        """Figures of the calls that finished in [t0, t1]: tok/s over the window, and the
        latency (start to end of a call) median and 99th percentile in seconds."""
        inside = [(e - s, n) for s, e, n in list(self.requests) if t0 <= e <= t1]
        span = max(t1 - t0, 1e-9)
        latency = sorted(d for d, _ in inside)
        tokens = sum(n for _, n in inside)
        return {
            "tok_per_s": tokens / span,
            "requests": len(inside),
            "tokens": tokens,
            "window_s": span,
            "p50_s": percentile(latency, 50),
            "p99_s": percentile(latency, 99),
            "errors": len(self.failures),
        }


def percentile(xs: Sequence[float], q: int) -> float:
    if len(xs) < 2:
        return xs[0] if xs else float("nan")
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1]


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def trained_pairs(
    rows: Sequence[Mapping[str, Any]], epochs: int, t0: float, t1: float
) -> dict[str, Any]:
    """The learner's work in (t0, t1]: iterations (``learner_iterations`` rows) that finished
    then, and the pairs they trained (examples x epochs) per second of the window."""
    done = [r for r in rows if t0 < float(r["finished_at"]) <= t1]
    pairs = sum(int(r["examples"]) * epochs for r in done if r["status"] in TRAINED)
    span = max(t1 - t0, 1e-9)
    return {
        "pairs": pairs,
        "pairs_per_s": pairs / span,
        "iterations": len(done),
        "trained_iterations": sum(r["status"] in TRAINED for r in done),
        "window_s": span,
    }


def user_lines(
    idle: Mapping[str, Any], busy: Mapping[str, Any], load: str, beside: str = ""
) -> list[str]:
    """``user tok/s kept`` and ``user p99 latency ratio`` of the users' figures while a learner
    ran (``busy``) against the same load on an idle server; ``beside`` prefixes both lines
    when the learner is not Tiller's loop."""
    pre = f"beside {beside}: " if beside else ""
    out = [
        f"{pre}user tok/s kept: {ratio(busy['tok_per_s'], idle['tok_per_s']):.2f} "
        f"({busy['tok_per_s']:.1f} vs {idle['tok_per_s']:.1f} tok/s idle; {load})"
    ]
    if "p99_s" in busy and "p99_s" in idle:  # figures saved before latencies were kept lack them
        out.append(
            f"{pre}user p99 latency ratio: {ratio(busy['p99_s'], idle['p99_s']):.2f} "
            f"({busy['p99_s']:.2f} vs {idle['p99_s']:.2f} s idle; p50 {busy['p50_s']:.2f} vs "
            f"{idle['p50_s']:.2f} s; {busy['requests']} vs {idle['requests']} requests)"
        )
    return out


def pairs_lines(
    beside: Mapping[str, Any],
    alone: Mapping[str, Any] | None,
    users: str,
    learner: str = "",
    rounds: str = "iterations",
) -> list[str]:
    """The learner's trained pairs/s beside the users and, with ``alone``, without them
    (``trained_pairs``' keys; ``rounds`` names what ``iterations`` counts)."""
    pre = f"{learner} " if learner else ""
    out = [
        f"{pre}learner pairs/s beside users: {beside['pairs_per_s']:.3f} ({beside['pairs']} "
        f"pairs in {beside['iterations']} {rounds} over {beside['window_s']:.0f} s; {users})"
    ]
    if alone is not None:
        out.append(
            f"{pre}learner pairs/s kept beside users: "
            f"{ratio(beside['pairs_per_s'], alone['pairs_per_s']):.2f} "
            f"({beside['pairs_per_s']:.3f} vs {alone['pairs_per_s']:.3f} pairs/s alone: "
            f"{alone['pairs']} pairs in {alone['iterations']} {rounds} over "
            f"{alone['window_s']:.0f} s)"
        )
    return out


def report(
    res: dict[str, Any],
    out: Path,
    summarize: Callable[[dict[str, Any]], list[str]],
    plot: Callable[[dict[str, Any], Path], None],
) -> None:
    """Print the summary lines, write ``out`` (JSON) and its plot beside it (PNG)."""
    res["summary"] = summarize(res)
    for line in res["summary"]:
        print(line)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2, default=str))
    plot(res, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
