"""Fluency under the base model: the perplexity of generated text given its prompt.

A policy that hacks its reward drifts into text the base model finds unlikely (glued tokens,
made-up words) or into repeats it finds too likely; both move this away from the base's own
value. Used by the learner's eval gate and by the held-out evaluation of ``tiller align``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

Scorer = tuple[Any, Any]  # (tokenizer, causal LM)


def load_scoring_model(model_dir: Path) -> Scorer:
    """(tokenizer, model) of the base model for ``perplexity``; load once per evaluation."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return tok, AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def perplexity(scorer: Scorer, pairs: list[tuple[str, str]]) -> float:
    """exp(mean NLL per token) of the completions given their prompts under the base model."""
    import torch

    tok, model = scorer
    nll, count = 0.0, 0
    with torch.inference_mode():
        for prompt, text in pairs:
            p = tok(prompt, return_tensors="pt").input_ids
            c = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
            if c.shape[1] == 0:
                continue
            ids = torch.cat([p, c], dim=1)
            logits = model(ids).logits[0, p.shape[1] - 1 : -1]
            nll += float(torch.nn.functional.cross_entropy(logits, c[0], reduction="sum"))
            count += c.shape[1]
    return math.exp(nll / count) if count else math.nan
