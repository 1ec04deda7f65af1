"""Learner memory: peak RSS of a SmolLM2-135M LoRA DPO run, batch 16 pairs x 128 tokens, on CPU,
against a 6 GiB budget (target: ratio < 1.0).

The run goes through Tiller's ``train()`` in a child process (float32, grad_accum 1, so all 32
sequences of a step are in one forward pass, with the reference pass alongside; gradient
checkpointing on unless ``--no-gradient-checkpointing``); every sequence is exactly ``--tokens``
long (prompts are cut on the left to fit). Peak RSS is the child's
``ru_maxrss``: model loading, tokenisation, training and saving the adapter all count.

``--fluency`` adds the eval gate's fluency check (``learner.fluency``: load the base model, score
``--fluency-pairs`` gate-like prompt + completion pairs in batches of 16) and prints its peak RSS
against the old way measured in the same run, each in its own child: the old way loaded a
float32 copy on the host and took float32 logits of whole batches; the new one loads on the
learner's device in its dtype (``--fluency-device``, ``--fluency-precision``).

    python bench/learner_memory.py                    # SmolLM2-135M, 16 x 128, 3 steps
    python bench/learner_memory.py --model tiny --steps 2
    python bench/learner_memory.py --no-train --fluency   # the gate's fluency check only
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


def _old_fluency(model_dir: Path, pairs: list[tuple[str, str]], batch_size: int) -> float:
    """The gate's fluency check as it was: float32 on the host, float32 logits of whole batches."""
    import math

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    seqs = []
    for prompt, text in pairs:
        p, c = tok(prompt).input_ids, tok(text, add_special_tokens=False).input_ids
        if c:
            seqs.append((p + c, len(p)))
    nll, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(seqs), batch_size):
            chunk = seqs[start : start + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
            attn = torch.zeros_like(ids)
            target = torch.full_like(ids, -100)
            for row, (seq, plen) in enumerate(chunk):
                ids[row, : len(seq)] = torch.tensor(seq)
                attn[row, : len(seq)] = 1
                target[row, plen : len(seq)] = torch.tensor(seq[plen:])
            logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
            labels = target[:, 1:]
            nll += float(
                torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]).float(),
                    labels.reshape(-1),
                    reduction="sum",
                )
            )
            count += int((labels != -100).sum())
    return math.exp(nll / count)


def fluency_child(a: argparse.Namespace) -> None:
    """One gate fluency check, the ``--child-fluency`` way (old or new); prints its peak RSS."""
    import torch
    from learner_throughput import preference_pairs
    from transformers import AutoTokenizer

    from tiller.learner.fluency import load_scoring_model, perplexity

    torch.set_num_threads(a.threads)
    tok = AutoTokenizer.from_pretrained(a.model)
    pairs = [
        (p.prompt, p.chosen)
        for p in preference_pairs(
            tok, a.fluency_pairs, prompt_tokens=(48, 96), completion_tokens=(96, 192)
        )
    ]
    began = time.perf_counter()
    if a.child_fluency == "old":
        where, ppl = "float32 on cpu", _old_fluency(Path(a.model), pairs, 16)
    else:
        scorer = load_scoring_model(
            Path(a.model), device=a.fluency_device, precision=a.fluency_precision
        )
        model = scorer[1]
        where = f"{str(model.dtype).removeprefix('torch.')} on {next(model.parameters()).device}"
        ppl = perplexity(scorer, pairs, batch_size=16)
    seconds = time.perf_counter() - began
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    cuda = torch.cuda.max_memory_allocated() if torch.cuda.is_initialized() else 0
    print(
        json.dumps(
            {
                "peak_rss_bytes": peak,
                "peak_cuda_bytes": cuda,
                "perplexity": ppl,
                "where": where,
                "seconds": seconds,
            }
        )
    )


def _run_child(cmd: list[str], env: dict[str, str]) -> tuple[int, str, int]:
    """(exit status, stdout, peak RSS seen by polling) of a child process."""
    with tempfile.TemporaryFile("w+") as report:
        proc = subprocess.Popen(cmd, stdout=report, text=True, env=env)
        hwm = 0  # the child's VmHWM, polled in case it is killed (OOM) before it reports
        while proc.poll() is None:
            hwm = max(hwm, _vm_hwm(proc.pid))
            time.sleep(0.5)
        report.seek(0)
        return proc.returncode, report.read(), hwm


def fluency(a: argparse.Namespace, model: Path, env: dict[str, str]) -> dict[str, object]:
    """The gate's fluency check, old and new, each in its own child; prints the ratio line."""
    found = {}
    for way in ("old", "new"):
        cmd = [sys.executable, __file__, "--child-fluency", way, "--model", str(model)]
        cmd += ["--threads", str(a.threads), "--fluency-pairs", str(a.fluency_pairs)]
        cmd += ["--fluency-device", a.fluency_device, "--fluency-precision", a.fluency_precision]
        rc, stdout, hwm = _run_child(cmd, env)
        if rc != 0:
            sys.exit(f"fluency child ({way}) failed ({rc}) after peak RSS >= {hwm / GIB:.2f} GiB")
        found[way] = json.loads(stdout.strip().splitlines()[-1])
    new, old = found["new"], found["old"]
    ratio = new["peak_rss_bytes"] / old["peak_rss_bytes"]
    cuda = (
        f", new peak CUDA {new['peak_cuda_bytes'] / GIB:.2f} GiB" if new["peak_cuda_bytes"] else ""
    )
    print(
        f"gate fluency peak RSS new/old: {ratio:.2f} (new {new['peak_rss_bytes'] / GIB:.2f} GiB, "
        f"{new['where']}; old {old['peak_rss_bytes'] / GIB:.2f} GiB, {old['where']}{cuda}; "
        f"{model.name}, {a.fluency_pairs} pairs in batches of 16; perplexity new "
        f"{new['perplexity']:.3f} vs old {old['perplexity']:.3f}; {new['seconds']:.1f} s vs "
        f"{old['seconds']:.1f} s)"
    )
    return {"ratio": ratio, "pairs": a.fluency_pairs, "new": new, "old": old}


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
    p.add_argument(
        "--train",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure the training run (the budgeted figure)",
    )
    p.add_argument(
        "--fluency",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also measure the gate's fluency check, new against old",
    )
    p.add_argument("--fluency-pairs", type=int, default=64, help="pairs the fluency check scores")
    p.add_argument("--fluency-device", default="auto", help="auto | cpu | cuda (new way)")
    p.add_argument("--fluency-precision", default="auto", help="auto | fast | fp32 | bf16 (new)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child-fluency", choices=("old", "new"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a)
    if a.child_fluency:
        return fluency_child(a)
    from serve_throughput import resolve_model

    model = resolve_model(a.model)  # converts SmolLM2 here, so the child's peak is training only
    env = dict(os.environ)
    if a.mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(a.mmap_threshold)
    results: dict[str, object] = {"model": str(model), "threads": a.threads}
    if a.train:
        results.update(train_memory(a, model, env))
    if a.fluency:
        results["fluency"] = fluency(a, model, env)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(results, indent=2))


def train_memory(a: argparse.Namespace, model: Path, env: dict[str, str]) -> dict[str, object]:
    """The training run in a child; prints the budget line and returns the figures."""
    cmd = [sys.executable, __file__, "--child", "--model", str(model)]
    for flag in ("batch_size", "tokens", "steps", "threads"):
        cmd += [f"--{flag.replace('_', '-')}", str(getattr(a, flag))]
    if not a.gradient_checkpointing:
        cmd.append("--no-gradient-checkpointing")
    began = time.perf_counter()
    rc, stdout, hwm = _run_child(cmd, env)
    wall = time.perf_counter() - began
    if rc != 0:
        sys.exit(
            f"training child failed ({rc}) after peak RSS >= {hwm / GIB:.2f} GiB: "
            f"over the {a.budget_gib:g} GiB budget"
            if hwm > a.budget_gib * GIB
            else f"training child failed ({rc})"
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
    return {
        "batch_size": a.batch_size,
        "tokens": a.tokens,
        "steps": a.steps,
        "gradient_checkpointing": a.gradient_checkpointing,
        "mmap_threshold": a.mmap_threshold,
        "peak_rss_bytes": peak,
        "budget_bytes": a.budget_gib * GIB,
        "ratio": ratio,
        "samples_per_s": found["samples_per_s"],
        "wall_s": wall,
    }


if __name__ == "__main__":
    main()
