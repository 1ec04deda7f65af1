"""Grouped LoRA matmuls for vLLM's CPU punica wrapper (a ``vllm.general_plugins`` entry point).

vLLM's CPU wrapper (``vllm.lora.punica_wrapper.punica_cpu``) runs its LoRA shrink/expand with
PyTorch ops that gather one whole LoRA matrix per token (``weights[indices]``, shape
``[tokens, out, in]``) and contract it with a batched mat-vec. Two costs follow:

- speed: every decode step copies ``tokens × rank × hidden`` floats per projection per layer,
  and runs it even for a batch in which no request has an adapter (``bench/cpu_lora.py``
  compares the two).
- correctness: a token without an adapter has index -1, which the gather reads as the *last*
  slot. Once ``max_loras`` adapters are active, base-model requests get the last slot's delta.

The ops here take the same arguments and write the same outputs, but group the rows by slot:
one ``x[rows] @ W[slot].T`` per distinct slot in the batch (one matmul in the usual case of one
adapter), nothing at all for rows with index -1. ``register`` swaps them into the CPU wrapper's
module namespace; the GPU wrapper (Triton kernels) is not touched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_OPS = (
    "bgmv_shrink",
    "bgmv_expand",
    "bgmv_expand_slice",
    "sgmv_shrink",
    "sgmv_expand",
    "sgmv_expand_slice",
)


def grouped_matvec(
    inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """``out[b] = weights[indices[b]] @ inputs[b]`` (0 where ``indices[b] < 0``), in ``dtype``.

    ``weights``: ``[slots, out, in]`` or ``[slots, 1, out, in]``; ``inputs``: ``[rows, in]``.
    """
    import torch

    w = weights.squeeze(1) if weights.dim() == 4 else weights
    x = inputs.to(dtype)
    idx = indices[: x.shape[0]]
    first = int(idx[0]) if idx.numel() else -1
    if first >= 0 and bool((idx == first).all()):  # the usual batch: one adapter
        return x @ w[first].to(dtype).T
    out = torch.zeros((x.shape[0], w.shape[1]), dtype=dtype, device=x.device)
    for s in (s for s in torch.unique(idx).tolist() if s >= 0):
        rows = (idx == s).nonzero().squeeze(1)
        out.index_copy_(0, rows, x.index_select(0, rows) @ w[s].to(dtype).T)
    return out


def bgmv_shrink(
    inputs: torch.Tensor,
    lora_a_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    scaling: float = 1.0,
) -> None:
    out = grouped_matvec(inputs, lora_a_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : out.shape[1]] = scaling * out


def bgmv_expand(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    add_inputs: bool = True,
) -> None:
    out = grouped_matvec(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    # One input row against a batch of outputs fills only the first (vLLM's own op does too).
    rows = 1 if out.shape[0] == 1 and output_tensor.shape[0] != 1 else output_tensor.shape[0]
    cols = min(out.shape[1], output_tensor.shape[1])  # padding may differ
    if add_inputs:
        output_tensor[:, :cols] += out[:rows, :cols]
    else:
        output_tensor[:, :cols] = out[:rows, :cols]


def bgmv_expand_slice(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = True,
) -> None:
    out = grouped_matvec(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    view = output_tensor[:, slice_offset : slice_offset + slice_size]
    if add_inputs:
        view += out
    else:
        view.copy_(out)


def _per_token(lora_indices: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.repeat_interleave(lora_indices, seq_lens)


def sgmv_shrink(
    inputs: torch.Tensor,
    lora_a_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    b_seq_start_loc: torch.Tensor,
    seq_len_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    scaling: float,
) -> None:
    idx = _per_token(lora_indices_tensor, seq_len_tensor)
    bgmv_shrink(inputs, lora_a_weights, output_tensor, idx, scaling)


def sgmv_expand(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    b_seq_start_loc: torch.Tensor,
    seq_len_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    add_inputs: bool = False,
) -> None:
    idx = _per_token(lora_indices_tensor, seq_len_tensor)
    bgmv_expand(inputs, lora_b_weights, output_tensor, idx, add_inputs)


def sgmv_expand_slice(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    b_seq_start_loc: torch.Tensor,
    seq_len_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = False,
) -> None:
    idx = _per_token(lora_indices_tensor, seq_len_tensor)
    bgmv_expand_slice(
        inputs, lora_b_weights, output_tensor, idx, slice_offset, slice_size, add_inputs
    )


def register() -> None:
    """Swap the grouped ops into vLLM's CPU punica wrapper (``TILLER_VLLM_CPU_LORA=0``: don't)."""
    import os

    if os.environ.get("TILLER_VLLM_CPU_LORA", "1") == "0":
        return
    from vllm.lora.punica_wrapper import punica_cpu

    for name in _OPS:
        setattr(punica_cpu, name, globals()[name])
