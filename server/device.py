"""Pick the fastest engine settings for the machine we run on."""

from __future__ import annotations

from .formats.hardware import cpu_has_native_bf16


def resolve_dtype(requested: str, *, has_cuda: bool, cpu_bf16: bool) -> str:
    """The dtype to give vLLM.

    ``auto`` keeps vLLM's own choice (bf16/fp16) on GPUs and on CPUs with native bf16, and picks
    float32 on CPUs without it, where bf16 is emulated and several times slower.
    """
    if requested != "auto":
        return requested
    if has_cuda or cpu_bf16:
        return "auto"
    return "float32"


def detect_dtype(requested: str) -> str:
    """``resolve_dtype`` for this machine."""
    import torch

    return resolve_dtype(
        requested, has_cuda=torch.cuda.is_available(), cpu_bf16=cpu_has_native_bf16()
    )
