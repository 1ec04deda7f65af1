"""CDF against plain DPO at the same budget (#21): two ``tiller align`` runs, one report.

Runs ``deploy/align/oaif-critic.toml`` (plain online DPO) and ``deploy/align/cdf-offline.toml``
(CDF: critique, refinement or preference by the prompt's perplexity tercile) one after the other
with the same ``--duration`` on this machine, unless ``--dpo-run`` / ``--cdf-run`` name finished
run directories. Both end with align's held-out evaluation (the same openings and seeds), so the
trained versions compare paired per opening and seed. Prints

    CDF gain / DPO gain: R (CDF +X vs DPO +Y over base; CDF - DPO +D ± H, paired p = P)

and writes ``cdf_vs_dpo.json`` and ``cdf-vs-dpo.png`` into ``--out``.

    python bench/cdf_vs_dpo.py [--duration 600] [--out bench/out/cdf_vs_dpo]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {
    "dpo": ROOT / "deploy" / "align" / "oaif-critic.toml",
    "cdf": ROOT / "deploy" / "align" / "cdf-offline.toml",
}


def run(config: Path, run_dir: Path, duration: float) -> None:
    cmd = [sys.executable, "-m", "tiller.client.cli", "align", "--config", str(config),
           "--run-dir", str(run_dir), "--duration", str(duration)]  # fmt: skip
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def trained(report: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The base condition and the evaluated trained version of one run's held-out evaluation."""
    conds = report["eval"]["conditions"]
    base = next(c for c in conds if c["label"] == "base")
    others = [c for c in conds if c["label"] != "base" and not c["label"].startswith("prompted")]
    if not others:
        raise SystemExit(f"{report['name']}: no trained version was evaluated (none promoted?)")
    return base, others[0]


def main() -> None:
    from scipy import stats

    from tiller.learner.stats import mean_halfwidth

    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--duration", type=float, default=600.0, help="loop seconds per method")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "cdf_vs_dpo")
    ap.add_argument("--dpo-run", type=Path, help="a finished oaif-critic run directory")
    ap.add_argument("--cdf-run", type=Path, help="a finished cdf-offline run directory")
    a = ap.parse_args()
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    dirs = {"dpo": a.dpo_run, "cdf": a.cdf_run}
    for name, d in dirs.items():
        if d is None:
            dirs[name] = out / name
            run(CONFIGS[name], out / name, a.duration)
    reports = {n: json.loads((d / "report.json").read_text()) for n, d in dirs.items()}
    rows: dict[str, Any] = {}
    for name, rep in reports.items():
        base, tr = trained(rep)
        rows[name] = {
            "label": tr["label"],
            "base": base["mean"],
            "trained": tr["mean"],
            # per held-out prompt (the mean of its samples), so that tests pair by prompt
            "scores": tr.get("block_means", tr["scores"]),
            "base_scores": base.get("block_means", base["scores"]),
            "distinct2": tr.get("distinct2"),
            "perplexity": tr.get("perplexity"),
            "iterations": len(rep["iterations"]),
            "promoted": sum(i["status"] == "promoted" for i in rep["iterations"]),
            "wall_s": rep["wall_s"],
            "report_gain": next(v["gain"] for k, v in rep["eval"].items() if k.endswith("vs base")),
        }
    # Both configs minimise sentiment (the critical reviewer): a gain is a fall in the score, and
    # CDF - DPO in gain terms is DPO's score minus CDF's, per held-out opening.
    gain = {n: r["report_gain"] for n, r in rows.items()}
    d = [dp - cd for cd, dp in zip(rows["cdf"]["scores"], rows["dpo"]["scores"], strict=True)]
    m, h = mean_halfwidth(d, 0.975)
    p = float(stats.ttest_rel(rows["dpo"]["scores"], rows["cdf"]["scores"]).pvalue)
    ratio = gain["cdf"] / gain["dpo"] if gain["dpo"] else float("nan")
    print(
        f"CDF gain / DPO gain: {ratio:.2f} (CDF {gain['cdf']:+.3f} vs DPO {gain['dpo']:+.3f} over "
        f"base; CDF - DPO {m:+.3f} ± {h:.3f}, paired p = {p:.2g})"
    )
    for name, r in rows.items():
        print(
            f"{name}: {r['label']} {r['iterations']} iterations ({r['promoted']} promoted), "
            f"distinct-2 {r['distinct2']:.3f}, perplexity under base {r['perplexity']:.1f}"
        )
    res = {"gain": gain, "cdf_minus_dpo": {"mean": m, "ci95": h, "p": p}, "ratio": ratio}
    res["runs"] = {n: {k: v for k, v in r.items() if "scores" not in k} for n, r in rows.items()}
    (out / "cdf_vs_dpo.json").write_text(json.dumps(res, indent=1))
    plot(out, rows, gain)


def plot(out: Path, rows: dict[str, Any], gain: dict[str, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tiller.learner.stats import mean_halfwidth

    fig, ax = plt.subplots(figsize=(6, 4))
    names = list(rows)
    cis = [
        mean_halfwidth([b - t for b, t in zip(r["base_scores"], r["scores"], strict=True)], 0.975)
        for r in rows.values()
    ]
    ax.bar(names, [gain[n] for n in names], yerr=[c[1] for c in cis], capsize=5)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_ylabel("held-out gain over base (−VADER), 95% CI")
    ax.set_title("CDF vs plain DPO, same loop budget")
    fig.tight_layout()
    fig.savefig(out / "cdf-vs-dpo.png", dpi=110)


if __name__ == "__main__":
    main()
