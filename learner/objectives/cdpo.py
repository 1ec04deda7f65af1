"""cDPO: DPO with label smoothing ε for noisy preferences — the loss CMPO trains with.

Mitchell's conservative DPO (cited as [38] in the CMPO thesis, Eq. 2.10): a label is flipped
with probability ε, so the loss mixes both orders::

    L = mean_b [ −(1 − ε_b)·log σ(β·h_b) − ε_b·log σ(−β·h_b) ]

whose gradient in h is β·(σ(β·h) − (1 − ε)) (Eq. 2.11 / 3.3): it stops pushing once the
model's preference probability reaches 1 − ε. CMPO (§5.3.1–5.3.2) uses β = 0.5, ε = 0.1.

Per-pair confidence: ``PreferencePair.label_confidence`` c ∈ [0.5, 1] is the annotator's
belief that the chosen side wins. With ``use_label_confidence`` it is composed with the global
noise ε (a correct label flipped with probability ε) into
``P(chosen wins) = c(1 − ε) + (1 − c)ε``, i.e. ``ε_b = (1 − c_b) + ε(2c_b − 1)``: c = 1 gives
ε, c = 0.5 gives 1/2 (no signal). CMPO's attribute weight vectors condition the *prompt*
(rendered by the dataset builder); they do not enter this loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .dpo import add_sft_term, log_ratio_margin, preference_metrics


@dataclass(frozen=True)
class CDPOConfig:
    beta: float = 0.5
    label_smoothing: float = 0.1
    use_label_confidence: bool = True
    sft_weight: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(
                f"cDPO label_smoothing must be in [0, 0.5) (got {self.label_smoothing})"
            )


def effective_smoothing(epsilon: float, confidence: Tensor) -> Tensor:
    """Per-pair ε_b = 1 − [c(1 − ε) + (1 − c)ε] for confidences ``c`` in [0.5, 1]."""
    if bool(((confidence < 0.5) | (confidence > 1.0)).any()):
        raise ValueError("label_confidence must lie in [0.5, 1]")
    return (1.0 - confidence) + epsilon * (2.0 * confidence - 1.0)


def cdpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    config: CDPOConfig,
    *,
    label_confidence: Tensor | None = None,
    chosen_lengths: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Mean cDPO loss and metrics. Inputs are ``[B]`` summed log-probs; ``label_confidence``
    (``[B]``, optional) is used when ``config.use_label_confidence``; ``chosen_lengths`` only for
    ``sft_weight > 0``."""
    chosen, rejected, h = log_ratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    metrics = preference_metrics(config.beta, chosen, rejected)
    eps: Tensor | float = config.label_smoothing
    if config.use_label_confidence and label_confidence is not None:
        eps = effective_smoothing(config.label_smoothing, label_confidence.to(h.dtype))
        metrics["label_smoothing"] = float(torch.as_tensor(eps).mean())
    logits = config.beta * h
    loss = (-(1.0 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)).mean()
    loss = add_sft_term(loss, metrics, config.sft_weight, policy_chosen, chosen_lengths)
    metrics["loss"] = float(loss.detach())
    return loss, metrics
