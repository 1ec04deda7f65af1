"""The typed values that flow from dataset builders into the trainer.

Texts are already rendered: ``prompt`` is exactly what the model is conditioned on (for ALT, the
feedback-prefixed prompt produced by the serving adapter's template), ``completion`` is the
continuation to score or learn. Tokenisation happens in the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SFTExample:
    """A conditional-SFT example (ALT): learn ``completion`` given ``prompt``."""

    prompt: str
    completion: str
    weight: float = 1.0
    source: str = ""  # provenance, e.g. "gen-..." or "jsonl:line 12"
    # What ALT's KL reference is conditioned on; None = ``prompt`` (the tagged prompt).
    reference_prompt: str | None = None
    # ALT's tag contrast: the same user prompt rendered with other tags than the label.
    contrast_prompts: tuple[str, ...] = ()


@dataclass(frozen=True)
class PreferencePair:
    """A preference between two completions of one prompt (DPO / IPO / SLiC / cDPO / CMPO).

    ``attribute_weights`` is CMPO's conditioning weight vector (attribute -> weight) for this
    pair, or empty for unconditioned objectives. ``label_confidence`` in [0.5, 1] is how sure
    the annotation is that ``chosen`` wins (1 = certain; cDPO uses it with label smoothing).
    ``chosen_id`` / ``rejected_id`` are the logged generations the two completions are (``""``
    for a text that was never logged, e.g. a rewrite); ``source`` is provenance for people.
    """

    prompt: str
    chosen: str
    rejected: str
    attribute_weights: tuple[tuple[str, float], ...] = ()
    label_confidence: float = 1.0
    source: str = ""
    chosen_id: str = ""
    rejected_id: str = ""
