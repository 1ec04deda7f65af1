"""Offline ALT experiments on SmolLM2: why does training add nothing over prompting?

One fixed labelled dataset, several training variants, one evaluation, all in one run on one
machine, so every figure is a comparison within the run:

- ``data``: the prompted bootstrap samples the training prompts under each of the feedback
  tags (the loop's exemplar feedback), VADER scores them and absolute cuts tag them; the same
  for the held-out prompts (the labelled held-out set of ``nll``).
- ``train NAME``: one ALT adapter on that data (steps, β, α, lr, examples, balance, reference).
- ``nll``: does the conditional NLL separate the tags? For each held-out labelled sample,
  log p(y | x, f) under every tag f; accuracy of the arg-max tag and the mean margin
  log p(y | x, f_label) − log p(y | x, f_opposite extreme), per model.
- ``eval``: the held-out sampling evaluation (64 openings × 4 samples, seeds 4321 + i) of the
  base model, the prompted bootstrap and every adapter at the two extreme tags; spread
  (high − low) paired over prompt and sample, trained − prompted with its paired t-test,
  distinct-2 and perplexity under the base model. Prints ``ALT trained - prompted (NAME): …``.

``python bench/alt_experiments.py all --out DIR`` runs the plan in ``PLAN``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PROMPTS = HERE.parent / "deploy" / "align" / "prompts"
TAGS = ("Very negative", "Negative", "Positive", "Very positive")
CUTS = (-0.5, 0.0, 0.5)
TEMPLATE = "Sentiment: {feedback}\nReview: {prompt}"
HIGH, LOW = "Very positive", "Very negative"
SAMPLING = {"temperature": 0.8, "top_p": 0.9, "repetition_penalty": 1.2, "max_tokens": 48}
EVAL_SEED, EVAL_SAMPLES = 4321, 2

# name -> train options; the first is the loop's setting today (one iteration's worth).
PLAN: dict[str, dict[str, Any]] = {
    "loop": {"steps": 32, "beta": 0.05},
    "long": {"steps": 160, "beta": 0.05},
    "long-contrast": {"steps": 160, "beta": 0.05, "contrast": 1.0, "contrast_tags": 1},
    "long-untagged-ref": {"steps": 160, "beta": 0.05, "reference": "untagged"},
    "long-nokl": {"steps": 160, "beta": 0.0},
}


def render(prompt: str, tag: str) -> str:
    from tiller.server.formats.manifest import Conditioning
    from tiller.server.formats.prompt import render_text

    return render_text(prompt, tag, Conditioning(tags=TAGS, template=TEMPLATE, separator=""))


def tag_of(score: float) -> str:
    return TAGS[sum(score >= c for c in CUTS)]


def model_dir() -> Path:
    from tiller.server.tools.models import prepare_smollm2

    return prepare_smollm2(Path(os.environ.get("TILLER_CACHE", Path.home() / ".cache/tiller")))


def lines(name: str) -> list[str]:
    return [x for x in (PROMPTS / name).read_text().splitlines() if x.strip()]


def llm(lora: bool) -> Any:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB; vLLM takes most RAM otherwise
    from vllm import LLM

    from tiller.server.device import detect_dtype

    return LLM(
        model=str(model_dir()),
        dtype=detect_dtype("auto"),
        enforce_eager=True,
        max_model_len=512,
        enable_lora=lora,
        max_lora_rank=16,
        max_loras=4,
        seed=0,
    )


def sample(engine: Any, prompts: Sequence[str], n: int, seed: int, lora: Any = None) -> list[str]:
    """``n`` continuations per prompt (prompt ``i`` with seed ``seed + i``), prompt-major."""
    from vllm import SamplingParams

    params = [SamplingParams(n=n, seed=seed + i, **SAMPLING) for i in range(len(prompts))]
    outs = engine.generate(list(prompts), params, lora_request=lora, use_tqdm=True)
    return [c.text for o in outs for c in o.outputs]


def vader(texts: Sequence[str]) -> list[float]:
    from tiller.learner.annotate.scorers import make_scorer

    s = make_scorer("sentiment")
    return [s.score(t) for t in texts]


def cmd_data(out: Path, train_prompts: int) -> None:
    engine = llm(lora=False)
    for split, prompts in (
        ("train", lines("reviews-train.txt")[:train_prompts]),
        ("heldout", lines("reviews-heldout.txt")),
    ):
        rows = []
        for tag in TAGS:
            texts = sample(engine, [render(p, tag) for p in prompts], 1, 100 + TAGS.index(tag))
            for p, t, s in zip(prompts, texts, vader(texts), strict=True):
                rows.append({"prompt": p, "exemplar": tag, "text": t, "score": s, "tag": tag_of(s)})
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        shares = {t: sum(r["tag"] == t for r in rows) / len(rows) for t in TAGS}
        print(f"{split}: {len(rows)} samples, tag shares " + json.dumps(shares))


def read(out: Path, split: str) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (out / f"{split}.jsonl").read_text().splitlines()]


def cmd_train(out: Path, name: str, opts: dict[str, Any]) -> None:
    from tiller.learner.data.examples import SFTExample
    from tiller.learner.objectives.alt import ALTConfig
    from tiller.learner.trainer import TrainConfig, train

    rows = read(out, "train")[: opts.get("examples")]
    counts = {t: sum(r["tag"] == t for r in rows) for t in TAGS}
    weight = {t: len(rows) / (len(TAGS) * n) if n else 0.0 for t, n in counts.items()}
    rng, k = random.Random(0), opts.get("contrast_tags", 0)
    examples = [
        SFTExample(
            prompt=render(r["prompt"], r["tag"]),
            completion=r["text"],
            weight=weight[r["tag"]] if opts.get("balance", "weight") == "weight" else 1.0,
            source=str(i),
            reference_prompt=r["prompt"] if opts.get("reference") == "untagged" else None,
            contrast_prompts=tuple(
                render(r["prompt"], t) for t in rng.sample([x for x in TAGS if x != r["tag"]], k)
            ),
        )
        for i, r in enumerate(rows)
    ]
    cfg = TrainConfig(
        objective="alt",
        objective_config=ALTConfig(
            beta=opts.get("beta", 0.05),
            alpha=opts.get("alpha", 0.0),
            contrast=opts.get("contrast", 0.0),
        ),
        lora_r=16,
        lora_alpha=32,
        lr=opts.get("lr", 1e-3),
        batch_size=8,
        max_steps=opts["steps"],
        epochs=100,
        max_length=128,
        precision="fast",
    )
    t0 = time.monotonic()
    train(model_dir(), examples, cfg, out / "adapters" / name)
    print(f"trained {name}: {opts} in {time.monotonic() - t0:.0f} s")


def cmd_nll(out: Path, names: Sequence[str]) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = read(out, "heldout")
    tok = AutoTokenizer.from_pretrained(model_dir())
    base = AutoModelForCausalLM.from_pretrained(model_dir(), torch_dtype=torch.float32).eval()
    results = json.loads((out / "nll.json").read_text()) if (out / "nll.json").exists() else {}
    for name in ["prompted", *names]:
        model = base
        if name != "prompted":
            model = PeftModel.from_pretrained(base, str(out / "adapters" / name)).eval()
        lp = _cond_logps(model, tok, rows)  # [rows, tags]
        labels = torch.tensor([TAGS.index(r["tag"]) for r in rows])
        acc = float((lp.argmax(1) == labels).float().mean())
        ext = [i for i, r in enumerate(rows) if r["tag"] in (HIGH, LOW)]
        own = lp[ext, labels[ext]]
        other = lp[ext, [TAGS.index(LOW if rows[i]["tag"] == HIGH else HIGH) for i in ext]]
        margin = (own - other).tolist()
        results[name] = {"accuracy": acc, "extreme_margin": sum(margin) / len(margin)}
        m = results[name]["extreme_margin"]
        print(f"nll {name}: tag accuracy {acc:.3f}, extreme margin {m:+.3f} nats")
        if name != "prompted":
            base = model.unload()
    (out / "nll.json").write_text(json.dumps(results, indent=1))


def _cond_logps(model: Any, tok: Any, rows: list[dict[str, Any]]) -> Any:
    """``[len(rows), len(TAGS)]``: summed log p(text | render(prompt, tag)) per tag."""
    import torch

    out = torch.zeros(len(rows), len(TAGS))
    jobs = [(i, j) for i in range(len(rows)) for j in range(len(TAGS))]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for s in range(0, len(jobs), 32):
            chunk = jobs[s : s + 32]
            seqs = []
            for i, j in chunk:
                p = tok(render(rows[i]["prompt"], TAGS[j]))["input_ids"]
                c = tok(rows[i]["text"], add_special_tokens=False)["input_ids"]
                seqs.append((p, c))
            width = max(len(p) + len(c) for p, c in seqs)
            ids = torch.full((len(seqs), width), tok.eos_token_id)
            mask = torch.zeros(len(seqs), width, dtype=torch.long)
            lab = torch.zeros(len(seqs), width, dtype=torch.bool)
            for k, (p, c) in enumerate(seqs):
                ids[k, : len(p) + len(c)] = torch.tensor(p + c)
                mask[k, : len(p) + len(c)] = 1
                lab[k, len(p) : len(p) + len(c)] = True
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
            tgt = logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1) * lab[:, 1:]
            for k, (i, j) in enumerate(chunk):
                out[i, j] = tgt[k].sum()
    return out


def cmd_eval(out: Path, names: Sequence[str]) -> None:
    from vllm.lora.request import LoRARequest

    prompts = lines("reviews-heldout.txt")
    engine = llm(lora=True)
    runs: dict[str, list[str]] = {"base": sample(engine, prompts, EVAL_SAMPLES, EVAL_SEED)}
    for tag in (HIGH, LOW):
        tagged = [render(p, tag) for p in prompts]
        runs[f"prompted|{tag}"] = sample(engine, tagged, EVAL_SAMPLES, EVAL_SEED)
        for k, name in enumerate(names):
            lora = LoRARequest(name, k + 1, str(out / "adapters" / name))
            runs[f"{name}|{tag}"] = sample(engine, tagged, EVAL_SAMPLES, EVAL_SEED, lora)
    (out / "eval-texts.json").write_text(json.dumps(runs))
    del engine
    report(out, names, runs)


def distinct2(texts: Sequence[str]) -> float:
    grams = [tuple(w[i : i + 2]) for t in texts for w in [t.split()] for i in range(len(w) - 1)]
    return len(set(grams)) / max(1, len(grams))


def report(out: Path, names: Sequence[str], runs: dict[str, list[str]]) -> None:

    from tiller.learner.fluency import load_scoring_model
    from tiller.learner.stats import paired_test

    prompts = lines("reviews-heldout.txt")
    ctx = [p for p in prompts for _ in range(EVAL_SAMPLES)]
    scorer = load_scoring_model(model_dir())
    scores = {k: vader(v) for k, v in runs.items()}
    table: dict[str, Any] = {"base": _fluency([runs["base"]], scores["base"], ctx, scorer)}
    spreads: dict[str, list[float]] = {}
    for name in ["prompted", *names]:
        hi, lo = scores[f"{name}|{HIGH}"], scores[f"{name}|{LOW}"]
        spreads[name] = [a - b for a, b in zip(hi, lo, strict=True)]
        groups = [runs[f"{name}|{HIGH}"], runs[f"{name}|{LOW}"]]
        table[name] = {
            "high": _mean_ci(hi),
            "low": _mean_ci(lo),
            "spread": _mean_ci(spreads[name]),
            **_fluency(groups, hi + lo, ctx + ctx, scorer),
        }
    for name in names:
        table[name]["vs_prompted"] = paired_test(spreads[name], spreads["prompted"], ctx)
        m, h, p = (table[name]["vs_prompted"][k] for k in ("mean", "ci95", "p"))
        print(f"ALT trained - prompted ({name}): spread {m:+.3f} ± {h:.3f} (p = {p:.2g})")
    for name, row in table.items():
        sp = row.get("spread")
        print(
            f"{name:>22}: "
            + (f"spread {sp['mean']:+.3f} ± {sp['ci95']:.3f}  " if sp else "")
            + f"distinct-2 {row['distinct2']:.3f}  ppl(base) {row['perplexity']:.1f}"
        )
    (out / "eval.json").write_text(json.dumps(table, indent=1))
    plot(out, ["prompted", *names], table)


def plot(out: Path, names: Sequence[str], table: dict[str, Any]) -> None:
    """``alt-experiments.png``: sampled spread per variant (95% CI) beside the held-out tag
    accuracy of its conditional likelihood (``nll.json``, when measured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nll = json.loads((out / "nll.json").read_text()) if (out / "nll.json").exists() else {}
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    spread = [table[n]["spread"] for n in names]
    a.bar(names, [s["mean"] for s in spread], yerr=[s["ci95"] for s in spread], capsize=4)
    a.set_ylabel(f"VADER spread, {HIGH!r} - {LOW!r}")
    a.set_title("sampled on held-out openings (paired seeds)")
    b.bar(names, [nll.get(n, {}).get("accuracy", 0.0) for n in names], color="tab:orange")
    b.axhline(1 / len(TAGS), color="grey", linestyle="--", label="chance")
    b.set_ylabel("arg-max tag = label")
    b.set_title("held-out labelled samples: log p(y | x, tag)")
    b.legend()
    for ax in (a, b):
        ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(out / "alt-experiments.png", dpi=110)


def _mean_ci(v: Sequence[float]) -> dict[str, float]:
    from tiller.learner.stats import mean_halfwidth

    m, h = mean_halfwidth(list(v), 0.975)
    return {"mean": m, "ci95": h}


def _fluency(
    groups: list[list[str]], scores: list[float], ctx: list[str], scorer: Any
) -> dict[str, Any]:
    """Distinct-2 per group of one condition's samples (one tag: the same count as the base's,
    since distinct-2 falls with the sample size), averaged; perplexity under the base."""
    from tiller.learner.fluency import perplexity

    texts = [t for g in groups for t in g]
    ppl = perplexity(scorer, list(zip(ctx, texts, strict=True)))
    d2 = sum(distinct2(g) for g in groups) / len(groups)
    return {"distinct2": d2, "perplexity": ppl, "mean": sum(scores) / len(scores)}


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("stage", choices=["data", "train", "nll", "eval", "report", "all"])
    ap.add_argument("--out", type=Path, default=HERE / "out" / "alt-experiments")
    ap.add_argument("--names", default=",".join(PLAN), help="variants (comma-separated)")
    ap.add_argument("--train-prompts", type=int, default=256)
    a = ap.parse_args(argv)
    out = a.out.resolve()
    (out / "adapters").mkdir(parents=True, exist_ok=True)
    names = [n for n in a.names.split(",") if n]
    t0 = time.monotonic()
    if a.stage in ("data", "all") and not (out / "heldout.jsonl").exists():
        cmd_data(out, a.train_prompts)
    if a.stage in ("train", "all"):
        for n in names:
            if not (out / "adapters" / n / "adapter_config.json").exists():
                cmd_train(out, n, PLAN[n])
    if a.stage in ("nll", "all"):
        cmd_nll(out, names)
    if a.stage in ("eval", "all"):
        cmd_eval(out, names)
    if a.stage == "report":
        report(out, names, json.loads((out / "eval-texts.json").read_text()))
    print(f"done in {time.monotonic() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
