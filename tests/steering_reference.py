"""Pure-torch reference for attribute steering: a transformers model plus the same heads, with
CMPO Eq 3.1 written out (every W_j materialised, Σ_j λ_j·h·W_jᵀ, log-softmax)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from tiller.server.formats.heads import load_tensors, read_heads

NEAR_TIE = 1e-4  # float32 engine vs float32 torch agree to ~1e-6 per logprob
LOGPROB_TOL = 2e-4


class HeadsReference:
    def __init__(self, model_dir: Path, heads_dir: Path, adapter_dir: Path | None = None) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        if adapter_dir is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter_dir).eval()
        self.model = model
        self.manifest = read_heads(heads_dir)
        t = load_tensors(heads_dir)
        w0 = model.get_output_embeddings().weight.detach().float()
        self.heads: dict[str, torch.Tensor] = {}
        for h in self.manifest.heads:
            if h.kind == "base":
                self.heads[h.name] = w0
            elif h.kind == "lowrank":
                self.heads[h.name] = w0 + t[f"{h.name}.B"] @ t[f"{h.name}.A"]
            else:
                self.heads[h.name] = t[f"{h.name}.W"]

    def weights(self, given: dict[str, float]) -> dict[str, float]:
        """λ for every head: the given ones, 0 for the rest; the defaults when none given."""
        if not given:
            return {h.name: h.default_weight for h in self.manifest.heads}
        return {h.name: given.get(h.name, 0.0) for h in self.manifest.heads}

    def _trunk(self, ids: list[int]) -> torch.Tensor:
        m = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return m.model(torch.tensor([ids])).last_hidden_state[0, -1]

    @torch.no_grad()
    def logprobs(self, ids: list[int], given: dict[str, float]) -> torch.Tensor:
        """log softmax(Σ_j λ_j·h·W_jᵀ) for the next token after ``ids`` (full recompute)."""
        h = self._trunk(ids)
        lam = self.weights(given)
        logits = sum(lam[name] * (h @ w.T) for name, w in self.heads.items())
        assert isinstance(logits, torch.Tensor)
        return torch.log_softmax(logits, -1)

    def check(
        self,
        prompt_ids: Sequence[int],
        given: dict[str, float],
        got: Sequence[int],
        got_logprobs: Sequence[float] | None = None,
    ) -> int:
        """Teacher-forced check of a served greedy sequence: each token is the reference's argmax
        (except within ``NEAR_TIE`` of it), and each served logprob (when given) is within
        ``LOGPROB_TOL``. Returns the number of near-tie steps resolved differently."""
        flips = 0
        for k, token in enumerate(got):
            lp = self.logprobs([*prompt_ids, *got[:k]], given)
            best = int(lp.argmax())
            if token != best:
                gap = float(lp[best] - lp[token])
                assert gap < NEAR_TIE, f"step {k}: served {token}, reference {best} (gap {gap})"
                flips += 1
            if got_logprobs is not None:
                diff = abs(float(lp[token]) - got_logprobs[k])
                assert diff < LOGPROB_TOL, f"step {k}: logprob differs by {diff}"
        return flips
