"""CMPO plural-head objective (seed 002, Eq 3.1 and 3.2): one trunk, k attribute heads.

The policy's next-token distribution for a weight vector λ is softmax(Σ_j λ_j · h·W_jᵀ) with
``h`` the trunk's last hidden state. With low-rank heads W_j = W_0 + B_j·A_j (W_0 the model's
own head) this is ``c·(h·W_0ᵀ) + Σ_j λ_j·(h·A_jᵀ)·B_jᵀ`` with c = Σ_j λ_j — the same formula
the server's steering processor applies. Each preference pair carries the λ of the attribute
subset it was judged on (|S|⁻¹ on the attributes in S, Eq 3.2); the loss is conservative DPO
(``cdpo_loss``: β = 0.5, label smoothing ε = 0.1 in CMPO) between the λ-mixed policy and the
reference = the base head alone.

``sft_weight`` > 0 adds the chosen completions' mean per-token NLL under the mixed policy (an
RPO-style anchor): cDPO alone lowers chosen and rejected alike when both are the base's own
samples, and sampling then follows that mass off the base distribution
(``docs/results/cmpo.md``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .cdpo import CDPOConfig, cdpo_loss


@dataclass(frozen=True)
class CMPOConfig:
    beta: float = 0.5
    label_smoothing: float = 0.1
    use_label_confidence: bool = True
    sft_weight: float = 0.0  # weight of the chosen completions' per-token NLL (0: pure cDPO)

    def __post_init__(self) -> None:
        if not (self.sft_weight >= 0 and math.isfinite(self.sft_weight)):
            raise ValueError(f"sft_weight must be a finite number >= 0, got {self.sft_weight}")

    def cdpo(self) -> CDPOConfig:
        return CDPOConfig(
            self.beta, self.label_smoothing, self.use_label_confidence, self.sft_weight
        )


def mixed_logits(
    h: Tensor, w0: Tensor, a: Tensor, b: Tensor, weights: Tensor, base: Tensor | None = None
) -> Tensor:
    """Logits of low-rank plural heads under per-row weights.

    ``h`` [N, H] hidden states, ``w0`` [V, H] base head, ``a`` [k, r, H], ``b`` [k, V, r]
    head factors, ``weights`` [N, k] (each row's λ). Returns [N, V]. ``base``: ``h·W_0ᵀ``
    computed beforehand (the frozen part: a trainer can keep it instead of redoing the
    [N, H] x [H, V] matmul every step).
    """
    n, (k, r, _) = h.shape[0], a.shape
    c = weights.sum(dim=1, keepdim=True)  # [N, 1]
    low = torch.einsum("nh,krh->nkr", h, a)
    scaled = (weights.unsqueeze(-1) * low).reshape(n, k * r)
    steer = scaled @ b.permute(0, 2, 1).reshape(k * r, b.shape[1])  # [N, V]
    return c * (h @ w0.T if base is None else base) + steer


def cmpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    config: CMPOConfig,
    *,
    label_confidence: Tensor | None = None,
    chosen_lengths: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """cDPO on summed completion log-probs of the λ-mixed policy vs the base head, plus
    ``sft_weight`` × the chosen completions' token-mean NLL (``cdpo_loss``; ``chosen_lengths``:
    each chosen completion's token count, needed when ``sft_weight`` > 0)."""
    return cdpo_loss(
        policy_chosen,
        policy_rejected,
        ref_chosen,
        ref_rejected,
        config.cdpo(),
        label_confidence=label_confidence,
        chosen_lengths=chosen_lengths,
    )
