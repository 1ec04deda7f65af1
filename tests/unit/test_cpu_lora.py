"""The grouped CPU LoRA ops compute what vLLM's torch ops compute, and nothing for index -1."""

from __future__ import annotations

import pytest
import torch
from vllm.lora.ops import torch_ops as vllm_ops

from tiller.server import cpu_lora

SLOTS, RANK, HIDDEN, OUT = 4, 8, 32, 48
CASES = {
    "one adapter": [2] * 7,
    "mixed adapters": [0, 1, 3, 0, 1, 3, 3],
    "some rows without": [1, -1, 1, -1, -1, 1, 1],
    "none": [-1] * 7,
}


@pytest.fixture
def weights() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(SLOTS, 1, RANK, HIDDEN, generator=g)
    b = torch.randn(SLOTS, 1, OUT, RANK, generator=g)
    return a, b


def _reference(
    indices: list[int], a: torch.Tensor, b: torch.Tensor
) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """vLLM's ops read index -1 as the last slot; zeroing that slot gives the intended result."""
    a, b = a.clone(), b.clone()
    if -1 in indices:
        a[-1], b[-1] = 0, 0
        indices = [SLOTS - 1 if i == -1 else i for i in indices]
    return indices, a, b


@pytest.mark.parametrize("case", CASES)
def test_shrink_and_expand_match_vllm(
    case: str, weights: tuple[torch.Tensor, torch.Tensor]
) -> None:
    a, b = weights
    idx = torch.tensor(CASES[case])
    ref_idx, ref_a, ref_b = _reference(CASES[case], a, b)
    x = torch.randn(len(idx), HIDDEN)
    ours, theirs = torch.zeros(len(idx), RANK), torch.zeros(len(idx), RANK)
    cpu_lora.bgmv_shrink(x, a, ours, idx, 0.5)
    vllm_ops.bgmv_shrink(x, ref_a, theirs, torch.tensor(ref_idx), 0.5)
    torch.testing.assert_close(ours, theirs)

    y = torch.randn(len(idx), OUT + 5)  # padded output: only OUT columns take the delta
    y_ref = y.clone()
    cpu_lora.bgmv_expand(ours, b, y, idx, add_inputs=True)
    vllm_ops.bgmv_expand(theirs, ref_b, y_ref, torch.tensor(ref_idx), add_inputs=True)
    torch.testing.assert_close(y, y_ref)

    z = torch.randn(len(idx), 3 * OUT)
    z_ref = z.clone()
    cpu_lora.bgmv_expand_slice(ours, b, z, idx, OUT, OUT, add_inputs=False)
    vllm_ops.bgmv_expand_slice(theirs, ref_b, z_ref, torch.tensor(ref_idx), OUT, OUT, False)
    torch.testing.assert_close(z, z_ref)


def test_prefill_ops_expand_one_index_per_sequence(
    weights: tuple[torch.Tensor, torch.Tensor],
) -> None:
    a, _ = weights
    seq_idx, seq_lens = torch.tensor([0, 2, 1]), torch.tensor([3, 1, 2])
    x = torch.randn(6, HIDDEN)
    ours, theirs = torch.zeros(6, RANK), torch.zeros(6, RANK)
    cpu_lora.sgmv_shrink(x, a, ours, torch.tensor([0, 3, 4]), seq_lens, seq_idx, 3, 3, 6, 1.0)
    vllm_ops.sgmv_shrink(x, a, theirs, torch.tensor([0, 3, 4]), seq_lens, seq_idx, 3, 3, 6, 1.0)
    torch.testing.assert_close(ours, theirs)
    # Row 3 is the second sequence's only token: slot 2's A, nothing else.
    torch.testing.assert_close(ours[3], a[2, 0] @ x[3])


def test_rows_without_an_adapter_get_no_delta(weights: tuple[torch.Tensor, torch.Tensor]) -> None:
    a, _ = weights
    x = torch.randn(3, HIDDEN)
    out = torch.full((3, RANK), 7.0)
    cpu_lora.bgmv_shrink(x, a, out, torch.tensor([-1, -1, -1]), 1.0)
    assert not out.any()  # vLLM's op would write slot 3's delta here


def test_register_swaps_the_cpu_wrappers_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.lora.punica_wrapper import punica_cpu

    for name in cpu_lora._OPS:
        monkeypatch.setattr(punica_cpu, name, getattr(vllm_ops, name))
    monkeypatch.setenv("TILLER_VLLM_CPU_LORA", "0")
    cpu_lora.register()
    assert punica_cpu.bgmv_shrink is vllm_ops.bgmv_shrink
    monkeypatch.delenv("TILLER_VLLM_CPU_LORA")
    cpu_lora.register()
    assert all(getattr(punica_cpu, n) is getattr(cpu_lora, n) for n in cpu_lora._OPS)
