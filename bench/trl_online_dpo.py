"""TRL's online DPO on the "critical reviewer" task, for a wall-clock budget (``align_vs_trl``).

Run as a script (a process of its own, so that its threads and memory go away with it)::

    python bench/trl_online_dpo.py --model DIR --prompts FILE --budget-s 480 --out DIR

Trains a LoRA with ``trl.experimental.online_dpo.OnlineDPOTrainer`` (TRL 1.16): each step
samples two completions per prompt with ``model.generate``, scores both with a reward
*function* (-VADER compound of the completion), and takes one DPO step on the (better, worse)
pairs. Training stops at the first step end after ``--budget-s`` seconds of training wall time.
Writes the adapter to ``OUT/adapter`` and ``OUT/trl.json``: steps, samples (prompts with a
generated pair), wall time, samples/s and the per-step log.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any


def critic_reward(scorer: Any) -> Any:
    """A TRL reward function: negative VADER compound of each completion (prompt excluded)."""

    def neg_sentiment(completions: list[str], **_: Any) -> list[float]:
        return [-scorer.score(c) for c in completions]

    return neg_sentiment


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--prompts", type=Path, required=True)
    p.add_argument("--budget-s", type=float, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--batch-size", type=int, default=8, help="prompts per step")
    p.add_argument("--seed", type=int, default=0)
    # Training settings; ``align_vs_trl`` passes Tiller's own (from its align config).
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    p.add_argument("--layers", default="", help="LoRA on these layers only: '22,23,...'")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (TRL's bf16=True)")
    a = p.parse_args()

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    from tiller.learner.annotate.scorers import make_scorer

    class Budget(TrainerCallback):  # type: ignore[misc]
        """Stops training at the first step end once ``budget_s`` of training time is spent."""

        def __init__(self, budget_s: float) -> None:
            self.budget_s = budget_s
            self.began = 0.0
            self.ended = 0.0
            self.began_at = 0.0  # wall clock (time.time) at the start of training
            self.step_ends: list[float] = []

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.began = time.perf_counter()
            self.began_at = time.time()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            now = time.perf_counter()
            self.step_ends.append(now - self.began)
            print(f"trl step {state.global_step}: {now - self.began:.0f} s", flush=True)
            if now - self.began >= self.budget_s:
                control.should_training_stop = True

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.ended = time.perf_counter()

    torch.manual_seed(a.seed)
    prompts = [s.strip() for s in a.prompts.read_text().splitlines() if s.strip()]
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    args = OnlineDPOConfig(
        output_dir=str(a.out / "trainer"),
        per_device_train_batch_size=a.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=a.lr,
        lr_scheduler_type="constant",  # the budget, not a step count, ends the run
        warmup_steps=0,
        max_steps=1_000_000,
        beta=[a.beta],
        loss_type="sigmoid",
        max_new_tokens=48,
        max_length=128,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        repetition_penalty=1.2,
        bf16=a.bf16,
        fp16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=a.seed,
        disable_tqdm=True,
    )
    peft = LoraConfig(
        r=a.lora_r,
        lora_alpha=a.lora_alpha,
        lora_dropout=0.0,
        target_modules=a.targets.split(","),
        layers_to_transform=[int(x) for x in a.layers.split(",")] if a.layers else None,
        task_type="CAUSAL_LM",
    )
    budget = Budget(a.budget_s)
    trainer = OnlineDPOTrainer(
        model=model,
        reward_funcs=critic_reward(make_scorer("sentiment")),
        args=args,
        processing_class=tok,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        peft_config=peft,
        callbacks=[budget],
    )
    trainer.train()
    adapter = a.out / "adapter"
    trainer.model.save_pretrained(adapter, safe_serialization=True)
    steps = int(trainer.state.global_step)
    wall = budget.ended - budget.began
    samples = steps * a.batch_size
    logs = [h for h in trainer.state.log_history if "loss" in h]
    out = {
        "api": "trl.experimental.online_dpo.OnlineDPOTrainer",
        "budget_s": a.budget_s,
        "steps": steps,
        "batch_size": a.batch_size,
        "settings": {k: v for k, v in vars(a).items() if k not in ("model", "prompts", "out")},
        "samples": samples,
        "generations": 2 * samples,
        "wall_s": wall,
        "samples_per_s": samples / wall if wall > 0 else 0.0,
        "step_ends_s": budget.step_ends,
        "train_window": [budget.began_at, budget.began_at + wall],
        "adapter": str(adapter),
        "log": logs,
    }
    (a.out / "trl.json").write_text(json.dumps(out, indent=2, default=str))
    print(f"trl: {steps} steps, {samples} samples in {wall:.0f} s ({out['samples_per_s']:.3f}/s)")


if __name__ == "__main__":
    main()
