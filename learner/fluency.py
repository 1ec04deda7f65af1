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


def perplexity(scorer: Scorer, pairs: list[tuple[str, str]], batch_size: int = 16) -> float:
    """exp(mean NLL per token) of the completions given their prompts under the base model.

    Sequences run ``batch_size`` at a time, right-padded (a causal model's logits at real
    positions do not see the padding), since a forward per sequence is far slower.
    """
    import torch

    tok, model = scorer
    seqs: list[tuple[list[int], int]] = []  # (prompt + completion ids, prompt length)
    for prompt, text in pairs:
        p = tok(prompt).input_ids
        c = tok(text, add_special_tokens=False).input_ids
        if c:
            seqs.append((p + c, len(p)))
    nll, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(seqs), batch_size):
            chunk = seqs[start : start + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
            attn = torch.zeros_like(ids)
            target = torch.full_like(ids, -100)  # cross_entropy's ignore_index
            for row, (seq, plen) in enumerate(chunk):
                ids[row, : len(seq)] = torch.tensor(seq)
                attn[row, : len(seq)] = 1
                target[row, plen : len(seq)] = torch.tensor(seq[plen:])
            logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
            labels = target[:, 1:]
            nll += float(
                torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]).float(),
                    labels.reshape(-1),
                    reduction="sum",
                )
            )
            count += int((labels != -100).sum())
    return math.exp(nll / count) if count else math.nan
