"""vLLM model classes whose ``compute_logits`` also hands the hidden states to the steering
processor. Same weights, same forward, same logits as the classes they extend."""

from __future__ import annotations

import torch
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM

from .handoff import LAST


class SteerLlamaForCausalLM(LlamaForCausalLM):
    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        LAST.put(hidden_states)
        return super().compute_logits(hidden_states)


class SteerQwen2ForCausalLM(Qwen2ForCausalLM):
    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        LAST.put(hidden_states)
        return super().compute_logits(hidden_states)


class SteerQwen3ForCausalLM(Qwen3ForCausalLM):
    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        LAST.put(hidden_states)
        return super().compute_logits(hidden_states)
