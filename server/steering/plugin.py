"""The ``vllm.general_plugins`` entry point: registers the steering model classes.

vLLM calls ``register`` in every process it starts (front end, engine core, workers). The
classes are registered lazily ("module:Class"), so registering imports no model code.
"""

from __future__ import annotations

# Base architecture (config.json "architectures") -> the steering class that extends it.
STEER_ARCHITECTURES = {
    "LlamaForCausalLM": "TillerSteerLlamaForCausalLM",
    "Qwen2ForCausalLM": "TillerSteerQwen2ForCausalLM",
    "Qwen3ForCausalLM": "TillerSteerQwen3ForCausalLM",
}
_CLASSES = {
    "TillerSteerLlamaForCausalLM": "SteerLlamaForCausalLM",
    "TillerSteerQwen2ForCausalLM": "SteerQwen2ForCausalLM",
    "TillerSteerQwen3ForCausalLM": "SteerQwen3ForCausalLM",
}


def register() -> None:
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    for arch, cls in _CLASSES.items():
        if arch not in supported:
            ModelRegistry.register_model(arch, f"tiller.server.steering.models:{cls}")
