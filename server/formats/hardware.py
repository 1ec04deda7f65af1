"""What the CPU can do, read from ``/proc/cpuinfo``: shared by the engine's dtype choice and the
learner's precision choice. Reads a file only; no torch."""

from __future__ import annotations

import functools
from pathlib import Path

_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache  # asked per training micro-batch; the CPU does not change
def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True when the CPU advertises AVX512-BF16 or AMX-BF16 (bf16 is then fast on it); False
    when it does not or ``cpuinfo`` cannot be read. Each path is read once per process."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return any(f in flags for f in _BF16_CPU_FLAGS)
    return False
