"""Supervised fine-tuning: token-mean negative log-likelihood of completion tokens.

Also the log-likelihood helpers the other objectives share (``token_logps``, ``masked_mean``,
``chosen_nll``). Every function here is pure: tensors in, tensors out, no model access.

Alignment convention used by all objectives: ``logits[:, t]`` is the distribution that predicts
``labels[:, t]`` (the trainer has already shifted them); ``mask[:, t]`` is 1 on completion tokens
and 0 on padding. Prompt tokens never appear in ``labels``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SFTConfig:
    """Plain conditional SFT (ALT's loss with β = α = 0). No hyper-parameters."""


def token_logps(logits: Tensor, labels: Tensor) -> Tensor:
    """log p(labels[b, t]) under ``logits[b, t]``, in float32; shape ``labels.shape``."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def masked_mean(values: Tensor, mask: Tensor, weights: Tensor | None = None) -> Tensor:
    """Σ_b w_b Σ_t m_bt v_bt / Σ_bt m_bt: the token mean over the batch, examples scaled by ``w``.

    With unit weights this is the plain token mean (ALT's ``reduce_mean``). ``weights`` has shape
    ``[B]``; an all-zero mask gives 0 rather than NaN.
    """
    m = mask.to(values.dtype)
    per_example = (values * m).sum(dim=-1)
    if weights is not None:
        per_example = per_example * weights.to(values.dtype)
    return per_example.sum() / m.sum().clamp(min=1.0)


def chosen_nll(policy_chosen_logps: Tensor, chosen_lengths: Tensor) -> Tensor:
    """Token-mean NLL of the chosen completions from their summed log-probs and token counts.

    Equals TRL's ``loss_type="sft"`` term: −Σ_b log π(y⁺_b) / Σ_b |y⁺_b|.
    """
    return -policy_chosen_logps.sum() / chosen_lengths.to(policy_chosen_logps.dtype).sum().clamp(
        min=1.0
    )


def sft_loss(
    logits: Tensor,
    labels: Tensor,
    mask: Tensor,
    config: SFTConfig,
    weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Token-mean NLL of ``labels`` over ``mask``; returns ``(loss, {"loss", "nll"})``."""
    del config  # no knobs; kept so every objective has the same call shape
    nll = masked_mean(-token_logps(logits, labels), mask, weights)
    value = float(nll.detach())
    return nll, {"loss": value, "nll": value}
