"""Run-time mixing of feedback conditions inside vLLM (a V1 logits processor).

A mixed request runs as K sibling engine requests, one per feedback tag, each with
``SamplingParams.extra_args["tiller_mix"] = {"group", "member", "size", "weight"}`` and the same
seed. At every step, when all K siblings are in the batch with the same number of output tokens,
every sibling row is replaced by the mixture

    m = Σ_i w_i · log_softmax(logits_i)      (classifier-free-guidance style; w_i may be < 0)

so that all siblings sample the same token from identical rows and stay in lockstep. A token
that any condition forbids (-inf) stays forbidden. When lockstep is broken (a sibling preempted,
evicted, or behind), the present siblings get a *poison* row — a one-hot on a token that differs
per member — so the siblings' outputs diverge and the server detects it; a wrong mixture is
never emitted silently. Rows without ``tiller_mix`` are untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, process_dict_updates

EXTRA_KEY = "tiller_mix"


@dataclass(frozen=True)
class _Member:
    group: str
    member: int
    size: int
    weight: float
    output_ids: list[int]  # live reference to the request's output tokens


def mix_rows(logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_i w_i·log_softmax(logits_i) over rows; -inf in any row stays -inf. Shape (V,)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    banned = torch.isinf(logp).any(dim=0)
    mixed = (weights.view(-1, 1) * logp.masked_fill(torch.isinf(logp), 0.0)).sum(dim=0)
    return mixed.masked_fill(banned, float("-inf"))


def _member(params: Any, _prompt: Any, output_ids: list[int]) -> _Member | None:
    """A row's mixing state (``output_ids`` is vLLM's live list), or None if it does not mix."""
    spec = (params.extra_args or {}).get(EXTRA_KEY) if params else None
    if spec is None:
        return None
    return _Member(
        str(spec["group"]),
        int(spec["member"]),
        int(spec["size"]),
        float(spec["weight"]),
        output_ids,
    )


class FeedbackMixProcessor(LogitsProcessor):
    """Writes the mixed distribution into every sibling row of each complete mix group."""

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        spec = (sampling_params.extra_args or {}).get(EXTRA_KEY)
        if spec is None:
            return
        size, member = int(spec["size"]), int(spec["member"])
        if size < 1 or not 0 <= member < size:
            raise ValueError(f"{EXTRA_KEY}: member {member} outside group of size {size}")
        if not torch.isfinite(torch.tensor(float(spec["weight"]))):
            raise ValueError(f"{EXTRA_KEY}: weight must be finite")

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        self._rows: dict[int, _Member] = {}

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self._rows, batch_update, _member)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self._rows:
            return logits
        groups: dict[str, list[tuple[int, _Member]]] = {}
        for row, m in self._rows.items():
            if row < logits.shape[0]:
                groups.setdefault(m.group, []).append((row, m))
        for members in groups.values():
            size = members[0][1].size
            in_step = len({len(m.output_ids) for _, m in members}) == 1
            if len(members) == size and in_step:
                rows = torch.tensor([r for r, _ in members], device=logits.device)
                weights = torch.tensor([m.weight for _, m in members], device=logits.device)
                logits[rows] = mix_rows(logits[rows], weights).to(logits.dtype)
            else:
                for row, m in members:  # lockstep lost: make the siblings diverge visibly
                    logits[row] = float("-inf")
                    logits[row, m.member % logits.shape[1]] = 0.0
        return logits
