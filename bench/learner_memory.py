"""Learner memory: peak RSS of a SmolLM2-135M LoRA DPO run, batch 16 pairs x 128 tokens, on CPU,
against a 6 GiB budget (target: ratio < 1.0).

The run goes through Tiller's ``train()`` in a child process (float32, grad_accum 1, so all 32
sequences of a step are in one forward pass, with the reference pass alongside; gradient
checkpointing on unless ``--no-gradient-checkpointing``); every sequence is exactly ``--tokens``
long (prompts are cut on the left to fit). Peak RSS is the child's
``ru_maxrss``: model loading, tokenisation, training and saving the adapter all count.

    python bench/learner_memory.py                    # SmolLM2-135M, 16 x 128, 3 steps
    python bench/learner_memory.py --model tiny --steps 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GIB = 1024**3


def _vm_hwm(pid: int) -> int:
    """Peak RSS so far of ``pid`` (bytes), 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def child(a: argparse.Namespace) -> None:
    import torch
    from learner_throughput import preference_pairs
    from transformers import AutoTokenizer

    from tiller.learner.trainer import TrainConfig, train

    torch.set_num_threads(a.threads)
    tok = AutoTokenizer.from_pretrained(a.model)
    # Every prompt + completion is longer than --tokens, so each sequence is cut to exactly that.
    pairs = preference_pairs(
        tok,
        a.batch_size * a.steps,
        prompt_tokens=(a.tokens // 2 - 8, a.tokens // 2 + 8),
        completion_tokens=(a.tokens // 2 + 8, a.tokens // 2 + 24),
    )
    cfg = TrainConfig(
        objective="dpo",
        batch_size=a.batch_size,
        max_steps=a.steps,
        max_length=a.tokens,
        device="cpu",
        progress=True,
        gradient_checkpointing=a.gradient_checkpointing,
    )
    with tempfile.TemporaryDirectory() as out:
        result = train(Path(a.model), pairs, cfg, Path(out))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({"peak_rss_bytes": peak, "samples_per_s": result.samples_per_s}))


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="smollm2 | tiny | PATH")
    p.add_argument("--batch-size", type=int, default=16, help="pairs per step (2 sequences each)")
    p.add_argument("--tokens", type=int, default=128, help="tokens per sequence")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--budget-gib", type=float, default=6.0)
    p.add_argument("--out", type=Path, default=Path("bench/out/learner_memory.json"))
    p.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="TrainConfig.gradient_checkpointing (off: > 7.3 GiB at 16 x 128)",
    )
    p.add_argument(
        "--mmap-threshold",
        type=int,
        default=131072,
        help="MALLOC_MMAP_THRESHOLD_ for the child (0: glibc's dynamic default, which kept freed "
        "activations in the heap: 6.70 GiB peak instead of 3.73 GiB)",
    )
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a)
    from serve_throughput import resolve_model

    model = resolve_model(a.model)  # converts SmolLM2 here, so the child's peak is training only
    cmd = [sys.executable, __file__, "--child", "--model", str(model)]
    for flag in ("batch_size", "tokens", "steps", "threads"):
        cmd += [f"--{flag.replace('_', '-')}", str(getattr(a, flag))]
    if not a.gradient_checkpointing:
        cmd.append("--no-gradient-checkpointing")
    began = time.perf_counter()
    with tempfile.TemporaryFile("w+") as report:
        env = dict(os.environ)
        if a.mmap_threshold:
            env["MALLOC_MMAP_THRESHOLD_"] = str(a.mmap_threshold)
        proc = subprocess.Popen(cmd, stdout=report, text=True, env=env)
        hwm = 0  # the child's VmHWM, polled in case it is killed (OOM) before it reports
        while proc.poll() is None:
            hwm = max(hwm, _vm_hwm(proc.pid))
            time.sleep(0.5)
        report.seek(0)
        stdout = report.read()
    wall = time.perf_counter() - began
    if proc.returncode != 0:
        sys.exit(
            f"training child failed ({proc.returncode}) after peak RSS >= {hwm / GIB:.2f} GiB: "
            f"over the {a.budget_gib:g} GiB budget"
            if hwm > a.budget_gib * GIB
            else f"training child failed ({proc.returncode})"
        )
    found = json.loads(stdout.strip().splitlines()[-1])
    peak = found["peak_rss_bytes"]
    ratio = peak / (a.budget_gib * GIB)
    verdict = "met" if ratio < 1.0 else "NOT met"
    print(
        f"peak RSS / {a.budget_gib:g} GiB budget: {ratio:.2f} ({peak / GIB:.2f} GiB; "
        f"{model.name}, DPO LoRA, {a.batch_size} pairs x {a.tokens} tokens, {a.steps} steps, "
        f"gradient checkpointing {'on' if a.gradient_checkpointing else 'off'}, "
        f"{found['samples_per_s']:.2f} pairs/s, {wall:.0f} s in all; target < 1.0: {verdict})"
    )
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(
        json.dumps(
            {
                "model": str(model),
                "batch_size": a.batch_size,
                "tokens": a.tokens,
                "steps": a.steps,
                "threads": a.threads,
                "gradient_checkpointing": a.gradient_checkpointing,
                "mmap_threshold": a.mmap_threshold,
                "peak_rss_bytes": peak,
                "budget_bytes": a.budget_gib * GIB,
                "ratio": ratio,
                "samples_per_s": found["samples_per_s"],
                "wall_s": wall,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
