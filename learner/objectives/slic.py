"""SLiC (hinge, as in OAIF Eq. 3; β = 0.002, OAIF §4.1): a margin loss on the log-ratio margin.

With h the log-ratio margin of ``dpo.log_ratio_margin``::

    L = mean_b max(0, 1 − β·h_b)

This is the reference-anchored calibration loss OAIF uses (TRL ``loss_type="hinge"``), not the
original SLiC-HF form without a reference model. With β = 0.002 the hinge stays active until the
margin reaches 500 nats, so in practice the loss is linear in h.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .dpo import add_sft_term, log_ratio_margin, preference_metrics


@dataclass(frozen=True)
class SLiCConfig:
    beta: float = 0.002
    sft_weight: float = 0.0


def slic_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    config: SLiCConfig,
    *,
    chosen_lengths: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Mean hinge loss and metrics; inputs ``[B]`` summed log-probs (lengths: see ``dpo_loss``)."""
    chosen, rejected, h = log_ratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    metrics = preference_metrics(config.beta, chosen, rejected)
    loss = torch.relu(1.0 - config.beta * h).mean()
    loss = add_sft_term(loss, metrics, config.sft_weight, policy_chosen, chosen_lengths)
    metrics["loss"] = float(loss.detach())
    return loss, metrics
