"""Training examples as token ids, padded batches of them, and the order a run visits them in.

Sequence layout (one batch): ``[left pad][prompt][completion][right pad]``. Prompts are left-
padded to a common width P, so every completion starts at column P and the logits at columns
P-1 .. P+T-2 predict its T tokens; position ids skip the padding. A sequence longer than
``max_length`` loses tokens from the left of its prompt (the completion is cut on the right only
if it alone exceeds ``max_length - 1``).

Data order: epoch e is a permutation drawn from its own generator seeded by (seed, e), so a
resumed run visits the same examples at the same steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .data.examples import PreferencePair, SFTExample

if TYPE_CHECKING:
    from .trainer import TrainConfig

Seq = tuple[tuple[int, ...], tuple[int, ...]]  # (prompt ids, completion ids)


@dataclass(frozen=True)
class Item:
    """One training example, tokenised."""

    seqs: tuple[Seq, ...]  # 1 for SFT/ALT, 2 (chosen, rejected) for pairs
    weight: float = 1.0
    confidence: float = 1.0
    ref_seq: Seq | None = None  # the reference's (prompt, completion) when its prompt differs
    contrast_seqs: tuple[Seq, ...] = ()  # the completion under ALT's contrast prompts


@dataclass(frozen=True)
class Batch:
    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    labels: Tensor  # [B, T] completion tokens, right-padded
    label_mask: Tensor  # [B, T]

    def to(self, device: torch.device) -> Batch:
        return Batch(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def encode(tok: Any, prompt: str, completion: str, cfg: TrainConfig) -> Seq:
    """Token ids of ``prompt`` and ``completion`` (+ EOS), at most ``max_length`` together.

    Tokenised separately, as the server generates completion tokens after prompt tokens. The
    prompt gets the tokenizer's special tokens (BOS) unless it already starts with BOS text.
    """
    bos = tok.bos_token
    special = not (bos and prompt.startswith(bos))  # a rendered chat prompt carries its own BOS
    p = list(tok(prompt, add_special_tokens=special).input_ids)
    c = list(tok(completion, add_special_tokens=False).input_ids)
    if cfg.append_eos and tok.eos_token_id is not None:
        c.append(tok.eos_token_id)
    if not c:
        raise ValueError(f"completion {completion!r} has no tokens (and append_eos is off)")
    if not p:
        p = [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id]
    c = c[: cfg.max_length - 1]
    return tuple(p[-(cfg.max_length - len(c)) :]), tuple(c)


def tokenize(examples: Sequence[Any], tok: Any, cfg: TrainConfig, *, pairs: bool) -> list[Item]:
    """Every example encoded once. ``pairs``: the objective trains on ``PreferencePair`` (else
    ``SFTExample``); an example of the other kind raises ``TypeError``, none ``ValueError``."""
    want = PreferencePair if pairs else SFTExample
    items = []
    for i, ex in enumerate(examples):
        if not isinstance(ex, want):
            raise TypeError(
                f"objective {cfg.objective!r} trains on {want.__name__}; "
                f"example {i} is a {type(ex).__name__}"
            )
        if isinstance(ex, PreferencePair):
            seqs = (
                encode(tok, ex.prompt, ex.chosen, cfg),
                encode(tok, ex.prompt, ex.rejected, cfg),
            )
            items.append(Item(seqs, confidence=ex.label_confidence))
        else:
            seq = encode(tok, ex.prompt, ex.completion, cfg)
            # Same completion tokens, so the reference's logits line up column by column.
            ref = None
            if ex.reference_prompt is not None:
                ref = encode(tok, ex.reference_prompt, ex.completion, cfg)
            contrast = tuple(encode(tok, p, ex.completion, cfg) for p in ex.contrast_prompts)
            items.append(Item((seq,), weight=ex.weight, ref_seq=ref, contrast_seqs=contrast))
    if not items:
        raise ValueError("no training examples")
    return items


def collate(seqs: Sequence[Seq], pad: int) -> Batch:
    """One batch in the layout above, padded with ``pad``."""
    width = max(len(p) for p, _ in seqs)
    tail = max(len(c) for _, c in seqs)
    ids, att, labels, lmask = [], [], [], []
    for p, c in seqs:
        left, right = width - len(p), tail - len(c)
        ids.append([pad] * left + list(p) + list(c) + [pad] * right)
        att.append([0] * left + [1] * (len(p) + len(c)) + [0] * right)
        labels.append(list(c) + [pad] * right)
        lmask.append([1] * len(c) + [0] * right)
    attention = torch.tensor(att)
    return Batch(
        input_ids=torch.tensor(ids),
        attention_mask=attention,
        position_ids=(attention.cumsum(-1) - 1).clamp(min=0),
        labels=torch.tensor(labels),
        label_mask=torch.tensor(lmask),
    )


def permutation(n: int, seed: int, epoch: int) -> list[int]:
    """The order of ``n`` examples in ``epoch``."""
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return [int(i) for i in torch.randperm(n, generator=gen)]


def indices(n: int, seed: int, start: int, count: int) -> list[int]:
    """Positions ``start .. start+count-1`` of the stream epoch 0 ++ epoch 1 ++ ..."""
    out: list[int] = []
    while len(out) < count:
        epoch, offset = divmod(start + len(out), n)
        perm = permutation(n, seed, epoch)
        out.extend(perm[offset : offset + count - len(out)])
    return out
