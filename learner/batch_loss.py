"""One batch's loss under the run's objective: policy and reference forward passes.

The reference model of the DPO family and of ALT's KL term is the *same* model with its adapter
disabled (``model.disable_adapter()`` under ``torch.no_grad()``, eval mode): the base weights,
never a second copy. When continuing an ``init_adapter`` the reference is still the base model,
the fixed p_0 of ALT and π_θ0 of OAIF, not the adapter's starting point.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .batches import Batch, Item, collate
from .objectives.alt import ALTConfig, alt_loss, tag_contrast_loss
from .objectives.cdpo import cdpo_loss
from .objectives.dpo import DPOConfig, dpo_loss
from .objectives.ipo import IPOConfig, ipo_loss
from .objectives.sft import SFTConfig, sft_loss, token_logps
from .objectives.slic import SLiCConfig, slic_loss
from .precision import bf16_autocast

if TYPE_CHECKING:
    from .trainer import TrainConfig


def completion_logits(model: Any, b: Batch, autocast: bool = False) -> Tensor:
    """``[B, T, V]`` logits aligned with ``b.labels`` (computed only at completion positions),
    float32; ``autocast``: the forward runs under CPU bfloat16 autocast."""
    t = b.labels.shape[1]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(
            input_ids=b.input_ids,
            attention_mask=b.attention_mask,
            position_ids=b.position_ids,
            use_cache=False,
            logits_to_keep=t + 1,
        )
    return out.logits[:, :-1].float()


def peft_model(model: Any) -> Any:
    """The peft model inside ``model``'s DDP/FSDP wrappers (``model`` itself when unwrapped)."""
    while not hasattr(model, "disable_adapter"):
        model = model.module
    return model


@contextmanager
def reference(model: Any) -> Iterator[None]:
    """The base model (adapter off, eval mode, no grad): the reference policy. ``model`` may be
    wrapped (DDP, FSDP); forwards still go through the wrapper."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), peft_model(model).disable_adapter():
            yield
    finally:
        model.train(was_training)


def summed_logps(model: Any, b: Batch, amp: bool) -> Tensor:
    """``[B]``: each sequence's summed completion log-prob under ``model`` as it is now."""
    return (token_logps(completion_logits(model, b, amp), b.labels) * b.label_mask).sum(-1)


def reference_logps(
    model: Any,
    items: Sequence[Item],
    cfg: TrainConfig,
    device: torch.device,
    pad: int,
    shard: tuple[int, int] = (0, 1),
) -> Tensor:
    """``[n, 2]``: each pair's (chosen, rejected) summed completion log-prob under the reference.

    The reference is fixed, so the DPO family needs these once, not once per epoch (its forward
    is about a quarter of a step's compute). Computed before the first step in fixed batches,
    so a resumed run gets the same values. ``shard`` ``(rank, processes)``: this process fills
    every N-th batch and leaves zeros elsewhere (the trainer sums the processes' tensors)."""
    amp = device.type == "cpu" and bf16_autocast(cfg, device)
    rank, world = shard
    starts = range(0, len(items), cfg.batch_size)
    out = torch.zeros(len(items), 2, device=device)
    with reference(model):
        # As many forwards on every process (a wrapped model's forward may be a collective):
        # one past the end repeats the first batch and is dropped.
        for i in range(rank, -(-len(starts) // world) * world, world):
            start = starts[i] if i < len(starts) else 0
            chunk = items[start : start + cfg.batch_size]
            b = collate([it.seqs[0] for it in chunk] + [it.seqs[1] for it in chunk], pad)
            lp = summed_logps(model, b.to(device), amp)
            if i < len(starts):
                out[start : start + len(chunk)] = torch.stack(lp.chunk(2), dim=1)
    return out


def _contrast_logps(
    model: Any, items: Sequence[Item], pad: int, device: torch.device, amp: bool
) -> Tensor:
    """``[K, B]``: each item's completion summed log-prob under its K contrast prompts (with
    grad). Every item needs the same K >= 1 (``ValueError`` otherwise)."""
    k = {len(it.contrast_seqs) for it in items}
    if len(k) != 1 or 0 in k:
        raise ValueError(
            "ALT contrast > 0 needs every example to carry the same number (>= 1) of "
            f"contrast prompts (data.contrast_tags); got counts {sorted(k)}"
        )
    seqs = [it.contrast_seqs[j] for j in range(k.pop()) for it in items]
    return summed_logps(model, collate(seqs, pad).to(device), amp).view(-1, len(items))


def batch_loss(
    model: Any,
    items: Sequence[Item],
    cfg: TrainConfig,
    device: torch.device,
    pad: int,
    ref_logps: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The objective's loss and metrics on ``items``. ``ref_logps``: ``[len(items), 2]`` from
    ``reference_logps`` (pair objectives; ``ValueError`` without it)."""
    obj = cfg.loss_config
    seqs = [it.seqs[0] for it in items] + [it.seqs[1] for it in items if len(it.seqs) == 2]
    b = collate(seqs, pad).to(device)
    # CUDA bf16 is the model's dtype (the trainer loads it so); on the CPU it is autocast.
    amp = device.type == "cpu" and bf16_autocast(cfg, device)
    if isinstance(obj, ALTConfig | SFTConfig):
        weights = torch.tensor([it.weight for it in items], device=device)
        logits = completion_logits(model, b, amp)
        if isinstance(obj, SFTConfig):
            return sft_loss(logits, b.labels, b.label_mask, obj, weights)
        ref = None
        if obj.beta > 0:
            rb = b
            if any(it.ref_seq is not None for it in items):
                rb = collate([it.ref_seq or it.seqs[0] for it in items], pad).to(device)
            with reference(model):
                ref = completion_logits(model, rb, amp)
        loss, metrics = alt_loss(logits, ref, b.labels, b.label_mask, obj, weights)
        if obj.contrast > 0:
            own = (token_logps(logits, b.labels) * b.label_mask).sum(-1)
            others = _contrast_logps(model, items, pad, device, amp)
            tag_loss, tag_metrics = tag_contrast_loss(own, others, weights)
            loss = loss + obj.contrast * tag_loss
            metrics = {**metrics, **tag_metrics, "loss": float(loss.detach())}
        return loss, metrics
    if ref_logps is None:
        raise ValueError(f"objective {cfg.objective!r} needs the reference log-probs")
    logps = summed_logps(model, b, amp)
    pc, pr = logps.chunk(2)
    rc, rr = ref_logps.to(device).unbind(1)
    lc, lr = b.label_mask.sum(-1).chunk(2)
    if isinstance(obj, DPOConfig):
        return dpo_loss(pc, pr, rc, rr, obj, chosen_lengths=lc)
    if isinstance(obj, IPOConfig):
        return ipo_loss(pc, pr, rc, rr, obj, chosen_lengths=lc, rejected_lengths=lr)
    if isinstance(obj, SLiCConfig):
        return slic_loss(pc, pr, rc, rr, obj, chosen_lengths=lc)
    conf = torch.tensor([it.confidence for it in items], device=device)
    return cdpo_loss(pc, pr, rc, rr, obj, label_confidence=conf, chosen_lengths=lc)
