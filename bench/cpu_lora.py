"""Serving a LoRA adapter on the CPU: tok/s with Tiller's grouped LoRA ops ÷ vLLM's own torch
ops (``TILLER_VLLM_CPU_LORA=0``), same adapter and load, one run, rounds alternating the order.

    python bench/cpu_lora.py [--model smollm2|tiny] [--requests 96] [--rounds 2]

The adapter has the learner's default shape for ``deploy/align`` (r=16 on q/k/v/o, all layers).
Lines (ratio first): adapter requests, grouped ÷ vLLM ops (target >= 1.2); with the grouped
ops, adapter requests ÷ base-model requests (what serving an adapter costs; no target).
"""

from __future__ import annotations

from pathlib import Path

from tiller_ab import Variant, ab, parse, settings

from tiller.server.formats.manifest import Manifest, write_manifest
from tiller.server.tools.tiny_model import build_random_lora

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")

if __name__ == "__main__":
    args = parse(__doc__ or "")
    s = settings(args)
    out = args.out or Path("bench/out/cpu_lora.json")
    adapter = out.with_suffix("") / "adapter"
    if not (adapter / "tiller-manifest.json").exists():
        model = Path(s.model)
        build_random_lora(model, adapter, seed=0, std=0.02, rank=16, targets=TARGETS)
        write_manifest(
            adapter, Manifest(name="lora", version=1, base_model=model.name, has_lora=True)
        )
    serve = ("--adapter", f"lora={adapter}", "--no-log")
    on_lora = {"adapter": "lora"}
    vllm_ops = Variant("vllm-ops", serve, on_lora, False, {"TILLER_VLLM_CPU_LORA": "0"})
    grouped = Variant("grouped", serve, on_lora, tiller_log=False)
    base = Variant("base", serve, {}, tiller_log=False)
    ab("adapter tok/s, grouped/vLLM ops ratio", vllm_ops, grouped, s, args.rounds, 1.2, out)
    cost = out.with_name(out.stem + "-vs-base.json")
    ab("adapter/base tok/s ratio (grouped ops)", base, grouped, s, args.rounds, 0.0, cost)
