"""An iteration's training data: built from the log (``DataConfig``), then frozen in its work
directory so that a restarted iteration trains on the same examples from the same served
version (and resumes from its checkpoint).

``kind='cdf'`` (``data.cdf``, ``docs/cdf.md``) does work beyond reading the log. Difficulty is
the perplexity of each prompt's logged answers (the served policy's samples) under the *base*
model: the paper routes by the base model, and the learner already holds that copy for the
gate's fluency check (``fluency.load_scoring_model`` shares it), whereas the served adapter would
need a second copy or patching the shared one. The easy route's rewrites are sampled from the
served version through the Tiller server at background priority, unlogged.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils

from tiller.client import AsyncClient
from tiller.server.formats.logstore import GenerationView, generations_by_id
from tiller.server.formats.manifest import load_manifest

from ..data.alt import AltConfig, ReplayWindow, build_alt
from ..data.cdf import CdfConfig, CdfFeedback, CdfPlan, answer_perplexities, read_feedback
from ..data.cdf import route_feedback as route_cdf
from ..data.cmpo import cmpo_pairs
from ..data.examples import PreferencePair, SFTExample
from ..data.jsonl import load_pairs, load_sft, save_pairs, save_sft
from ..data.pairs import feedback_pairs, judge_pairs, score_pairs
from ..fluency import Scorer, load_scoring_model
from ..shards import SINGLE, Cursor, total
from .config import LearnConfig
from .sampling import GenerationJob
from .served import Served, conditioning

Examples = Sequence[SFTExample] | Sequence[PreferencePair]


@dataclass(frozen=True)
class IterationData:
    """What an iteration trains on: its examples, the label seq they were built up to, the
    reasons rows were skipped (counts), and the version served when they were built."""

    examples: Examples
    cursor: Cursor  # per shard, the label seq the data was built up to
    skipped: Mapping[str, int]
    served: Served

    @property
    def annotation_seq(self) -> int:
        return total(self.cursor)


def on_policy(
    db: sqlite_utils.Database, pairs: Sequence[PreferencePair], adapter: str, version: int
) -> list[PreferencePair]:
    """The pairs whose two generations were both sampled from ``adapter@v{version}``."""
    gens = generations_by_id(db, (i for p in pairs for i in (p.chosen_id, p.rejected_id) if i))

    def fresh(i: str) -> bool:
        g = gens.get(i)
        return g is not None and g.adapter == adapter and g.adapter_version == version

    return [p for p in pairs if fresh(p.chosen_id) and fresh(p.rejected_id)]


def build(
    db: sqlite_utils.Database, cfg: LearnConfig, now: Served, skipped: Counter[str]
) -> Examples:
    """The dataset ``cfg.data`` describes, newest ``max_examples`` last; reasons rows were left
    out are counted into ``skipped``. Kind ``'cdf'`` blocks while it scores and rewrites (with
    its own short-lived client to ``cfg.server``): an event loop should use ``build_async``."""
    d = cfg.data
    if d.kind == "cdf":
        fb = _cdf_feedback(db, cfg, now, skipped)
        ppl = answer_perplexities(_scorer(cfg), fb.population) if fb.population else {}
        plan = route_cdf(fb, ppl, skipped)
        rewrites = _rewrite_blocking(cfg, now, plan) if plan.critiques else []
        pairs = plan.pairs(rewrites, _cdf_config(cfg), skipped)
        return pairs[-d.max_examples :] if d.max_examples else pairs
    if d.kind == "alt":
        cond = conditioning(cfg)
        assert cond is not None
        alt = AltConfig(
            conditioning=cond,
            provider=d.provider,
            window=ReplayWindow(last_versions=d.replay_versions),
            allow_truncated=d.allow_truncated,
            unknown_tags="skip",
            balance=d.balance,
            seed=cfg.train.seed,
            reference=d.reference,
            contrast_tags=d.contrast_tags,
        )
        examples = build_alt(db, alt, skipped=skipped)
        return examples[-d.max_examples :] if d.max_examples else examples
    if d.kind == "cmpo":
        pairs = cmpo_pairs(
            db,
            d.provider,
            d.attributes,
            max_subset_size=d.max_subset_size,
            allow_truncated=d.allow_truncated,
            skipped=skipped,
        )
    elif d.source == "judge":
        pairs = judge_pairs(
            db,
            d.provider,
            allow_truncated=d.allow_truncated,
            skipped=skipped,
            tie_margin=d.judge_tie_margin,
        )
    elif d.source == "score":
        pairs = score_pairs(
            db,
            d.provider,
            higher_is_better=d.higher_is_better,
            min_margin=d.min_margin,
            pairing=d.pairing,
            allow_truncated=d.allow_truncated,
            skipped=skipped,
        )
    else:
        pairs = feedback_pairs(db, allow_truncated=d.allow_truncated, skipped=skipped)
    if d.on_policy and (d.kind == "cmpo" or d.source != "feedback"):
        name = cfg.adapter if now.version is not None else ""
        kept = on_policy(db, pairs, name, now.version or 0)
        skipped["off_policy"] += len(pairs) - len(kept)
        pairs = kept
    return pairs[-d.max_examples :] if d.max_examples else pairs


async def build_async(
    db: sqlite_utils.Database,
    cfg: LearnConfig,
    now: Served,
    skipped: Counter[str],
    *,
    client: AsyncClient,
    scorer: Callable[[], Scorer],
) -> Examples:
    """``build`` for a caller on an event loop: kind ``'cdf'`` scores in a worker thread with
    ``scorer()`` (the learner's base-model copy) and rewrites through ``client``; ``db`` is
    read on the caller's thread only. Other kinds are ``build``."""
    d = cfg.data
    if d.kind != "cdf":
        return build(db, cfg, now, skipped)
    fb = _cdf_feedback(db, cfg, now, skipped)
    ppl = {}
    if fb.population:
        ppl = await asyncio.to_thread(lambda: answer_perplexities(scorer(), fb.population))
    plan = route_cdf(fb, ppl, skipped)
    rewrites = await rewrite_all(client, cfg, now, plan)
    pairs = plan.pairs(rewrites, _cdf_config(cfg), skipped)
    return pairs[-d.max_examples :] if d.max_examples else pairs


# ------------------------------------------------------------------------------------ CDF


def _cdf_config(cfg: LearnConfig) -> CdfConfig:
    d = cfg.data
    return CdfConfig(
        critique_provider=d.critique_provider,
        refinement_provider=d.refinement_provider,
        preference_provider=d.preference_provider,
        allow_truncated=d.allow_truncated,
    )


def _cdf_feedback(
    db: sqlite_utils.Database, cfg: LearnConfig, now: Served, skipped: Counter[str]
) -> CdfFeedback:
    """The providers' feedback; with ``on_policy``, of the served version's generations only."""
    name, version = (cfg.adapter, now.version) if now.version is not None else ("", 0)

    def served_by(g: GenerationView) -> bool:
        return g.adapter == name and g.adapter_version == version

    keep = served_by if cfg.data.on_policy else None
    return read_feedback(db, _cdf_config(cfg), keep=keep, skipped=skipped)


def _scorer(cfg: LearnConfig) -> Scorer:
    t = cfg.train  # the keys the learner's gate loads with: one shared copy
    return load_scoring_model(cfg.model, device=t.device, precision=t.precision)


_FIELD = re.compile(r"\{(prompt|answer|critique)\}")
# A chat's rewrite: its turns, the answer, then this user turn.
CHAT_REWRITE = "Feedback on your answer: {critique}\nRewrite your answer to follow the feedback."


def rewrite_request(cfg: LearnConfig, g: GenerationView, critique: str) -> Any:
    """What the policy is asked to rewrite ``g`` given ``critique``: ``data.rewrite_template``
    filled in one pass (text a field brings in is not searched again), or for a chat its turns,
    the answer and a user turn with the critique (``tiller.client`` prompt forms)."""
    fields = {"prompt": g.prompt, "answer": g.output_text, "critique": critique}
    if not g.prompt and g.chat_json:
        turns = [{"role": t["role"], "content": t["content"]} for t in json.loads(g.chat_json)]
        ask = CHAT_REWRITE.replace("{critique}", critique)
        return [
            *turns,
            {"role": "assistant", "content": g.output_text},
            {"role": "user", "content": ask},
        ]
    return _FIELD.sub(lambda m: fields[m.group(1)], cfg.data.rewrite_template)


async def rewrite_all(
    client: AsyncClient, cfg: LearnConfig, now: Served, plan: CdfPlan
) -> list[str]:
    """The served version's rewrite of each of ``plan.critiques``, in order: one unlogged sample
    each at background priority, ``sample.concurrency`` (else 16) at a time. Server errors
    propagate (the iteration fails and is retried)."""
    d = cfg.data
    settings = GenerationJob(
        prompt="",
        n=1,
        max_tokens=d.rewrite_max_tokens,
        temperature=d.rewrite_temperature,
        top_p=1.0,
        repetition_penalty=d.rewrite_repetition_penalty,
        adapter=cfg.adapter if now.version is not None else "",
        adapter_version=now.version,
        log=False,  # a rewrite is training data, not a generation of the policy to label
    ).request_kwargs()
    sem = asyncio.Semaphore(cfg.sample.concurrency if cfg.sample else 16)

    async def one(g: GenerationView, critique: str) -> str:
        async with sem:
            out = await client.generate(rewrite_request(cfg, g, critique), **settings)
        return out.completions[0].text if out.completions else ""

    return list(await asyncio.gather(*(one(g, c) for g, c in plan.critiques)))


def _rewrite_blocking(cfg: LearnConfig, now: Served, plan: CdfPlan) -> list[str]:
    """``rewrite_all`` from synchronous code (maybe on a running loop's thread): a private
    event loop and client on a worker thread."""

    async def run() -> list[str]:
        client = AsyncClient(cfg.server, token=cfg.token, timeout=300.0)
        try:
            return await rewrite_all(client, cfg, now, plan)
        finally:
            await client.close()

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, run()).result()


def freeze(work: Path, data: IterationData) -> None:
    """Write ``data`` under ``work``; ``frozen.json`` appears last (the completeness marker)."""
    work.mkdir(parents=True, exist_ok=True)
    pairs = bool(data.examples) and isinstance(data.examples[0], PreferencePair)
    if pairs:
        save_pairs(work / "data.jsonl", data.examples)  # type: ignore[arg-type]
    else:
        save_sft(work / "data.jsonl", data.examples)  # type: ignore[arg-type]
    now = data.served
    meta = {
        "kind": "pairs" if pairs else "sft",
        "annotation_seq": data.annotation_seq,
        "shard_cursors": data.cursor,
        "skipped": dict(data.skipped),
        "served_version": now.version,
        "served_path": str(now.path) if now.path else None,
    }
    tmp = work / "frozen.json.tmp"
    tmp.write_text(json.dumps(meta))
    tmp.replace(work / "frozen.json")  # the marker: data.jsonl is complete once this exists


def load_frozen(work: Path) -> IterationData | None:
    """The data ``freeze`` wrote under ``work``, or None when it did not finish."""
    marker = work / "frozen.json"
    if not marker.exists():
        return None
    meta = json.loads(marker.read_text())
    examples: Examples = (
        load_pairs(work / "data.jsonl")
        if meta["kind"] == "pairs"
        else load_sft(work / "data.jsonl")
    )
    path = Path(meta["served_path"]) if meta["served_path"] else None
    now = Served(meta["served_version"], path, load_manifest(path) if path else None)
    cursor = meta.get("shard_cursors") or {SINGLE: int(meta["annotation_seq"])}
    return IterationData(examples, cursor, dict(meta["skipped"]), now)
