"""ALT: conditional SFT on feedback-prefixed prompts, with a KL anchor and an entropy bonus.

ALT (arXiv 2407.16970, §2.2, Eq. 1) trains on ``(x, y, f)`` with the feedback ``f`` rendered
into the prompt::

    L = L_NLL + β·L_ref + α·L_H
    L_NLL = −E log p_θ(y | x, f)
    L_ref =  E KL( p_0(y | x) ‖ p_θ(y | x, f) )      # reference first: forward KL from p_0
    L_H   = −E H( p_θ(y | x, f) )                     # negative entropy: "encourage exploration"

so, per completion token t with vocabulary distributions π_t (policy) and ρ_t (reference)::

    ℓ_t = −log π_t(y_t) + β · Σ_v ρ_t(v)(log ρ_t(v) − log π_t(v)) − α · H(π_t)

and the loss is the token mean of ℓ_t over all completion tokens of the batch (the authors'
``reduce_mean(lm_loss + kl_coef·kl − entropy_coef·entropy, mask)``; their KL is
``KLDivLoss(log_softmax(policy), softmax(ref))`` summed over the vocabulary, i.e. KL(ρ ‖ π)).
The entropy term enters with a MINUS sign: minimising L raises the policy's entropy.

Defaults are the paper's toxicity setting (Table 3): β = 0.05, α = 0.06. Summarisation and
dialogue (Tables 4–5) drop the KL term: β = 0, α = 0.06; then no reference is needed.

Reference prompt: the paper writes p_0(y | x) (no feedback) while the authors' KL trainer feeds
the reference the same input ids as the policy; this function takes whatever reference logits it
is given, aligned to the same completion tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .sft import masked_mean


@dataclass(frozen=True)
class ALTConfig:
    """β weighs KL(p_ref ‖ p_θ); α weighs the entropy bonus (the loss subtracts α·H)."""

    beta: float = 0.05
    alpha: float = 0.06

    def __post_init__(self) -> None:
        if self.beta < 0 or self.alpha < 0:
            raise ValueError(f"ALT beta and alpha must be >= 0 (got {self.beta}, {self.alpha})")


def alt_loss(
    policy_logits: Tensor,
    ref_logits: Tensor | None,
    labels: Tensor,
    mask: Tensor,
    config: ALTConfig,
    weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """ALT's Eq. 1 on aligned completion positions.

    ``policy_logits`` / ``ref_logits``: ``[B, T, V]`` with ``logits[:, t]`` predicting
    ``labels[:, t]``; ``mask``: ``[B, T]``, 1 on completion tokens; ``weights``: optional ``[B]``
    per-example scale. ``ref_logits`` may be ``None`` only when ``config.beta == 0`` (raises
    ``ValueError`` otherwise). Returns the scalar loss and float metrics ``loss``, ``nll``,
    ``kl`` (KL(ref ‖ policy), token mean; 0 without a reference) and ``entropy`` (token mean).
    """
    logp = torch.log_softmax(policy_logits.float(), dim=-1)
    nll = -logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(dim=-1)
    per_token = nll - config.alpha * entropy
    kl = torch.zeros_like(nll)
    if config.beta > 0:
        if ref_logits is None:
            raise ValueError("ALT with beta > 0 needs reference logits (got None)")
        ref_logp = torch.log_softmax(ref_logits.float(), dim=-1)
        kl = (ref_logp.exp() * (ref_logp - logp)).sum(dim=-1)
        per_token = per_token + config.beta * kl
    loss = masked_mean(per_token, mask, weights)
    with torch.no_grad():
        metrics = {
            "loss": float(loss),
            "nll": float(masked_mean(nll, mask)),
            "kl": float(masked_mean(kl, mask)),
            "entropy": float(masked_mean(entropy, mask)),
        }
    return loss, metrics
