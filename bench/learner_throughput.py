"""Learner throughput: Tiller's DPO step vs TRL's DPOTrainer on CPU, one run (target >= 1.0).

Same model, LoRA (rank, alpha, dropout 0, q/k/v/o projections), preference pairs, batch size,
gradient accumulation, max length, learning rate and schedule, float32, gradient clipping at 1.0,
AdamW, same torch thread count, all in one process. Both take the reference log-probs from the
same model with its adapter disabled, computed at every step (TRL: ``peft_config`` given,
``ref_model=None``, ``precompute_ref_log_probs=False``). TRL's own defaults that Tiller does not
share are switched off: gradient checkpointing and bf16. samples/s = preference pairs trained /
wall time of the training loop (model loading and tokenisation excluded on both sides); one untimed
warm-up run each, then rounds in A B B A order; medians and the spread are reported.

    python bench/learner_throughput.py           # SmolLM2-135M, 8 steps x 4 pairs, 3 rounds
    python bench/learner_throughput.py --quick   # tiny random Llama, a smoke run
    python bench/learner_throughput.py --steps 6 --batch-size 8 --rounds 4
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from serve_throughput import cpu_ticks, resolve_model
from tqdm import tqdm

from tiller.learner.data.examples import PreferencePair
from tiller.learner.objectives.dpo import DPOConfig
from tiller.learner.trainer import TrainConfig, train

TARGET = 1.0
_TOPICS = (
    "a sourdough starter that stopped rising",
    "a Python virtual environment that cannot find its packages",
    "a bicycle chain that keeps slipping",
    "a tomato plant with yellow leaves",
    "a laptop that overheats during video calls",
    "a cat that refuses its new food",
    "a spreadsheet formula that returns the wrong total",
    "a dripping kitchen tap",
    "a cover letter for a first job",
    "a slow home Wi-Fi network",
    "a cast-iron pan that has started to rust",
    "a team meeting that always runs late",
)
_ASK = (
    "How should I deal with {t}?",
    "What is the best way to fix {t}?",
    "I need practical advice about {t}. Where do I start?",
    "Can you explain, step by step, what to do about {t}?",
)
_CONTEXT = (
    "I have already read a few guides but they contradict each other.",
    "I do not have special tools, only what most people keep at home.",
    "This has been going on for about two weeks now.",
    "I would prefer a solution that does not cost much money.",
    "Please keep it short enough that I can follow it on my phone.",
    "A friend suggested starting over, but I would rather not.",
    "I am a beginner, so please avoid jargon where you can.",
)
_HELPFUL = (
    "First, look closely at {t} and write down exactly when the problem appears.",
    "Most of the time the cause is simple, so check the obvious things before buying anything.",
    "Change one thing at a time, wait a day, and note whether it made a difference.",
    "If the problem comes back, compare what changed since the last time it worked well.",
    "Clean everything involved, because dirt and old residue cause more trouble than you expect.",
    "Keep the conditions steady, since sudden changes make it harder to see what helps.",
    "When you are unsure, a short test on a small part first avoids making things worse.",
    "After it works again, a small weekly routine will keep it from happening a second time.",
)
_UNHELPFUL = (
    "Honestly, {t} is not worth the effort.",
    "Just search the internet, there is plenty out there.",
    "I would throw it away and buy a new one.",
    "That sounds like your own fault, to be honest.",
    "It depends on a lot of things, so there is no real answer.",
    "Whatever you do, it will probably go wrong anyway.",
    "People complain about this all the time and nothing ever helps.",
    "Ask someone else, this is not really my area.",
)


def _grow(tok: Any, start: str, bank: tuple[str, ...], n: int, rng: random.Random, t: str) -> str:
    """``start`` plus sentences drawn from ``bank`` until it has at least ``n`` tokens."""
    text = start
    while len(tok(text, add_special_tokens=False).input_ids) < n:
        text += " " + rng.choice(bank).format(t=t)
    return text


def preference_pairs(
    tok: Any,
    n: int,
    prompt_tokens: tuple[int, int] = (32, 48),
    completion_tokens: tuple[int, int] = (56, 80),
    seed: int = 0,
) -> list[PreferencePair]:
    """``n`` plain-text helpful-vs-dismissive pairs; lengths (in ``tok`` tokens) drawn uniformly
    from the given ranges, so a pair's sequences are ~128 tokens with realistic padding."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        t = rng.choice(_TOPICS)
        user = _grow(
            tok, rng.choice(_ASK).format(t=t), _CONTEXT, rng.randint(*prompt_tokens), rng, t
        )
        c_len, r_len = rng.randint(*completion_tokens), rng.randint(*completion_tokens)
        pairs.append(
            PreferencePair(
                prompt=f"User: {user}\nAssistant:",
                chosen=_grow(tok, "", _HELPFUL, c_len, rng, t),
                rejected=_grow(tok, "", _UNHELPFUL, r_len, rng, t),
            )
        )
    return pairs


@dataclass(frozen=True)
class Settings:
    model: str
    steps: int
    batch_size: int
    grad_accum: int
    max_length: int
    lora_r: int
    lora_alpha: int
    target_modules: tuple[str, ...]
    lr: float
    beta: float
    threads: int
    seed: int


def tiller_run(s: Settings, pairs: list[PreferencePair], steps: int, work: Path) -> dict[str, Any]:
    cfg = TrainConfig(
        objective="dpo",
        objective_config=DPOConfig(beta=s.beta),
        lora_r=s.lora_r,
        lora_alpha=s.lora_alpha,
        lora_dropout=0.0,
        target_modules=s.target_modules,
        lr=s.lr,
        lr_schedule="linear",
        batch_size=s.batch_size,
        grad_accum=s.grad_accum,
        max_grad_norm=1.0,
        max_steps=steps,
        seed=s.seed,
        max_length=s.max_length,
        device="cpu",
        progress=False,
    )
    with tempfile.TemporaryDirectory(dir=work) as out:
        result = train(Path(s.model), pairs, cfg, Path(out))
    return {"samples_per_s": result.samples_per_s, "first_loss": result.history[0]["loss"]}


def trl_run(s: Settings, pairs: list[PreferencePair], steps: int, work: Path) -> dict[str, Any]:
    from datasets import Dataset, disable_progress_bar
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import DPOConfig as TRLDPOConfig
    from trl import DPOTrainer

    class Clock(TrainerCallback):  # type: ignore[misc]
        """Wall time from the start of the loop to the end of the last optimizer step."""

        def __init__(self) -> None:
            self.began = self.ended = 0.0
            self.losses: list[float] = []

        def on_train_begin(self, *a: Any, **k: Any) -> None:
            self.began = time.perf_counter()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            self.ended = time.perf_counter()

        def on_log(
            self, _args: Any, _state: Any, _control: Any, logs: Any = None, **k: Any
        ) -> None:
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    tok = AutoTokenizer.from_pretrained(s.model)
    disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(s.model, dtype=torch.float32)
    data = Dataset.from_list(
        [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs]
    )
    clock = Clock()
    with tempfile.TemporaryDirectory(dir=work) as out:
        args = TRLDPOConfig(
            output_dir=out,
            per_device_train_batch_size=s.batch_size,
            gradient_accumulation_steps=s.grad_accum,
            max_steps=steps,
            learning_rate=s.lr,
            lr_scheduler_type="linear",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=1.0,
            optim="adamw_torch",
            beta=s.beta,
            loss_type=["sigmoid"],
            max_length=s.max_length,
            precompute_ref_log_probs=False,
            gradient_checkpointing=False,
            bf16=False,
            fp16=False,
            use_cpu=True,
            seed=s.seed,
            report_to=[],
            save_strategy="no",
            logging_steps=steps,  # one log line at the end: the loss check below, no per-step cost
            disable_tqdm=True,
            dataloader_num_workers=0,
            dataloader_pin_memory=False,
        )
        peft = LoraConfig(
            r=s.lora_r,
            lora_alpha=s.lora_alpha,
            lora_dropout=0.0,
            target_modules=list(s.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )
        trainer = DPOTrainer(
            model=model,
            args=args,
            train_dataset=data,
            processing_class=tok,
            peft_config=peft,
            callbacks=[clock],
        )
        trainer.remove_callback(PrinterCallback)
        assert trainer.ref_model is None  # the reference is the adapter-disabled policy model
        trainer.train()
    per_step = s.batch_size * s.grad_accum
    return {
        "samples_per_s": steps * per_step / (clock.ended - clock.began),
        "mean_loss": clock.losses[-1] if clock.losses else None,
    }


RUNNERS = {"tiller": tiller_run, "trl": trl_run}


def phase(
    system: str, s: Settings, pairs: list[PreferencePair], steps: int, work: Path, rnd: int
) -> dict[str, Any]:
    busy0, ours0 = cpu_ticks(os.getpid())
    wall0 = time.perf_counter()
    result = RUNNERS[system](s, pairs, steps, work)
    busy1, ours1 = cpu_ticks(os.getpid())
    wall = time.perf_counter() - wall0
    other = 100 * ((busy1 - busy0) - (ours1 - ours0)) / os.sysconf("SC_CLK_TCK") / wall
    return {"system": system, "round": rnd, **result, "other_cpu_pct": other}


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="smollm2 | tiny | PATH")
    p.add_argument("--quick", action="store_true", help="tiny model, 3 steps, 2 rounds")
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps per run")
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4, help="pairs per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--pairs", type=int, default=96)
    p.add_argument("--rounds", type=int, default=3, help="A B B A ... rounds (one run each)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--out", type=Path, default=Path("bench/out/learner_throughput.json"))
    a = p.parse_args()
    if a.quick:
        a.model, a.steps, a.rounds, a.warmup_steps = "tiny", 3, 2, 1
    torch.set_num_threads(a.threads)
    s = Settings(
        model=str(resolve_model(a.model)),
        steps=a.steps,
        batch_size=a.batch_size,
        grad_accum=a.grad_accum,
        max_length=a.max_length,
        lora_r=8,
        lora_alpha=16,
        target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
        lr=1e-4,
        beta=0.1,
        threads=a.threads,
        seed=0,
    )
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-run "Loading weights" bars would drown the one below
    tok = AutoTokenizer.from_pretrained(s.model)
    pairs = preference_pairs(tok, a.pairs)
    lengths = [len(tok(x.prompt + y).input_ids) for x in pairs for y in (x.chosen, x.rejected)]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    work = a.out.with_suffix("")
    work.mkdir(parents=True, exist_ok=True)
    plan = [("tiller", -1, a.warmup_steps), ("trl", -1, a.warmup_steps)]
    for rnd in range(a.rounds):
        order = ("tiller", "trl") if rnd % 2 == 0 else ("trl", "tiller")
        plan += [(system, rnd, s.steps) for system in order]
    phases = []
    with tqdm(plan, desc="learner throughput", unit="run") as bar:
        for system, rnd, steps in bar:
            bar.set_postfix_str(f"{system} {'warm-up' if rnd < 0 else f'round {rnd}'}")
            phases.append(phase(system, s, pairs, steps, work, rnd))
            last = phases[-1]
            bar.write(
                f"{system} {'warm-up' if rnd < 0 else f'round {rnd}'}: "
                f"{last['samples_per_s']:.3g} samples/s "
                f"(other processes {last['other_cpu_pct']:.0f}% CPU)"
            )
    timed = [ph for ph in phases if ph["round"] >= 0]
    runs = {k: [ph["samples_per_s"] for ph in timed if ph["system"] == k] for k in RUNNERS}
    med = {k: statistics.median(v) for k, v in runs.items()}
    ratio = med["tiller"] / med["trl"]
    per_round = [
        next(ph["samples_per_s"] for ph in timed if ph["system"] == "tiller" and ph["round"] == r)
        / next(ph["samples_per_s"] for ph in timed if ph["system"] == "trl" and ph["round"] == r)
        for r in range(a.rounds)
    ]
    verdict = "met" if ratio >= TARGET else "NOT met"
    print(
        f"Tiller/TRL DPO samples/s ratio: {ratio:.2f} (tiller {med['tiller']:.3g}/s, trl "
        f"{med['trl']:.3g}/s; per-round ratios {min(per_round):.2f}..{max(per_round):.2f}; "
        f"target >= {TARGET:.1f}: {verdict})"
    )
    for k, v in runs.items():
        print(f"{k} samples/s per run: " + ", ".join(f"{x:.3g}" for x in v))
    print(
        f"setup: {Path(s.model).name}, {s.steps} steps x {s.batch_size} pairs x {s.grad_accum} "
        f"accum, LoRA r={s.lora_r}, {s.threads} threads, sequence tokens "
        f"{min(lengths)}..{max(lengths)} (mean {statistics.mean(lengths):.0f})"
    )
    if busy := [f"{ph['system']} r{ph['round']}" for ph in timed if ph["other_cpu_pct"] > 10]:
        print("warning: other processes took > 10% CPU during: " + ", ".join(busy))
    a.out.write_text(
        json.dumps(
            {
                "settings": asdict(s),
                "sequence_tokens": {
                    "min": min(lengths),
                    "max": max(lengths),
                    "mean": statistics.mean(lengths),
                },
                "phases": phases,
                "median_samples_per_s": med,
                "per_round_ratio": per_round,
                "ratio": ratio,
                "target": TARGET,
                "versions": _versions(),
            },
            indent=2,
        )
    )


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {k: version(k) for k in ("torch", "transformers", "peft", "trl")}


if __name__ == "__main__":
    main()
