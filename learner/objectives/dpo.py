"""DPO: −log σ(β·h) on the log-ratio margin h (OAIF Eq. 1; defaults from OAIF §4.1: β = 0.1).

For a pair with chosen y⁺ and rejected y⁻, all four inputs are per-sequence log-probabilities
summed over completion tokens::

    h = [log π_θ(y⁺|x) − log π_ref(y⁺|x)] − [log π_θ(y⁻|x) − log π_ref(y⁻|x)]
    L = mean_b −log σ(β · h_b)   (+ sft_weight · token-mean NLL of y⁺, optional)

This module also holds the implicit-reward metrics (β·log-ratio) that IPO, SLiC and cDPO report.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .sft import chosen_nll


@dataclass(frozen=True)
class DPOConfig:
    """``beta``: inverse temperature of the implicit reward. ``sft_weight``: weight of an extra
    token-mean NLL on the chosen completions (TRL's ``loss_type=["sigmoid", "sft"]``); 0 = off."""

    beta: float = 0.1
    sft_weight: float = 0.0


def log_ratio_margin(
    policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """``(chosen_logratio, rejected_logratio, h)``, each ``[B]``; h = chosen − rejected."""
    chosen = policy_chosen - ref_chosen
    rejected = policy_rejected - ref_rejected
    return chosen, rejected, chosen - rejected


def preference_metrics(
    scale: float, chosen_logratios: Tensor, rejected_logratios: Tensor
) -> dict[str, float]:
    """Implicit rewards r = scale·log(π/π_ref): their means, margin and pairwise accuracy.

    Accuracy counts strict wins (r⁺ > r⁻), so it is 0 at initialisation, as in TRL.
    """
    with torch.no_grad():
        chosen = scale * chosen_logratios.float()
        rejected = scale * rejected_logratios.float()
        return {
            "rewards/chosen": float(chosen.mean()),
            "rewards/rejected": float(rejected.mean()),
            "rewards/margins": float((chosen - rejected).mean()),
            "rewards/accuracies": float((chosen > rejected).float().mean()),
        }


def add_sft_term(
    loss: Tensor,
    metrics: dict[str, float],
    sft_weight: float,
    policy_chosen: Tensor,
    chosen_lengths: Tensor | None,
) -> Tensor:
    """``loss + sft_weight · chosen_nll`` (records ``metrics["sft_nll"]``); needs the lengths."""
    if sft_weight == 0:
        return loss
    if chosen_lengths is None:
        raise ValueError("sft_weight > 0 needs chosen_lengths (token counts of the chosen)")
    nll = chosen_nll(policy_chosen, chosen_lengths)
    metrics["sft_nll"] = float(nll.detach())
    return loss + sft_weight * nll


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    config: DPOConfig,
    *,
    chosen_lengths: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Mean DPO loss over the batch and its metrics (``loss`` plus ``preference_metrics``).

    Inputs are ``[B]`` summed log-probs; ``chosen_lengths`` (``[B]`` token counts) is needed only
    when ``config.sft_weight > 0``.
    """
    chosen, rejected, h = log_ratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    metrics = preference_metrics(config.beta, chosen, rejected)
    loss = -F.logsigmoid(config.beta * h).mean()
    loss = add_sft_term(loss, metrics, config.sft_weight, policy_chosen, chosen_lengths)
    metrics["loss"] = float(loss.detach())
    return loss, metrics
