"""ALT datapool: (feedback, prompt, generation) triples from the log, as conditional-SFT examples.

Each logged generation labelled with a feedback tag becomes ``SFTExample(prompt, completion)``
where ``prompt`` is the *user's* prompt re-rendered with the tag through the trained adapter's
``Conditioning`` (``formats.prompt.render_text`` / ``render_chat``: the same bytes the server
produces when a client asks for that tag) and ``completion`` is the generation's text. The
prompt the generation was sampled with (its exemplar feedback) is not used: ALT learns
p(y | x, f) for the feedback f the generation *received*.

Labels come from one annotation provider (its error-free ``tag`` rows) or, with
``provider=None``, from app feedback rows with a ``tag`` (the latest such row per generation;
rows that also name a preference pair are not tag feedback).

Selection, in this order:

1. ``adapters``: only generations served by these adapter names (``""`` = the base model).
2. ``window``: the replay window over past iterations (``ReplayWindow``).
3. Rejection of unfinished generations: ``finish_reason='length'`` (truncated) is skipped
   unless ``allow_truncated``; anything other than ``stop`` / ``length`` (aborted) always is.
4. A tag outside ``conditioning.tags`` raises ``ValueError`` (``unknown_tags='error'``) or is
   skipped (``'skip'``).
5. ``balance``: ``'downsample'`` keeps, of each tag, a seeded random sample as large as the
   rarest tag's count (log order is kept); ``'weight'`` keeps all and sets
   ``weight = total / (tags * count(tag))`` so every tag carries the same total weight;
   ``'none'`` keeps all with weight 1.

Each example may also carry, for the trainer: ``reference_prompt`` (``reference='untagged'``:
the user's prompt without any tag, for ALT's KL reference p_0(y | x) as the paper writes it) and
``contrast_prompts`` (``contrast_tags=K``: the prompt rendered with K other tags of the
vocabulary, a seeded choice per example, for the tag-contrast term of ``objectives.alt``).

Examples come in log order; ``source`` is the generation id. Chat generations need
``chat_template`` (turns -> text, e.g. the tokenizer's ``apply_chat_template`` with
``add_generation_prompt=True``); without one they raise ``ValueError``.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import sqlite_utils

from tiller.server.formats.logstore import (
    GenerationFilter,
    feedback_tags,
    provider_tags,
    window_summary,
)
from tiller.server.formats.manifest import Conditioning
from tiller.server.formats.prompt import ChatTurn, render_chat, render_text

from ..annotate.base import GenerationView
from .examples import SFTExample
from .pairs import count_skip

Balance = Literal["none", "downsample", "weight"]
ChatTemplate = Callable[[Sequence[dict[str, str]]], str]


@dataclass(frozen=True)
class ReplayWindow:
    """Which past iterations feed the datapool (None = no limit).

    ``last_versions``: only generations whose ``adapter_version`` is among the K highest seen
    (after the ``adapters`` filter; base-model generations are version 0).
    ``last_generations``: of those, only the N with the highest ``seq``.
    """

    last_versions: int | None = None
    last_generations: int | None = None

    def __post_init__(self) -> None:
        for name in ("last_versions", "last_generations"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"ReplayWindow.{name} must be >= 1 or None, got {v}")


@dataclass(frozen=True, kw_only=True)
class AltConfig:
    """What ``build_alt`` selects; see the module docstring for the order of the steps."""

    conditioning: Conditioning
    provider: str | None  # annotation provider of the tags; None = app feedback tags
    adapters: tuple[str, ...] | None = None
    window: ReplayWindow = field(default_factory=ReplayWindow)
    allow_truncated: bool = False
    unknown_tags: Literal["error", "skip"] = "error"
    balance: Balance = "none"
    seed: int = 0
    reference: Literal["tagged", "untagged"] = "tagged"
    contrast_tags: int = 0

    def __post_init__(self) -> None:
        if self.reference not in ("tagged", "untagged"):
            raise ValueError(f"reference {self.reference!r} is not one of: tagged, untagged")
        others = len(self.conditioning.tags) - 1
        if not 0 <= self.contrast_tags <= others:
            raise ValueError(
                f"contrast_tags must be in [0, {others}] (the other tags of the vocabulary), "
                f"got {self.contrast_tags}"
            )
        if self.balance not in ("none", "downsample", "weight"):
            raise ValueError(f"balance {self.balance!r} is not one of: none, downsample, weight")
        if self.unknown_tags not in ("error", "skip"):
            raise ValueError(f"unknown_tags {self.unknown_tags!r} is not one of: error, skip")


def _filter(cfg: AltConfig) -> GenerationFilter:
    """The log slice ``cfg`` selects: its adapter filter and replay window."""
    return GenerationFilter(
        adapters=cfg.adapters,
        last_versions=cfg.window.last_versions,
        last_generations=cfg.window.last_generations,
    )


def data_window(db: sqlite_utils.Database, cfg: AltConfig) -> dict[str, object]:
    """What ``cfg`` selects from the log now, for a manifest's ``data_window``: the seq range
    and adapter versions of the selected generations (labelled or not) and the window itself."""
    w = window_summary(db, _filter(cfg))
    return {
        "first_seq": w.first_seq,
        "last_seq": w.last_seq,
        "generations": w.count,
        "adapter_versions": [f"{a or 'base'}@v{v}" for a, v in w.adapter_versions],
        "provider": cfg.provider or "app-feedback",
        "last_versions": cfg.window.last_versions,
        "last_generations": cfg.window.last_generations,
    }


def labelled_generations(
    db: sqlite_utils.Database, cfg: AltConfig
) -> list[tuple[GenerationView, str]]:
    """``(generation, tag)`` for every selected generation with a label, in log order."""
    if cfg.provider is not None:
        return provider_tags(db, _filter(cfg), cfg.provider)
    return feedback_tags(db, _filter(cfg))


def render_prompt(
    g: GenerationView, tag: str, cond: Conditioning, chat_template: ChatTemplate | None
) -> str:
    """The user's prompt of ``g`` conditioned on ``tag`` exactly as the server would render it."""
    if not g.chat_json:
        return render_text(g.prompt, tag, cond)
    turns = tuple(ChatTurn(t["role"], t["content"]) for t in json.loads(g.chat_json))
    rendered = render_chat(turns, tag, cond)
    return _apply(g, [{"role": t.role, "content": t.content} for t in rendered], chat_template)


def build_alt(
    db: sqlite_utils.Database,
    cfg: AltConfig,
    *,
    chat_template: ChatTemplate | None = None,
    skipped: Counter[str] | None = None,
) -> list[SFTExample]:
    """The ALT datapool under ``cfg`` (module docstring). Skip reasons (``truncated``,
    ``unfinished``, ``unknown_tag``, ``balance``) are counted into ``skipped`` if given.

    Raises ``ValueError`` for a tag outside the conditioning's vocabulary (unless
    ``unknown_tags='skip'``) and for a chat generation without ``chat_template``.
    """
    cond = cfg.conditioning
    kept: list[tuple[GenerationView, str]] = []
    for g, tag in labelled_generations(db, cfg):
        if g.finish_reason == "length" and not cfg.allow_truncated:
            count_skip(skipped, "truncated")
        elif g.finish_reason not in ("stop", "length"):
            count_skip(skipped, "unfinished")
        elif tag not in cond.tags:
            if cfg.unknown_tags == "error":
                raise ValueError(
                    f"generation {g.id} has tag {tag!r}, not in the adapter's feedback "
                    f"vocabulary: {', '.join(cond.tags)}"
                )
            count_skip(skipped, "unknown_tag")
        else:
            kept.append((g, tag))
    kept, weights = _balance(kept, cfg, skipped)
    rng = random.Random(cfg.seed)
    out = []
    for g, tag in kept:
        others = rng.sample([t for t in cond.tags if t != tag], cfg.contrast_tags)
        out.append(
            SFTExample(
                prompt=render_prompt(g, tag, cond, chat_template),
                completion=g.output_text,
                weight=weights[tag],
                source=g.id,
                reference_prompt=(
                    untagged_prompt(g, chat_template) if cfg.reference == "untagged" else None
                ),
                contrast_prompts=tuple(render_prompt(g, t, cond, chat_template) for t in others),
            )
        )
    return out


def untagged_prompt(g: GenerationView, chat_template: ChatTemplate | None) -> str:
    """The user's prompt of ``g`` as the base model sees it without any feedback."""
    if not g.chat_json:
        return g.prompt
    return _apply(g, json.loads(g.chat_json), chat_template)


def _apply(
    g: GenerationView, turns: Sequence[dict[str, str]], chat_template: ChatTemplate | None
) -> str:
    if chat_template is None:
        raise ValueError(f"generation {g.id} is a chat; build_alt needs chat_template for chats")
    return chat_template(turns)


def _balance(
    kept: list[tuple[GenerationView, str]], cfg: AltConfig, skipped: Counter[str] | None
) -> tuple[list[tuple[GenerationView, str]], dict[str, float]]:
    """The examples to keep (order preserved) and each tag's weight, per ``cfg.balance``."""
    counts = Counter(tag for _, tag in kept)
    if cfg.balance == "weight":
        total = sum(counts.values())
        return kept, {t: total / (len(counts) * n) for t, n in counts.items()}
    if cfg.balance == "downsample" and counts:
        floor = min(counts.values())
        rng = random.Random(cfg.seed)
        keep: set[int] = set()
        for tag in sorted(counts):
            keep.update(rng.sample([i for i, (_, t) in enumerate(kept) if t == tag], floor))
        count_skip(skipped, "balance", len(kept) - len(keep))
        kept = [x for i, x in enumerate(kept) if i in keep]
    return kept, dict.fromkeys(counts, 1.0)
