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

Tag contrast (``contrast`` = γ > 0, not in the paper): conditional NLL on the policy's own samples
mostly teaches what every tag shares (the samples' style), so the tags can drift together while
their difference stays at what prompting gave. The contrast term trains the difference alone:
with ``s_f = log p_θ(y | x, f)`` summed over the completion, it adds
``γ · −log softmax_f(s)[f_label]`` over the label and the example's contrast tags, i.e. the
cross-entropy of the policy read as a Bayes classifier of its own feedback
(``tag_contrast_loss``; ``bench/alt_experiments.py`` measures it).

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
    contrast: float = 0.0  # γ of the tag-contrast term (needs examples with contrast prompts)

    def __post_init__(self) -> None:
        if self.beta < 0 or self.alpha < 0 or self.contrast < 0:
            raise ValueError(
                f"ALT beta, alpha and contrast must be >= 0 "
                f"(got {self.beta}, {self.alpha}, {self.contrast})"
            )


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


def tag_contrast_loss(
    label_logps: Tensor, other_logps: Tensor, weights: Tensor | None = None
) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy of the labelled tag among the example's tags, by sequence likelihood.

    ``label_logps``: ``[B]`` summed log p(y | x, f_label); ``other_logps``: ``[K, B]`` the same
    completions under K contrast tags; ``weights``: optional ``[B]``. Returns the (weighted) mean
    of ``−log softmax([s_label, s_1..s_K])[0]`` and metrics ``tag_ce`` and ``tag_acc`` (the share
    of examples whose label is the most likely tag).
    """
    scores = torch.cat([label_logps.unsqueeze(0), other_logps], dim=0)  # [K+1, B]
    ce = -torch.log_softmax(scores, dim=0)[0]
    w = torch.ones_like(ce) if weights is None else weights.to(ce.dtype)
    loss = (ce * w).sum() / w.sum().clamp(min=1e-12)
    with torch.no_grad():
        acc = (scores.argmax(dim=0) == 0).float().mean()
    return loss, {"tag_ce": float(loss.detach()), "tag_acc": float(acc)}
