"""ALT with guided sampling: does tag guidance turn the trained conditional into a larger spread
than it gives the prompted bootstrap?

``bench/alt_experiments.py`` found that training separates the tags in likelihood (held-out tag
accuracy 0.27 prompted → 0.38–0.47 trained) while plain sampling barely moves. Guidance
samples from Σ w_f · log p(y | x, f) over tags, here ``(1 + w)`` on the wanted extreme and
``-w`` on the opposite one (Tiller's ``feedback_mix``, classifier-free-guidance style): it
follows the *difference* between the two conditionals, which is what training sharpened.

One ``tiller serve`` of SmolLM2 serves the prompted bootstrap (a version without LoRA: the tags
rendered into the prompt) and every adapter of ``--out``'s ``adapters/`` as versions with the
same conditioning. For every guidance weight, each version samples the held-out openings at
"Very positive" and at "Very negative" (the same seeds everywhere; the experiments' sampling
without its repetition penalty, which a feedback mix refuses); the spread is high − low per
opening and seed, paired against the prompted bootstrap's at the same weight. Prints

    ALT guided trained - prompted (NAME, w=W): spread +X ± H (p = P)

and writes ``guidance.json`` and ``alt-guidance.png`` under ``--out``.

    python bench/alt_guidance.py --out DIR [--names long,long-contrast] [--weights 0,1,2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from align_vs_trl import stop, wait_port
from alt_experiments import (
    EVAL_SAMPLES,
    EVAL_SEED,
    HIGH,
    LOW,
    SAMPLING,
    TAGS,
    TEMPLATE,
    _fluency,
    _mean_ci,
    lines,
    model_dir,
    vader,
)

HERE = Path(__file__).resolve().parent
PROMPTED = "prompted"
# The experiments' sampling without the repetition penalty, at every weight: vLLM's penalty
# counts the prompt's tokens, which differ per mixed condition, so a feedback mix refuses it.
GUIDED = {k: v for k, v in SAMPLING.items() if k != "repetition_penalty"}


def build_versions(out: Path, names: Sequence[str]) -> Path:
    """A directory per served version: the adapter's files (none for the prompted bootstrap) and
    a manifest with the experiments' conditioning."""
    from tiller.server.formats.manifest import Conditioning, Manifest, write_manifest

    root = out / "guidance-versions"
    shutil.rmtree(root, ignore_errors=True)
    cond = Conditioning(tags=TAGS, template=TEMPLATE, separator="")
    for name in [PROMPTED, *names]:
        d = root / name
        d.mkdir(parents=True)
        if name != PROMPTED:
            for f in ("adapter_config.json", "adapter_model.safetensors"):
                shutil.copy(out / "adapters" / name / f, d / f)
        write_manifest(
            d,
            Manifest(
                name=name,
                version=1,
                base_model=model_dir().name,
                has_lora=name != PROMPTED,
                conditioning=cond,
            ),
        )
    return root


def start(root: Path, names: Sequence[str], work: Path) -> tuple[subprocess.Popen[bytes], str]:
    port_file, log = work / "server.port", work / "server.log"
    port_file.unlink(missing_ok=True)
    adapters = [a for n in [PROMPTED, *names] for a in ("--adapter", f"{n}={root / n}")]
    cmd = [
        sys.executable,
        "-m",
        "tiller.client.cli",
        "serve",
        "--model",
        str(model_dir()),
        "--port",
        "0",
        "--port-file",
        str(port_file),
        "--no-log",
        "--max-model-len",
        "512",
        *adapters,
    ]
    env = os.environ | {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    with log.open("wb") as f:
        proc = subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
    return proc, wait_port(port_file, proc, log, 600)


def mix(tag: str, w: float) -> dict[str, Any]:
    """The request fields for ``tag`` guided away from the opposite extreme by ``w``."""
    from tiller.learner.heldout import guided_pair

    mixes = guided_pair(HIGH, LOW, w)
    return {"feedback_mix": dict(mixes[tag])} if mixes else {"feedback": tag}


async def sample(target: str, name: str, tag: str, w: float, prompts: Sequence[str]) -> list[str]:
    """``EVAL_SAMPLES`` texts per prompt, prompt-major: one request each (a feedback mix serves
    n = 1), seed ``EVAL_SEED + EVAL_SAMPLES·i + j`` for sample ``j`` of prompt ``i``."""
    from tiller.client import AsyncClient

    sem = asyncio.Semaphore(32)

    async def one(seed: int, prompt: str) -> str:
        async with sem:
            g = await client.generate(
                prompt,
                adapter=name,
                seed=seed,
                log=False,
                timeout=600,
                **GUIDED,
                **mix(tag, w),
            )
            return g.text

    async with AsyncClient(target) as client:
        jobs = [
            one(EVAL_SEED + EVAL_SAMPLES * i + j, p)
            for i, p in enumerate(prompts)
            for j in range(EVAL_SAMPLES)
        ]
        return list(await asyncio.gather(*jobs))


def report(out: Path, names: Sequence[str], weights: Sequence[float], runs: dict[str, list[str]]):

    from tiller.learner.fluency import load_scoring_model
    from tiller.learner.stats import paired_test

    prompts = lines("reviews-heldout.txt")
    ctx = [p for p in prompts for _ in range(EVAL_SAMPLES)]
    scorer = load_scoring_model(model_dir())
    table: dict[str, Any] = {}
    for w in weights:
        spreads: dict[str, list[float]] = {}
        for name in [PROMPTED, *names]:
            hi_t, lo_t = runs[f"{name}|{w}|{HIGH}"], runs[f"{name}|{w}|{LOW}"]
            hi, lo = vader(hi_t), vader(lo_t)
            spreads[name] = [a - b for a, b in zip(hi, lo, strict=True)]
            row = {
                "high": _mean_ci(hi),
                "low": _mean_ci(lo),
                "spread": _mean_ci(spreads[name]),
                **_fluency([hi_t, lo_t], hi + lo, ctx + ctx, scorer),
            }
            if name != PROMPTED:
                row["vs_prompted"] = paired_test(spreads[name], spreads[PROMPTED], ctx)
                m, h, p = (row["vs_prompted"][k] for k in ("mean", "ci95", "p"))
                print(
                    f"ALT guided trained - prompted ({name}, w={w:g}): "
                    f"spread {m:+.3f} ± {h:.3f} (p = {p:.2g})"
                )
            table[f"{name}|{w}"] = row
            sp = row["spread"]
            print(
                f"{name:>18} w={w:<4g} spread {sp['mean']:+.3f} ± {sp['ci95']:.3f}  "
                f"high {row['high']['mean']:+.3f} low {row['low']['mean']:+.3f}  "
                f"distinct-2 {row['distinct2']:.3f}  ppl(base) {row['perplexity']:.1f}"
            )
    (out / "guidance.json").write_text(json.dumps(table, indent=1))
    plot(out, names, weights, table)


def plot(out: Path, names: Sequence[str], weights: Sequence[float], table: dict[str, Any]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name in [PROMPTED, *names]:
        rows = [table[f"{name}|{w}"] for w in weights]
        a.errorbar(
            weights,
            [r["spread"]["mean"] for r in rows],
            yerr=[r["spread"]["ci95"] for r in rows],
            marker="o",
            capsize=3,
            label=name,
        )
        b.plot(weights, [r["distinct2"] for r in rows], marker="o", label=name)
    a.set_xlabel("guidance weight w")
    a.set_ylabel(f"VADER spread, {HIGH!r} - {LOW!r}")
    a.set_title("held-out openings, paired seeds")
    b.set_xlabel("guidance weight w")
    b.set_ylabel("distinct-2 per tag")
    b.set_title("diversity")
    a.legend()
    fig.tight_layout()
    fig.savefig(out / "alt-guidance.png", dpi=110)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--out", type=Path, default=HERE / "out" / "alt-experiments")
    ap.add_argument("--names", default="long,long-contrast")
    ap.add_argument("--weights", default="0,1,2")
    a = ap.parse_args(argv)
    out = a.out.resolve()
    names = [n for n in a.names.split(",") if n]
    weights = [float(w) for w in a.weights.split(",")]
    if any(w < 0 for w in weights):
        ap.error("--weights must be >= 0")
    missing = [n for n in names if not (out / "adapters" / n).is_dir()]
    if missing:
        ap.error(f"no adapters for {missing} under {out / 'adapters'} (alt_experiments.py train)")
    root = build_versions(out, names)
    proc, target = start(root, names, out)
    prompts = lines("reviews-heldout.txt")
    runs: dict[str, list[str]] = {}
    try:
        from tqdm import tqdm

        plan = [(n, w, t) for w in weights for n in [PROMPTED, *names] for t in (HIGH, LOW)]
        for name, w, tag in tqdm(plan, desc="guided sampling"):
            runs[f"{name}|{w}|{tag}"] = asyncio.run(sample(target, name, tag, w, prompts))
    finally:
        stop(proc)
    (out / "guidance-texts.json").write_text(json.dumps(runs))
    report(out, names, weights, runs)


if __name__ == "__main__":
    main()
