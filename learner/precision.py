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


def inference_device(device: str = "auto") -> torch.device:
    """Where a frozen model scores (fluency, CMPO trunk): ``device`` as in ``TrainConfig.device``,
    ``auto`` meaning CUDA when available, else the CPU."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device {device!r} is not one of: auto, cpu, cuda")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def inference_dtype(device: torch.device, precision: str = "auto") -> torch.dtype:
    """The dtype a frozen model is loaded in on ``device`` (``TrainConfig.precision`` values):
    ``auto`` / ``fast``: bfloat16 where ``device`` multiplies it natively (``native_bf16``),
    float32 elsewhere; ``fp32`` / ``bf16``: that dtype."""
    if precision not in ("auto", "fast", "fp32", "bf16"):
        raise ValueError(f"precision {precision!r} is not one of: auto, fast, fp32, bf16")
    if precision == "fp32":
        return torch.float32
    if precision == "bf16" or native_bf16(device):
        return torch.bfloat16
    return torch.float32
