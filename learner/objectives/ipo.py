"""IPO: squared regression of the log-ratio margin onto 1/(2β) (OAIF Eq. 2; β = 1.0, OAIF §4.1).

With h the log-ratio margin of ``dpo.log_ratio_margin``::

    L = mean_b (h_b − 1/(2β))²

β here is IPO's regulariser τ, not an inverse temperature, so the reward metrics report the
raw log-ratios (scale 1). ``length_normalize`` divides each log-ratio by its completion length
before taking the margin, as TRL's ``loss_type="ipo"`` does; OAIF's formula (the default) uses
the summed sequence log-probs.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .dpo import add_sft_term, log_ratio_margin, preference_metrics


@dataclass(frozen=True)
class IPOConfig:
    beta: float = 1.0
    length_normalize: bool = False
    sft_weight: float = 0.0


def ipo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    config: IPOConfig,
    *,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Mean IPO loss and metrics. Inputs are ``[B]`` summed log-probs; the ``[B]`` token counts
    are required with ``length_normalize`` (both) or ``sft_weight > 0`` (chosen); ``ValueError``
    if missing."""
    chosen, rejected, h = log_ratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    metrics = preference_metrics(1.0, chosen, rejected)
    if config.length_normalize:
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("IPO length_normalize needs chosen_lengths and rejected_lengths")
        h = chosen / chosen_lengths.clamp(min=1) - rejected / rejected_lengths.clamp(min=1)
    loss = ((h - 1.0 / (2.0 * config.beta)) ** 2).mean()
    loss = add_sft_term(loss, metrics, config.sft_weight, policy_chosen, chosen_lengths)
    metrics["loss"] = float(loss.detach())
    return loss, metrics
