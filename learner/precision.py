"""Where a run trains and in which precision (``TrainConfig.device`` and ``.precision``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tiller.server.formats import hardware

if TYPE_CHECKING:
    from .trainer import TrainConfig


def train_device(cfg: TrainConfig) -> torch.device:
    """``cfg.device``, with ``auto`` meaning CUDA when available, else the CPU."""
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 natively: a CUDA device with bf16 support, or a CPU
    with AVX512-BF16 or AMX. Elsewhere bf16 autocast is emulated and far slower than float32."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return hardware.cpu_has_native_bf16()  # the one detector (serving uses it)


def bf16_autocast(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether a run with ``cfg`` on ``device`` trains under bf16 (``TrainConfig.precision``)."""
    if cfg.precision == "auto":
        return device.type == "cuda" and native_bf16(device)
    if cfg.precision == "fast":
        return native_bf16(device)
    return cfg.precision == "bf16"
