"""Offline CMPO experiments on SmolLM2: why does the "simple" head of ``cmpo-plural`` not steer?

One fixed dataset, several head-training variants, one evaluation, all in one run on one
machine, so every figure is a comparison within the run:

- ``data``: the base model samples ``--per-prompt`` continuations of each training prompt with
  the loop's sampling settings (``cmpo-plural.toml``: temperature 1, repetition penalty 1.2,
  48 tokens); every sample is scored by every scorer in ``SCORERS``.
- ``diagnose``: how much signal each candidate "simple" measure carries on this data:
  split-half reliability (the measure on a sample's first half of words vs its second half),
  the share of a prompt's sample pairs the cuts tell apart, and the correlation with sentiment.
- ``train NAME``: one pair of plural heads (``heads_trainer.train_heads``, the loop's trainer)
  on the CMPO pairs of that data (``data.cmpo``'s rule: every sample pair of a prompt, both
  directions, the power set of the attributes the chosen one wins on), with the variant's
  "simple" attribute (scorer, cuts) and training settings (epochs, β, rank, lr).
- ``eval``: the held-out prompts (64 × ``EVAL_SAMPLES``, prompt ``i`` sample ``s`` with its own
  seeded generator, so every condition draws the same random numbers) for the base model and
  every variant at λ ∈ ``LAMBDAS`` with weights ``{critical: λ, simple: 1 − λ}``; mean sentiment,
  Flesch and ``simple_words`` with 95% CIs, each head's extreme vs the base (paired t-test),
  whether the sweep is monotone, and perplexity under the base and distinct-2 at the extremes.
  Prints ``CMPO simple head (NAME): …`` per variant and writes ``eval.json`` and
  ``sweep.png``. Variants ``easy-*`` rate "simple" by ``simple_words`` (Dale-Chall easy words).
- ``implicit``: what each head learned, apart from what sampling with it does: its
  log-likelihood ratio to the base on the base's held-out samples, against every score.

Generation is a plain HF sampling loop (KV cache, trunk in the learner's inference dtype) whose
next-token logits are ``objectives.cmpo.mixed_logits`` of the final hidden state, the formula
the server's steering processor applies. ``python bench/cmpo_experiments.py all --out DIR``
runs the plan in ``PLAN``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from itertools import combinations, pairwise
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PROMPTS = HERE.parent / "deploy" / "align" / "prompts"
ATTRIBUTES = ("critical", "simple")
SCORERS = ("sentiment", "readability", "simple_words")
# cmpo-plural.toml's [learner.sample]; top_p 1.
SAMPLING = {"temperature": 1.0, "repetition_penalty": 1.2, "max_tokens": 48}
CRITICAL = {"scorer": "sentiment", "cuts": (-0.3, -0.05, 0.2, 0.5), "higher_is_better": False}
FLESCH = {"scorer": "readability", "cuts": (36.0, 47.0, 59.0, 70.0), "higher_is_better": True}
EASY = {"scorer": "simple_words", "cuts": "quintiles", "higher_is_better": True}
DATA_SEED, EVAL_SEED, EVAL_SAMPLES = 100, 4321, 2
LAMBDAS = (0.0, 0.25, 0.5, 0.75, 1.0)

# name -> options; "loop" is one iteration of cmpo-plural.toml's [learner.heads] on this data.
PLAN: dict[str, dict[str, Any]] = {
    "loop": {"simple": FLESCH, "epochs": 1, "beta": 0.1},
    "flesch-3ep": {"simple": FLESCH, "epochs": 3, "beta": 0.1},
    "easy-1ep": {"simple": EASY, "epochs": 1, "beta": 0.1},
    "easy-3ep": {"simple": EASY, "epochs": 3, "beta": 0.1},
    "easy-b05": {"simple": EASY, "epochs": 1, "beta": 0.5},
    "easy-lr1e-3": {"simple": EASY, "epochs": 1, "beta": 0.1, "lr": 1e-3},
    "easy-b05-lr1e-3": {"simple": EASY, "epochs": 1, "beta": 0.5, "lr": 1e-3},
}


def model_dir() -> Path:
    from tiller.server.tools.models import prepare_smollm2

    return prepare_smollm2(Path(os.environ.get("TILLER_CACHE", Path.home() / ".cache/tiller")))


def lines(name: str) -> list[str]:
    return [x for x in (PROMPTS / name).read_text().splitlines() if x.strip()]


def read(out: Path, name: str) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (out / name).read_text().splitlines()]


def score_all(texts: Sequence[str]) -> dict[str, list[float]]:
    from tiller.learner.annotate.scorers import make_scorer

    return {n: [make_scorer(n).score(t) for t in texts] for n in SCORERS}


_TRUNK: list[tuple[Any, Any]] = []  # held here: the learner's model cache does not keep it


def trunk() -> tuple[Any, Any]:
    """(tokenizer, base model), loaded once per process as the learner loads its frozen
    models; the thread count comes from ``OMP_NUM_THREADS`` (default 1)."""
    import torch

    from tiller.learner.fluency import load_scoring_model

    if not _TRUNK:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        _TRUNK.append(load_scoring_model(model_dir()))
    return _TRUNK[0]


def generate(
    prompts: Sequence[str],
    n: int,
    seed: int,
    heads: Any = None,
    weights: Sequence[float] = (),
    batch: int = 128,
) -> list[str]:
    """``n`` continuations per prompt, prompt-major; row (prompt ``i``, sample ``s``) samples
    with its own generator seeded ``(seed + i) * 64 + s``. ``heads``: (A [k, r, H], B [k, V, r])
    applied with ``weights`` (one λ per head) through ``mixed_logits``; None = the base head."""
    rows = [(i, s) for i in range(len(prompts)) for s in range(n)]
    out: list[str] = []
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        out += _generate_batch([prompts[i] for i, _ in chunk], chunk, seed, heads, weights)
    return out


def _generate_batch(
    prompts: Sequence[str],
    rows: Sequence[tuple[int, int]],
    seed: int,
    heads: Any,
    weights: Sequence[float],
) -> list[str]:
    import torch

    from tiller.learner.objectives.cmpo import mixed_logits

    tok, model = trunk()
    w0 = model.get_output_embeddings().weight.detach().float()
    ids = [tok(p).input_ids for p in prompts]
    width = max(map(len, ids))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    b = len(ids)
    x = torch.full((b, width), pad)
    mask = torch.zeros(b, width, dtype=torch.long)
    for k, p in enumerate(ids):  # left padding
        x[k, width - len(p) :] = torch.tensor(p)
        mask[k, width - len(p) :] = 1
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    seen = torch.zeros(b, w0.shape[0], dtype=torch.bool)
    for k, p in enumerate(ids):
        seen[k, p] = True
    gens = [torch.Generator().manual_seed((seed + i) * 64 + s) for i, s in rows]
    lam = torch.tensor([list(weights)] * b, dtype=torch.float32) if heads is not None else None
    eos = {tok.eos_token_id, model.generation_config.eos_token_id}
    eos = {e for e in eos if e is not None}
    done = torch.zeros(b, dtype=torch.bool)
    got: list[list[int]] = [[] for _ in range(b)]
    past = None
    penalty = SAMPLING["repetition_penalty"]
    with torch.no_grad():
        for _ in range(int(SAMPLING["max_tokens"])):
            o = model.model(
                input_ids=x, attention_mask=mask, position_ids=pos, past_key_values=past,
                use_cache=True,
            )  # fmt: skip
            past = o.past_key_values
            h = o.last_hidden_state[:, -1].float()
            logits = h @ w0.T if heads is None else mixed_logits(h, w0, *heads, lam)
            logits = torch.where(
                seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits
            )
            probs = torch.softmax(logits / SAMPLING["temperature"], -1)
            nxt = torch.cat([torch.multinomial(probs[k], 1, generator=gens[k]) for k in range(b)])
            for k in range(b):
                if not done[k]:
                    t = int(nxt[k])
                    if t in eos:
                        done[k] = True
                    else:
                        got[k].append(t)
            if bool(done.all()):
                break
            seen[torch.arange(b), nxt] = True
            x = nxt[:, None]
            mask = torch.cat([mask, torch.ones(b, 1, dtype=torch.long)], 1)
            pos = pos[:, -1:] + 1
    return [tok.decode(g, skip_special_tokens=True) for g in got]


def cmd_data(out: Path, train_prompts: int, per_prompt: int) -> None:
    prompts = lines("reviews-train.txt")[:train_prompts]
    t0 = time.monotonic()
    texts = generate(prompts, per_prompt, DATA_SEED)
    scores = score_all(texts)
    rows = [
        {"prompt": p, "sample": s, "text": t, **{n: scores[n][k] for n in SCORERS}}
        for k, ((p, s), t) in enumerate(
            zip([(p, s) for p in prompts for s in range(per_prompt)], texts, strict=True)
        )
    ]
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"data: {len(rows)} samples in {time.monotonic() - t0:.0f} s")


def quintiles(v: Sequence[float]) -> tuple[float, ...]:
    import numpy as np

    return tuple(float(q) for q in np.quantile(np.asarray(v), [0.2, 0.4, 0.6, 0.8]))


def attribute(spec: dict[str, Any], name: str, rows: Sequence[dict[str, Any]]) -> Any:
    """A ``RatedAttribute`` (the rating provider's rule); cuts "quintiles" = the data's."""
    from tiller.learner.annotate.ratings import RatedAttribute

    cuts = spec["cuts"]
    if cuts == "quintiles":
        cuts = quintiles([r[spec["scorer"]] for r in rows])
    return RatedAttribute(
        name=name, scorer=spec["scorer"], cuts=cuts, higher_is_better=spec["higher_is_better"]
    )


def pairs_of(rows: Sequence[dict[str, Any]], attrs: Sequence[Any]) -> list[Any]:
    """CMPO pairs as ``data.cmpo.cmpo_pairs`` builds them from the log: per prompt, every
    sample pair in sample order, both directions, one pair per non-empty subset of the
    attributes the chosen sample is rated higher on; identical completions skipped."""
    from tiller.learner.data.cmpo import power_set_weights, preferred_on
    from tiller.learner.data.examples import PreferencePair

    names = [a.name for a in attrs]
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["prompt"], []).append(r)
    out = []
    for members in groups.values():
        rated = [(m, {a.name: a.rating(m[a.scorer]) for a in attrs}) for m in members]
        for (x, rx), (y, ry) in combinations(rated, 2):
            for (c, rc), (j, rj) in (((x, rx), (y, ry)), ((y, ry), (x, rx))):
                if c["text"] == j["text"]:
                    continue
                for w in power_set_weights(preferred_on(rc, rj, names), names):
                    out.append(
                        PreferencePair(
                            prompt=c["prompt"],
                            chosen=c["text"],
                            rejected=j["text"],
                            attribute_weights=w,
                            source=f"{c['sample']}>{j['sample']}",
                        )
                    )
    return out


def cmd_diagnose(out: Path) -> None:
    import numpy as np

    from tiller.learner.annotate.scorers import make_scorer

    rows = read(out, "train.jsonl")
    result: dict[str, Any] = {}
    halves = []
    for r in rows:
        w = r["text"].split()
        halves.append((" ".join(w[: len(w) // 2]), " ".join(w[len(w) // 2 :])))
    sent = np.array([r["sentiment"] for r in rows])
    for name, spec in (("critical", CRITICAL), ("flesch", FLESCH), ("easy", EASY)):
        s = make_scorer(spec["scorer"])
        a = np.array([s.score(h[0]) for h in halves])
        b = np.array([s.score(h[1]) for h in halves])
        v = np.array([r[spec["scorer"]] for r in rows])
        attr = attribute(spec, name, rows)
        rating = [attr.rating(x) for x in v]
        groups: dict[str, list[int]] = {}
        for r, g in zip(rows, rating, strict=True):
            groups.setdefault(r["prompt"], []).append(g)
        pairs = [x != y for g in groups.values() for x, y in combinations(g, 2)]
        # within-prompt share of the variance: what pairs of one prompt can differ on
        means = {p: np.mean([r[spec["scorer"]] for r in rows if r["prompt"] == p]) for p in groups}
        within = float(np.var(v - np.array([means[r["prompt"]] for r in rows])) / np.var(v))
        result[name] = {
            "scorer": spec["scorer"],
            "cuts": list(attr.cuts),
            "mean": float(v.mean()),
            "sd": float(v.std()),
            "split_half_r": float(np.corrcoef(a, b)[0, 1]),
            "within_prompt_var_share": within,
            "pairs_rated_apart": float(np.mean(pairs)),
            "rating_shares": [rating.count(k) / len(rating) for k in range(1, 6)],
            "r_with_sentiment": float(np.corrcoef(v, sent)[0, 1]),
        }
        d = result[name]
        print(
            f"diagnose {name:>8} ({spec['scorer']}): split-half r {d['split_half_r']:.2f}, "
            f"within-prompt var {within:.2f}, pairs apart {d['pairs_rated_apart']:.2f}, "
            f"r(sentiment) {d['r_with_sentiment']:+.2f}, cuts {[round(c, 3) for c in attr.cuts]}"
        )
    # Flesch = 206.835 - 1.015 * words/sentence - 84.6 * syllables/word: which term varies?
    import textstat

    wps = np.array([textstat.words_per_sentence(r["text"]) for r in rows])
    spw = np.array([textstat.avg_syllables_per_word(r["text"]) for r in rows])
    fl = np.array([r["readability"] for r in rows])
    result["flesch_terms"] = {
        "sd_sentence_term": float((1.015 * wps).std()),
        "sd_syllable_term": float((84.6 * spw).std()),
        "r_flesch_sentence_term": float(np.corrcoef(fl, -wps)[0, 1]),
        "r_flesch_syllable_term": float(np.corrcoef(fl, -spw)[0, 1]),
        "r_flesch_easy": float(np.corrcoef(fl, [r["simple_words"] for r in rows])[0, 1]),
        "ended_share": float(np.mean([r["text"].rstrip()[-1:] in ".!?" for r in rows])),
    }
    print(
        "diagnose flesch terms: "
        + json.dumps({k: round(v, 3) for k, v in result["flesch_terms"].items()})
    )
    (out / "diagnose.json").write_text(json.dumps(result, indent=1))


def cmd_train(out: Path, name: str, opts: dict[str, Any]) -> None:
    from tiller.learner.heads_trainer import HeadsTrainConfig, train_heads
    from tiller.learner.objectives.cmpo import CMPOConfig

    trunk()  # loads the model once, with this process's thread count
    rows = read(out, "train.jsonl")
    attrs = [attribute(CRITICAL, "critical", rows), attribute(opts["simple"], "simple", rows)]
    pairs = pairs_of(rows, attrs)
    subsets: dict[str, int] = {}
    for p in pairs:
        key = "+".join(a for a, w in p.attribute_weights if w > 0)
        subsets[key] = subsets.get(key, 0) + 1
    cfg = HeadsTrainConfig(
        attributes=ATTRIBUTES,
        base_model="SmolLM2-135M-Instruct",
        rank=opts.get("rank", 8),
        objective=CMPOConfig(beta=opts["beta"], label_smoothing=0.1),
        lr=opts.get("lr", 5e-3),
        epochs=opts["epochs"],
        batch_size=16,
        max_length=128,
        progress=False,
        # every sequence's base logits kept (~5 GiB here): the steps skip the h·W_0ᵀ matmul
        logits_cache_gib=8.0,
    )
    t0 = time.monotonic()
    res = train_heads(model_dir(), pairs, cfg, out / "heads" / name)
    loss = [h["loss"] for h in res.history]
    tail = loss[-max(1, len(loss) // 5) :]
    info = {
        "opts": {k: v for k, v in opts.items() if k != "simple"},
        "simple": {"scorer": attrs[1].scorer, "cuts": list(attrs[1].cuts)},
        "pairs": len(pairs),
        "subsets": subsets,
        "steps": res.steps,
        "loss_first": loss[0],
        "loss_last_fifth": sum(tail) / len(tail),
        "seconds": time.monotonic() - t0,
    }
    (out / "heads" / name / "train.json").write_text(json.dumps(info, indent=1))
    print(f"trained {name}: {json.dumps(info)}")


def load_heads(directory: Path) -> tuple[Any, Any]:
    import torch

    from tiller.server.formats.heads import load_tensors, read_heads

    manifest = read_heads(directory)
    assert [h.name for h in manifest.heads] == list(ATTRIBUTES), manifest.heads
    t = load_tensors(directory)
    a = torch.stack([t[f"{n}.A"].float() for n in ATTRIBUTES])
    b = torch.stack([t[f"{n}.B"].float() for n in ATTRIBUTES])
    return a, b


def cmd_eval(out: Path, names: Sequence[str]) -> None:
    prompts = lines("reviews-heldout.txt")
    path = out / "eval-texts.json"
    runs: dict[str, list[str]] = json.loads(path.read_text()) if path.exists() else {}
    todo = [("base", None, None)] + [(f"{n}|{lam:g}", n, lam) for n in names for lam in LAMBDAS]
    for key, name, lam in todo:
        if key in runs:
            continue
        t0 = time.monotonic()
        if name is None:
            runs[key] = generate(prompts, EVAL_SAMPLES, EVAL_SEED)
        else:
            heads = load_heads(out / "heads" / name)
            runs[key] = generate(prompts, EVAL_SAMPLES, EVAL_SEED, heads, (lam, 1.0 - lam))
        path.write_text(json.dumps(runs))
        print(f"eval {key}: {time.monotonic() - t0:.0f} s", file=sys.stderr)
    report(out, names, runs)


def cmd_implicit(out: Path, names: Sequence[str]) -> None:
    """What each head learned, apart from what sampling with it does: on the base model's
    held-out samples, the head's log-likelihood ratio log π_head(y) − log π_base(y) (one head
    alone, weight 1) against every score (Pearson r), and its mean (the drift off the base's
    own text)."""
    import numpy as np
    import torch

    from tiller.learner.batches import encode
    from tiller.learner.objectives.cmpo import mixed_logits
    from tiller.learner.trainer import TrainConfig

    tok, model = trunk()
    w0 = model.get_output_embeddings().weight.detach().float()
    texts = json.loads((out / "eval-texts.json").read_text())["base"]
    ctx = [p for p in lines("reviews-heldout.txt") for _ in range(EVAL_SAMPLES)]
    tc = TrainConfig(objective="cdpo", max_length=128, progress=False)  # the trainer's encoding
    seqs = []
    with torch.no_grad():
        for p, t in zip(ctx, texts, strict=True):
            pi, ci = encode(tok, p, t, tc)
            h = model.model(input_ids=torch.tensor([[*pi, *ci]])).last_hidden_state
            seqs.append((h[0, len(pi) - 1 : -1].float(), torch.tensor(ci)))

    def logp(heads: Any, lam: tuple[float, float]) -> Any:
        v = []
        with torch.no_grad():
            for h, c in seqs:
                w = torch.tensor([lam] * len(h))
                logits = h @ w0.T if heads is None else mixed_logits(h, w0, *heads, w)
                v.append(float(torch.log_softmax(logits, -1).gather(1, c[:, None]).sum()))
        return np.array(v)

    ref = logp(None, (1.0, 0.0))
    scores = score_all(texts)
    result: dict[str, Any] = {}
    for name in names:
        heads = load_heads(out / "heads" / name)
        for head, lam in (("critical", (1.0, 0.0)), ("simple", (0.0, 1.0))):
            d = logp(heads, lam) - ref
            r = {m: float(np.corrcoef(d, v)[0, 1]) for m, v in scores.items()}
            result[f"{name}|{head}"] = {"mean_dlogp": float(d.mean()), "r": r}
            print(
                f"implicit {name} {head} head: mean Δlog p {d.mean():+.1f} nats, r with "
                + ", ".join(f"{m} {x:+.2f}" for m, x in r.items())
            )
    (out / "implicit.json").write_text(json.dumps(result, indent=1))


def _mean_ci(v: Sequence[float]) -> dict[str, float]:
    from tiller.learner.stats import mean_halfwidth

    m, h = mean_halfwidth(list(v), 0.975)
    return {"mean": m, "ci95": h}


def _paired(x: Sequence[float], y: Sequence[float]) -> dict[str, float]:
    """``x − y`` paired by held-out review (one block per review, its samples averaged)."""
    from tiller.learner.stats import paired_test

    return paired_test(x, y, [p for p in lines("reviews-heldout.txt") for _ in range(EVAL_SAMPLES)])


def _monotone(means: Sequence[float], decreasing: bool) -> bool:
    steps = [b - a for a, b in pairwise(means)]
    return all(s <= 0 for s in steps) if decreasing else all(s >= 0 for s in steps)


def distinct2(texts: Sequence[str]) -> float:
    grams = [tuple(w[i : i + 2]) for t in texts for w in [t.split()] for i in range(len(w) - 1)]
    return len(set(grams)) / max(1, len(grams))


def fluency(out: Path, runs: dict[str, list[str]], keys: Sequence[str]) -> dict[str, Any]:
    """Perplexity under the base model and distinct-2 of each run in ``keys`` (cached)."""
    from tiller.learner.fluency import perplexity

    path = out / "fluency.json"
    done: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    ctx = [p for p in lines("reviews-heldout.txt") for _ in range(EVAL_SAMPLES)]
    for k in keys:
        if k not in done:
            ppl = perplexity(trunk(), list(zip(ctx, runs[k], strict=True)))
            done[k] = {"perplexity": ppl, "distinct2": distinct2(runs[k])}
            path.write_text(json.dumps(done, indent=1))
    return done


def report(out: Path, names: Sequence[str], runs: dict[str, list[str]]) -> None:
    scores = {k: score_all(v) for k, v in runs.items()}
    base = scores["base"]
    extremes = [f"{n}|{lam:g}" for n in names for lam in (LAMBDAS[0], LAMBDAS[-1])]
    flu = fluency(out, runs, ["base", *extremes])
    table: dict[str, Any] = {"base": {m: _mean_ci(base[m]) for m in SCORERS}, "fluency": flu}
    for name in names:
        info_path = out / "heads" / name / "train.json"
        info = json.loads(info_path.read_text()) if info_path.exists() else {}
        own = info.get("simple", {}).get("scorer", "readability")
        sweep = {f"{lam:g}": {m: _mean_ci(scores[f"{name}|{lam:g}"][m]) for m in SCORERS}
                 for lam in LAMBDAS}  # fmt: skip
        lo, hi = scores[f"{name}|{LAMBDAS[0]:g}"], scores[f"{name}|{LAMBDAS[-1]:g}"]
        row = {
            "train": info,
            "sweep": sweep,
            # λ = 0 is the simple head alone, λ = 1 the critical head alone
            "simple_head_vs_base": {m: _paired(lo[m], base[m]) for m in SCORERS},
            "critical_head_vs_base": {m: _paired(hi[m], base[m]) for m in SCORERS},
            "monotone": {
                "sentiment_falls": _monotone(
                    [sweep[f"{lam:g}"]["sentiment"]["mean"] for lam in LAMBDAS], True
                ),
                f"{own}_falls": _monotone(
                    [sweep[f"{lam:g}"][own]["mean"] for lam in LAMBDAS], True
                ),
            },
        }
        table[name] = row
        s, c = row["simple_head_vs_base"][own], row["critical_head_vs_base"]["sentiment"]
        fl = row["simple_head_vs_base"]["readability"]
        mono = row["monotone"]
        f0, f1 = flu[f"{name}|{LAMBDAS[0]:g}"], flu[f"{name}|{LAMBDAS[-1]:g}"]
        print(
            f"{name}: perplexity under base {flu['base']['perplexity']:.1f} (base), "
            f"{f0['perplexity']:.1f} (λ=0), {f1['perplexity']:.1f} (λ=1); distinct-2 "
            f"{flu['base']['distinct2']:.3f}, {f0['distinct2']:.3f}, {f1['distinct2']:.3f}"
        )
        print(
            f"CMPO simple head ({name}): {own} {s['mean']:+.3f} ± {s['ci95']:.3f} "
            f"(p = {s['p']:.2g}; Flesch {fl['mean']:+.1f}, p = {fl['p']:.2g}), "
            f"critical head: sentiment {c['mean']:+.3f} ± {c['ci95']:.3f} (p = {c['p']:.2g}); "
            f"monotone: sentiment {mono['sentiment_falls']}, {own} {mono[f'{own}_falls']}"
        )
    (out / "eval.json").write_text(json.dumps(table, indent=1))
    plot(out, names, table)


def plot(out: Path, names: Sequence[str], table: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SCORERS), figsize=(5 * len(SCORERS), 4.2))
    for ax, m in zip(axes, SCORERS, strict=True):
        b = table["base"][m]
        ax.axhline(b["mean"], color="gray", linestyle="--", label="base")
        ax.axhspan(b["mean"] - b["ci95"], b["mean"] + b["ci95"], color="gray", alpha=0.15)
        for k, name in enumerate(names):
            pts = [table[name]["sweep"][f"{lam:g}"][m] for lam in LAMBDAS]
            xs = [lam + (k - len(names) / 2) * 0.01 for lam in LAMBDAS]
            ax.errorbar(xs, [p["mean"] for p in pts], yerr=[p["ci95"] for p in pts],
                        marker="o", capsize=3, label=name)  # fmt: skip
        ax.set_xlabel("λ: weights {critical: λ, simple: 1−λ}")
        ax.set_ylabel(f"mean {m} (95% CI)")
        ax.legend(fontsize=7)
    fig.suptitle("CMPO heads on SmolLM2: held-out attribute-weight sweep per variant")
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("stage", choices=["data", "diagnose", "train", "eval", "implicit", "all"])
    ap.add_argument("--out", type=Path, default=HERE / "out" / "cmpo-experiments")
    ap.add_argument("--names", default=",".join(PLAN), help="variants (comma-separated)")
    ap.add_argument("--train-prompts", type=int, default=128)
    ap.add_argument("--per-prompt", type=int, default=4)
    a = ap.parse_args(argv)
    out = a.out.resolve()
    (out / "heads").mkdir(parents=True, exist_ok=True)
    names = [n for n in a.names.split(",") if n]
    t0 = time.monotonic()
    if a.stage in ("data", "all") and not (out / "train.jsonl").exists():
        cmd_data(out, a.train_prompts, a.per_prompt)
    if a.stage in ("diagnose", "all"):
        cmd_diagnose(out)
    if a.stage in ("train", "all"):
        for n in names:
            if not (out / "heads" / n / "train.json").exists():
                cmd_train(out, n, PLAN[n])
    if a.stage in ("eval", "all"):
        cmd_eval(out, names)
    if a.stage in ("implicit", "all"):
        cmd_implicit(out, names)
    print(f"done in {time.monotonic() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
