"""Objective losses: hand-computed numbers on tiny tensors, and TRL's own DPOTrainer loss code.

TRL 1.16 computes its DAP losses inside ``DPOTrainer._compute_loss(self, model, inputs, ...)``
(no standalone function), so ``_trl_loss`` calls that method unbound with a minimal stand-in for
the trainer (the attributes the method reads) and a stub model whose per-token log-probs sum to
the policy log-probs under test; the reference log-probs go in as ``precompute_ref_log_probs``
inputs. TRL 1.16 has no plain label-smoothed sigmoid loss any more; its ``"aot"`` loss with a
batch of one pair (sorting one element is the identity) is exactly cDPO's formula, so cDPO is
compared pair by pair against that.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from tiller.learner.objectives.alt import ALTConfig, alt_loss, tag_contrast_loss
from tiller.learner.objectives.cdpo import CDPOConfig, cdpo_loss, effective_smoothing
from tiller.learner.objectives.dpo import DPOConfig, dpo_loss
from tiller.learner.objectives.ipo import IPOConfig, ipo_loss
from tiller.learner.objectives.sft import SFTConfig, masked_mean, sft_loss
from tiller.learner.objectives.slic import SLiCConfig, slic_loss

T = torch.tensor
LN2 = math.log(2.0)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


# The pair used for hand computation: h = (-1 - -2) - (-3 - -2) = 2.
PC, PR, RC, RR = T([-1.0]), T([-3.0]), T([-2.0]), T([-2.0])


# ------------------------------------------------------------------- hand-computed numbers


def test_dpo_by_hand() -> None:
    loss, m = dpo_loss(PC, PR, RC, RR, DPOConfig())  # beta 0.1
    assert loss.item() == pytest.approx(softplus(-0.2))  # -log σ(0.2)
    assert m["rewards/chosen"] == pytest.approx(0.1)
    assert m["rewards/rejected"] == pytest.approx(-0.1)
    assert m["rewards/margins"] == pytest.approx(0.2)
    assert m["rewards/accuracies"] == 1.0
    # A tie (policy == reference) is log 2 and 0 % accuracy.
    loss, m = dpo_loss(RC, RR, RC, RR, DPOConfig())
    assert loss.item() == pytest.approx(LN2)
    assert m["rewards/accuracies"] == 0.0


def test_dpo_sft_term_is_token_mean_nll_of_chosen() -> None:
    pc, pr, rc, rr = T([-1.0, -2.0]), T([-3.0, -3.0]), T([-1.0, -2.0]), T([-3.0, -3.0])
    loss, m = dpo_loss(pc, pr, rc, rr, DPOConfig(sft_weight=0.5), chosen_lengths=T([2, 3]))
    assert m["sft_nll"] == pytest.approx(3.0 / 5.0)
    assert loss.item() == pytest.approx(LN2 + 0.5 * 0.6)
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo_loss(pc, pr, rc, rr, DPOConfig(sft_weight=0.5))


def test_ipo_by_hand() -> None:
    loss, m = ipo_loss(PC, PR, RC, RR, IPOConfig())  # beta 1: target margin 1/2
    assert loss.item() == pytest.approx((2.0 - 0.5) ** 2)
    assert m["rewards/margins"] == pytest.approx(2.0)  # IPO reports raw log-ratios
    norm = IPOConfig(length_normalize=True)
    loss, _ = ipo_loss(PC, PR, RC, RR, norm, chosen_lengths=T([2]), rejected_lengths=T([4]))
    assert loss.item() == pytest.approx((1.0 / 2 - (-1.0) / 4 - 0.5) ** 2)
    with pytest.raises(ValueError, match="length_normalize"):
        ipo_loss(PC, PR, RC, RR, norm)


def test_slic_by_hand() -> None:
    loss, m = slic_loss(PC, PR, RC, RR, SLiCConfig())  # beta 0.002
    assert loss.item() == pytest.approx(1.0 - 0.002 * 2.0)
    assert m["rewards/margins"] == pytest.approx(0.004)
    far, _ = slic_loss(T([0.0]), T([-600.0]), T([0.0]), T([0.0]), SLiCConfig())
    assert far.item() == 0.0  # beyond the hinge


def test_cdpo_by_hand_and_gradient() -> None:
    cfg = CDPOConfig()  # beta 0.5, eps 0.1
    loss, _ = cdpo_loss(PC, PR, RC, RR, cfg)
    assert loss.item() == pytest.approx(0.9 * softplus(-1.0) + 0.1 * softplus(1.0))
    # dL/dh = β(σ(βh) − (1 − ε)): zero where the model's preference probability is 1 − ε.
    for h0 in (-1.0, 0.0, 2.0, 2 * math.log(9.0)):
        h = T([h0], requires_grad=True)
        loss, _ = cdpo_loss(h, T([0.0]), T([0.0]), T([0.0]), cfg)
        loss.backward()
        assert h.grad is not None
        expected = 0.5 * (1 / (1 + math.exp(-0.5 * h0)) - 0.9)
        assert h.grad.item() == pytest.approx(expected, abs=1e-6)
    # eps = 0 is DPO.
    plain, _ = cdpo_loss(PC, PR, RC, RR, CDPOConfig(beta=0.1, label_smoothing=0.0))
    assert plain.item() == pytest.approx(dpo_loss(PC, PR, RC, RR, DPOConfig())[0].item())


def test_cdpo_label_confidence() -> None:
    eps = effective_smoothing(0.1, T([1.0, 0.75, 0.5]))
    assert eps.tolist() == pytest.approx([0.1, 0.25 + 0.1 * 0.5, 0.5])
    loss, m = cdpo_loss(PC, PR, RC, RR, CDPOConfig(), label_confidence=T([0.75]))
    assert loss.item() == pytest.approx(0.7 * softplus(-1.0) + 0.3 * softplus(1.0))
    assert m["label_smoothing"] == pytest.approx(0.3)
    off = CDPOConfig(use_label_confidence=False)
    assert cdpo_loss(PC, PR, RC, RR, off, label_confidence=T([0.75]))[0].item() == pytest.approx(
        cdpo_loss(PC, PR, RC, RR, CDPOConfig())[0].item()
    )
    with pytest.raises(ValueError, match="label_confidence"):
        effective_smoothing(0.1, T([0.2]))
    with pytest.raises(ValueError, match="label_smoothing"):
        CDPOConfig(label_smoothing=0.5)


def test_cmpo_sft_anchor_is_token_mean_nll_of_chosen() -> None:
    from tiller.learner.objectives.cmpo import CMPOConfig, cmpo_loss

    plain = CMPOConfig(beta=0.1, label_smoothing=0.0)
    anchored = CMPOConfig(beta=0.1, label_smoothing=0.0, sft_weight=0.5)
    base, _ = cmpo_loss(PC, PR, RC, RR, plain)
    pc = PC.clone().requires_grad_()
    loss, m = cmpo_loss(pc, PR, RC, RR, anchored, chosen_lengths=T([4.0]))
    # -PC / 4 tokens = 0.25 nats per token, weighted 0.5
    assert loss.item() == pytest.approx(base.item() + 0.5 * 0.25)
    assert m["sft_nll"] == pytest.approx(0.25) and m["loss"] - 0.5 * 0.25 == pytest.approx(
        base.item()
    )
    loss.backward()
    assert pc.grad is not None
    # the anchor pushes the chosen log-prob up by an extra 0.5 / 4 per nat
    base_pc = PC.clone().requires_grad_()
    cmpo_loss(base_pc, PR, RC, RR, plain)[0].backward()
    assert base_pc.grad is not None
    assert pc.grad.item() == pytest.approx(base_pc.grad.item() - 0.125)
    with pytest.raises(ValueError, match="chosen_lengths"):
        cmpo_loss(PC, PR, RC, RR, anchored)
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="sft_weight"):
            CMPOConfig(sft_weight=bad)


def _logits(*probs: float) -> list[float]:
    return [math.log(p) for p in probs]


def test_alt_by_hand_kl_direction_and_entropy_sign() -> None:
    # One completion token, vocabulary of 3: π = (1/2, 1/4, 1/4), ρ = (1/8, 3/8, 1/2), label 0.
    policy = T([[_logits(0.5, 0.25, 0.25)]])
    ref = T([[_logits(0.125, 0.375, 0.5)]])
    labels, mask = T([[0]]), T([[1]])
    nll = LN2
    entropy = 1.5 * LN2
    kl_ref_policy = 0.125 * math.log(0.25) + 0.375 * math.log(1.5) + 0.5 * math.log(2.0)
    kl_policy_ref = 0.5 * math.log(4.0) + 0.25 * math.log(2 / 3) + 0.25 * math.log(0.5)
    assert abs(kl_ref_policy - kl_policy_ref) > 0.05  # the example tells the directions apart
    loss, m = alt_loss(policy, ref, labels, mask, ALTConfig())
    assert m["kl"] == pytest.approx(kl_ref_policy)
    assert m["entropy"] == pytest.approx(entropy)
    assert m["nll"] == pytest.approx(nll)
    assert loss.item() == pytest.approx(nll + 0.05 * kl_ref_policy - 0.06 * entropy)


def test_alt_masks_weights_and_reference_rules() -> None:
    # Two examples x two positions; the second position of example 1 is padding.
    policy = torch.zeros(2, 2, 4)  # uniform: nll = H = log 4 everywhere
    labels, mask = T([[1, 2], [3, 0]]), T([[1, 1], [1, 0]])
    cfg = ALTConfig(beta=0.0, alpha=0.06)
    loss, m = alt_loss(policy, None, labels, mask, cfg)
    ln4 = math.log(4.0)
    assert loss.item() == pytest.approx(ln4 - 0.06 * ln4)
    assert m["kl"] == 0.0
    # Weights scale each example's token sum; the denominator stays the token count (3).
    w_loss, _ = alt_loss(policy, None, labels, mask, cfg, weights=T([2.0, 0.0]))
    assert w_loss.item() == pytest.approx(2 * 2 * (ln4 - 0.06 * ln4) / 3)
    # KL against an identical reference is 0; a missing reference with beta > 0 is an error.
    _, m = alt_loss(policy, policy.clone(), labels, mask, ALTConfig())
    assert m["kl"] == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="reference"):
        alt_loss(policy, None, labels, mask, ALTConfig())


def _entropy(z: torch.Tensor) -> float:
    return float(-(z.softmax(-1) * z.log_softmax(-1)).sum())


def test_alt_entropy_term_is_a_bonus() -> None:
    """A descent step on ALT's loss leaves a higher-entropy policy than one on the NLL alone."""
    logits, labels, mask = T([[[2.0, 0.0, -1.0]]]), T([[0]]), T([[1]])

    def descend(alpha: float) -> torch.Tensor:
        z = logits.clone().requires_grad_(True)
        loss, _ = alt_loss(z, None, labels, mask, ALTConfig(beta=0.0, alpha=alpha))
        (grad,) = torch.autograd.grad(loss, z)
        return (z - 0.1 * grad).detach()

    assert _entropy(descend(1.0)) > _entropy(logits) > _entropy(descend(0.0))


def test_tag_contrast_by_hand() -> None:
    """Cross-entropy of the label among [label, contrast tags] by sequence log-likelihood."""
    own, others = T([-1.0, -5.0]), T([[-2.0, -1.0], [-3.0, -9.0]])
    ce = [
        -math.log(math.exp(-1) / (math.exp(-1) + math.exp(-2) + math.exp(-3))),
        -math.log(math.exp(-5) / (math.exp(-5) + math.exp(-1) + math.exp(-9))),
    ]
    loss, m = tag_contrast_loss(own, others)
    assert float(loss) == pytest.approx(sum(ce) / 2, rel=1e-6)
    assert m["tag_acc"] == 0.5
    weighted, _ = tag_contrast_loss(own, others, T([3.0, 1.0]))
    assert float(weighted) == pytest.approx((3 * ce[0] + ce[1]) / 4, rel=1e-6)
    # Descent raises the label's likelihood against the others.
    z = own.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(tag_contrast_loss(z, others)[0], z)
    assert (grad < 0).all()
    with pytest.raises(ValueError, match="contrast"):
        ALTConfig(contrast=-1.0)


def test_sft_and_masked_mean() -> None:
    logits = torch.zeros(1, 3, 2)
    loss, m = sft_loss(logits, T([[0, 1, 0]]), T([[1, 1, 0]]), SFTConfig())
    assert loss.item() == pytest.approx(LN2) and m["nll"] == pytest.approx(LN2)
    assert masked_mean(T([[1.0, 2.0]]), T([[0, 0]])).item() == 0.0


# ------------------------------------------------------------------ against TRL's own code


def _trl_loss(
    loss_types: list[str],
    weights: list[float],
    beta: float,
    chosen_tok: torch.Tensor,
    rejected_tok: torch.Tensor,
    mask_c: torch.Tensor,
    mask_r: torch.Tensor,
    ref_c: torch.Tensor,
    ref_r: torch.Tensor,
    label_smoothing: float = 0.0,
) -> tuple[float, dict[str, Any]]:
    """TRL 1.16's ``DPOTrainer._compute_loss`` on given per-token policy log-probs."""
    trl = pytest.importorskip("trl")
    b, t = chosen_tok.shape
    per_token = torch.cat([chosen_tok * mask_c, rejected_tok * mask_r])  # [2B, T]
    zeros = torch.zeros_like(per_token)
    outputs = SimpleNamespace(
        log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool()
    )
    identity = lambda x: x  # noqa: E731
    fake = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(
            device=torch.device("cpu"), gather=identity, gather_for_metrics=identity
        ),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=loss_types,
        loss_weights=weights,
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    # One prompt token, then T completion positions (TRL shifts the mask by one).
    completion_mask = torch.cat(
        [torch.zeros(2 * b, 1, dtype=torch.long), torch.cat([mask_c, mask_r]).long()], dim=1
    )
    inputs = {
        "input_ids": torch.zeros(2 * b, t + 1, dtype=torch.long),
        "attention_mask": torch.ones(2 * b, t + 1, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_c,
        "ref_rejected_logps": ref_r,
    }
    loss = trl.DPOTrainer._compute_loss(fake, lambda **_: outputs, inputs, False)
    return float(loss), {k: v[-1] for k, v in fake._metrics["train"].items()}


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    b, t = 5, 6
    mask_c = (torch.rand(b, t, generator=g) > 0.3).long()
    mask_r = (torch.rand(b, t, generator=g) > 0.3).long()
    mask_c[:, 0] = mask_r[:, 0] = 1
    return {
        "chosen_tok": -torch.rand(b, t, generator=g) * 3,
        "rejected_tok": -torch.rand(b, t, generator=g) * 3,
        "mask_c": mask_c,
        "mask_r": mask_r,
        "ref_c": -torch.rand(b, generator=g) * 10,
        "ref_r": -torch.rand(b, generator=g) * 10,
    }


def _ours(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        "policy_chosen": (batch["chosen_tok"] * batch["mask_c"]).sum(-1),
        "policy_rejected": (batch["rejected_tok"] * batch["mask_r"]).sum(-1),
        "ref_chosen": batch["ref_c"],
        "ref_rejected": batch["ref_r"],
    }


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_dpo_matches_trl(batch: dict[str, torch.Tensor], beta: float) -> None:
    trl_value, trl_metrics = _trl_loss(["sigmoid"], [1.0], beta, **batch)
    loss, m = dpo_loss(**_ours(batch), config=DPOConfig(beta=beta))
    assert loss.item() == pytest.approx(trl_value, rel=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert m[key] == pytest.approx(trl_metrics[key], rel=1e-5, abs=1e-7)


def test_dpo_sft_term_matches_trl(batch: dict[str, torch.Tensor]) -> None:
    trl_value, _ = _trl_loss(["sigmoid", "sft"], [1.0, 0.3], 0.1, **batch)
    loss, _ = dpo_loss(
        **_ours(batch), config=DPOConfig(sft_weight=0.3), chosen_lengths=batch["mask_c"].sum(-1)
    )
    assert loss.item() == pytest.approx(trl_value, rel=1e-6)


def test_ipo_matches_trl(batch: dict[str, torch.Tensor]) -> None:
    # TRL divides each log-ratio by its completion length: our length_normalize=True.
    trl_value, _ = _trl_loss(["ipo"], [1.0], 1.0, **batch)
    loss, _ = ipo_loss(
        **_ours(batch),
        config=IPOConfig(length_normalize=True),
        chosen_lengths=batch["mask_c"].sum(-1),
        rejected_lengths=batch["mask_r"].sum(-1),
    )
    assert loss.item() == pytest.approx(trl_value, rel=1e-6)
    # With one-token completions normalisation is a no-op: OAIF's summed form matches too.
    one = {k: v[:, :1] if v.dim() == 2 else v for k, v in batch.items()}
    trl_value, _ = _trl_loss(["ipo"], [1.0], 0.25, **one)
    loss, _ = ipo_loss(**_ours(one), config=IPOConfig(beta=0.25))
    assert loss.item() == pytest.approx(trl_value, rel=1e-6)


@pytest.mark.parametrize("beta", [0.002, 0.1, 1.0])
def test_slic_matches_trl_hinge(batch: dict[str, torch.Tensor], beta: float) -> None:
    trl_value, _ = _trl_loss(["hinge"], [1.0], beta, **batch)
    loss, _ = slic_loss(**_ours(batch), config=SLiCConfig(beta=beta))
    assert loss.item() == pytest.approx(trl_value, rel=1e-6)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_cdpo_matches_trl_pairwise(batch: dict[str, torch.Tensor], eps: float) -> None:
    ours = _ours(batch)
    loss, _ = cdpo_loss(**ours, config=CDPOConfig(label_smoothing=eps))
    per_pair = []
    for i in range(batch["ref_c"].shape[0]):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        per_pair.append(_trl_loss(["aot"], [1.0], 0.5, **one, label_smoothing=eps)[0])
    assert loss.item() == pytest.approx(sum(per_pair) / len(per_pair), rel=1e-6)
