"""CDF: route prompts by difficulty to critique, refinement or preference feedback -> pairs.

Paper (CDF, §3.2-3.4): the base model answers each problem q greedily; the perplexity of its own
answer a measures difficulty. Problems sorted by ascending perplexity are split evenly into
easy / medium / hard thirds. Easy problems get a critique s and the base model rewrites a into
``a_c`` given (q, a, s): pair ``(a_c, a)``. Medium problems get a refined answer ``a_r``: pair
``(a_r, a)``. Hard problems get a preference between two answers: pair ``(winner, loser)``.

Here, in the log's terms:

- The population is every distinct *user* prompt (``GenerationView.user_prompt``: the prompt,
  or a chat's last user turn) of a generation carrying an error-free annotation from one of the
  three configured providers. ``perplexity(prompt)`` (caller-supplied, e.g. from
  ``greedy_perplexity``) is called once per prompt, in sorted order, and must be finite.
  In the learner's loop it is ``answer_perplexities``: the base model's perplexity of the
  prompt's logged answers (the policy's samples) instead of a fresh greedy answer.
- Thirds are mid-rank terciles (``learner.annotate.quantile.band`` with k=3): n distinct
  perplexities split as evenly as possible, symmetric around the middle (7 -> 2/3/2), and
  prompts with equal perplexity always share a route.
- easy: each generation of the prompt with a ``critique`` annotation from
  ``critique_provider`` -> ``rewrite(user_prompt, output_text, critique)`` -> pair
  (rewrite, output). medium: each ``refinement`` annotation from ``refinement_provider`` ->
  pair (refinement, output). hard: ``preference_provider``'s pairwise verdicts, as
  ``pairs.judge_pairs`` reads them (ties dropped, ``label_confidence`` from ``p_a``).
  Feedback outside a prompt's route is ignored, as in the paper.
- The "original answer" is each logged generation (the paper: the base model's greedy answer).
  A rewrite or refinement that is empty or equal to the original is skipped.

In stages (``cdf_pairs`` runs them in turn): ``read_feedback`` reads the log,
``route_feedback`` splits it by perplexity into a ``CdfPlan``, and ``CdfPlan.pairs`` takes the
easy route's rewrites, which a caller may produce concurrently (the learner: through the server).

Pairs come easy, then medium, then hard, each in log order, with ``source`` =
``cdf:easy:critique:<gen id>``, ``cdf:medium:refinement:<gen id>`` or
``cdf:hard:<provider>:<chosen id>><rejected id>``; prompts are ``rendered_prompt``. Pairs carry
``chosen_id`` / ``rejected_id`` (``chosen_id`` is empty for a rewrite or refinement).

The paper writes PPL as ``exp(+mean log p)`` (the inverse of perplexity); ``greedy_perplexity``
returns the usual ``exp(-mean log p)``, for which "ascending = easiest first" holds.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import sqlite_utils

from tiller.server.formats.logstore import GenerationView, annotation_values, generations_by_id

from .. import fluency
from ..annotate.quantile import band
from .examples import PreferencePair
from .pairs import count_skip, judge_rows, keep, pair_from_verdict

Route = Literal["easy", "medium", "hard"]
ROUTES: tuple[Route, ...] = ("easy", "medium", "hard")
Rewrite = Callable[[str, str, str], str]  # (user prompt, answer, critique) -> improved answer


@dataclass(frozen=True, kw_only=True)
class CdfConfig:
    """The annotation providers feeding each route."""

    critique_provider: str
    refinement_provider: str
    preference_provider: str
    allow_truncated: bool = True


def terciles(perplexities: Mapping[str, float]) -> dict[str, Route]:
    """Each prompt's route by the mid-rank tercile of its perplexity (lowest = easy).

    Raises ``ValueError`` naming a prompt whose perplexity is not finite."""
    for prompt, ppl in perplexities.items():
        if not math.isfinite(ppl):
            raise ValueError(f"perplexity of prompt {prompt[:60]!r} is {ppl}; need a finite value")
    ref = sorted(perplexities.values())
    return {p: ROUTES[band(v, ref, 3)] for p, v in perplexities.items()}


def _texts(
    db: sqlite_utils.Database, provider: str, kind: str, skipped: Counter[str] | None
) -> dict[str, str]:
    """generation id -> non-blank text of ``provider``'s ``kind`` annotations: critiques
    stripped, refinements verbatim (a continuation's leading space is part of the answer)."""
    out = {}
    for gid, _, value in annotation_values(db, provider, kind):
        if isinstance(value, str) and value.strip():
            out[gid] = value.strip() if kind == "critique" else value
        else:
            count_skip(skipped, "malformed")
    return out


Verdict = tuple[GenerationView | None, GenerationView | None, Any]


@dataclass(frozen=True)
class CdfFeedback:
    """The three providers' feedback read from the log, before routing: (original generation,
    text) per critique and refinement, in log order, and the pairwise verdict rows."""

    critiques: tuple[tuple[GenerationView, str], ...]
    refinements: tuple[tuple[GenerationView, str], ...]
    verdicts: tuple[Verdict, ...]

    @property
    def population(self) -> dict[str, list[GenerationView]]:
        """Each distinct user prompt (sorted) -> its distinct generations carrying feedback."""
        gens: dict[str, GenerationView] = {}
        for g, _ in (*self.critiques, *self.refinements):
            gens[g.id] = g
        for a, b, _ in self.verdicts:
            gens.update({g.id: g for g in (a, b) if g is not None})
        out: dict[str, list[GenerationView]] = {}
        for g in sorted(gens.values(), key=lambda g: g.seq):
            out.setdefault(g.user_prompt, []).append(g)
        return dict(sorted(out.items()))


def read_feedback(
    db: sqlite_utils.Database,
    cfg: CdfConfig,
    *,
    keep: Callable[[GenerationView], bool] | None = None,
    skipped: Counter[str] | None = None,
) -> CdfFeedback:
    """The providers' feedback of generations ``keep`` accepts (all by default; each item
    dropped is counted as ``off_policy``, a verdict when either side is dropped)."""
    critiques = _texts(db, cfg.critique_provider, "critique", skipped)
    refinements = _texts(db, cfg.refinement_provider, "refinement", skipped)
    verdicts = judge_rows(db, cfg.preference_provider)
    gens = generations_by_id(db, [*critiques, *refinements])
    count_skip(skipped, "missing_generation", len({*critiques, *refinements}) - len(gens))
    ok = keep or (lambda g: True)

    def items(texts: dict[str, str]) -> tuple[tuple[GenerationView, str], ...]:
        found = [(gens[i], t) for i, t in texts.items() if i in gens]
        kept = tuple((g, t) for g, t in found if ok(g))
        count_skip(skipped, "off_policy", len(found) - len(kept))
        return kept

    rows = [(a, b, v) for a, b, v in verdicts if all(ok(g) for g in (a, b) if g is not None)]
    count_skip(skipped, "off_policy", len(verdicts) - len(rows))
    return CdfFeedback(items(critiques), items(refinements), tuple(rows))


@dataclass(frozen=True)
class CdfPlan:
    """Feedback routed by difficulty. What is left to do is the easy route's rewrites: one per
    ``critiques`` item, then ``pairs``."""

    route: Mapping[str, Route]  # user prompt -> route
    critiques: tuple[tuple[GenerationView, str], ...]  # easy: (original, critique), by seq
    refinements: tuple[tuple[GenerationView, str], ...]  # medium: (original, refined), by seq
    verdicts: tuple[Verdict, ...]  # hard, in log order

    def pairs(
        self,
        rewrites: Sequence[str],
        cfg: CdfConfig,
        skipped: Counter[str] | None = None,
    ) -> list[PreferencePair]:
        """The pairs (module docstring); ``rewrites[i]`` is the rewrite of ``critiques[i]``."""
        if len(rewrites) != len(self.critiques):
            raise ValueError(f"{len(rewrites)} rewrites for {len(self.critiques)} critiques")
        easy = [(g, r) for (g, _), r in zip(self.critiques, rewrites, strict=True)]
        out: list[PreferencePair] = []
        for name, kind, items in (
            ("easy", "critique", easy),
            ("medium", "refinement", self.refinements),
        ):
            for g, better in items:
                if not better.strip() or better == g.output_text:
                    count_skip(skipped, f"{kind}_unchanged")
                    continue
                if not cfg.allow_truncated and g.finish_reason == "length":
                    count_skip(skipped, "truncated")
                    continue
                out.append(
                    PreferencePair(
                        prompt=g.rendered_prompt,
                        chosen=better,
                        rejected=g.output_text,
                        source=f"cdf:{name}:{kind}:{g.id}",
                        rejected_id=g.id,  # the chosen text was written, never logged
                    )
                )
        for a, b, value in self.verdicts:
            p = pair_from_verdict(
                a,
                b,
                value,
                source_prefix=f"cdf:hard:{cfg.preference_provider}",
                allow_truncated=cfg.allow_truncated,
            )
            keep(out, p, skipped)
        return out


def route_feedback(
    fb: CdfFeedback, perplexities: Mapping[str, float], skipped: Counter[str] | None = None
) -> CdfPlan:
    """Route ``fb`` by the terciles of ``perplexities`` (user prompt -> perplexity). Feedback
    of a prompt missing from ``perplexities`` is dropped (counted as ``no_perplexity``) and the
    terciles are taken over the others; a non-finite value raises ``ValueError``."""
    route = terciles(perplexities)

    def routed(items: Iterable[tuple[GenerationView, str]], want: Route) -> tuple[Any, ...]:
        out = []
        for g, text in items:
            r = route.get(g.user_prompt)
            if r is None:
                count_skip(skipped, "no_perplexity")
            elif r == want:
                out.append((g, text))
        return tuple(sorted(out, key=lambda x: x[0].seq))

    hard = []
    for a, b, value in fb.verdicts:
        if a is not None:
            r = route.get(a.user_prompt)
            if r is None:
                count_skip(skipped, "no_perplexity")
            if r != "hard":
                continue
        hard.append((a, b, value))
    return CdfPlan(
        route, routed(fb.critiques, "easy"), routed(fb.refinements, "medium"), tuple(hard)
    )


def cdf_pairs(
    db: sqlite_utils.Database,
    cfg: CdfConfig,
    *,
    perplexity: Callable[[str], float],
    rewrite: Rewrite,
    skipped: Counter[str] | None = None,
) -> list[PreferencePair]:
    """CDF pairs from the log (module docstring). ``rewrite`` is called once per easy-route
    critique; its exceptions propagate. Raises ``ValueError`` for a non-finite perplexity."""
    fb = read_feedback(db, cfg, skipped=skipped)
    plan = route_feedback(fb, {p: float(perplexity(p)) for p in fb.population}, skipped)
    rewrites = [rewrite(g.user_prompt, g.output_text, c) for g, c in plan.critiques]
    return plan.pairs(rewrites, cfg, skipped)


def answer_perplexities(
    scorer: fluency.Scorer, population: Mapping[str, Sequence[GenerationView]], batch_size: int = 16
) -> dict[str, float]:
    """Per user prompt, the perplexity of its logged answers given their rendered prompts under
    ``scorer``'s model (``fluency.perplexity``: all tokens of the prompt's answers pooled).
    Prompts whose answers have no tokens are left out."""
    out = {}
    for prompt, gens in population.items():
        value = fluency.perplexity(
            scorer, [(g.rendered_prompt, g.output_text) for g in gens], batch_size
        )
        if math.isfinite(value):
            out[prompt] = value
    return out


def greedy_perplexity(
    model_dir: Path | str,
    prompts: Iterable[str],
    *,
    max_new_tokens: int = 64,
    device: str = "cpu",
) -> dict[str, float]:
    """The base model's perplexity of its own greedy answer, per distinct prompt.

    For each prompt (tokenised as given: render chat templates first), the model at
    ``model_dir`` (transformers format) answers greedily with up to ``max_new_tokens`` tokens
    (EOS included when generated), and the result is ``exp(-mean log p(a_i | a_<i, q))`` over
    the answer tokens, from one teacher-forced forward pass. One prompt at a time, no batching.
    Imports torch and transformers on call. Raises ``ValueError`` for a prompt that tokenises
    to nothing or for ``max_new_tokens < 1``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).to(device).eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out: dict[str, float] = {}
    for prompt in dict.fromkeys(prompts):
        ids = tok(prompt, return_tensors="pt").input_ids.to(device)
        n = ids.shape[1]
        if n == 0:
            raise ValueError(f"prompt {prompt[:60]!r} tokenises to no tokens")
        with torch.no_grad():
            seq = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                num_beams=1,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad,
            )
            logits = model(seq).logits[0, n - 1 : -1].float()
            nll = torch.nn.functional.cross_entropy(logits, seq[0, n:])
        out[prompt] = math.exp(float(nll))
    return out
