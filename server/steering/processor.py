"""Per-request attribute steering inside vLLM (a V1 logits processor), CMPO Eq 3.1.

A steered request carries ``SamplingParams.extra_args["tiller_steer"] = {"heads": DIR,
"weights": [λ_1..λ_k]}`` (DIR: a heads artifact, see ``heads.py``; λ in its head order). Its
logits row is replaced by

    Σ_j λ_j · h·W_jᵀ  =  c·(h·W_0ᵀ) + Σ_{j lowrank} λ_j·(h·A_jᵀ)·B_jᵀ + Σ_{j full} λ_j·h·W_jᵀ

where ``h·W_0ᵀ`` is the row vLLM computed, ``c`` the sum of λ over base and low-rank heads, and
``h`` the row's trunk hidden state handed over by the steering model class (``models.py``). A
token that an earlier processor forbade (-inf) stays forbidden. Rows without ``tiller_steer``
are not touched, and a batch without steered rows costs one dict lookup.

Heads are loaded in the worker the first time a request names them and kept (a few versions;
least recently used dropped). Thread-safety: used by the worker thread only.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, process_dict_updates

from ..formats.heads import HeadsManifest, load_tensors, read_heads
from .handoff import LAST

EXTRA_KEY = "tiller_steer"
MAX_CACHED_HEADS = 4


@dataclass(frozen=True)
class LoadedHeads:
    """One artifact, laid out for batched evaluation."""

    manifest: HeadsManifest
    shared: torch.Tensor  # [k]: 1 for heads containing W_0 (base, lowrank), else 0
    lowrank_A: torch.Tensor | None  # [R, H], all low-rank A_j stacked
    lowrank_B: torch.Tensor | None  # [V, R]
    lowrank_owner: torch.Tensor | None  # [R] head index of each rank column
    full_idx: torch.Tensor | None  # [kf] head indices of the full heads
    full_W: torch.Tensor | None  # [kf·V, H]

    @classmethod
    def load(cls, directory: Path, device: torch.device) -> LoadedHeads:
        manifest = read_heads(directory)
        t = load_tensors(directory)
        f32 = dict(device=device, dtype=torch.float32)
        shared = torch.tensor([h.kind != "full" for h in manifest.heads], **f32)
        lr = [(i, h) for i, h in enumerate(manifest.heads) if h.kind == "lowrank"]
        full = [i for i, h in enumerate(manifest.heads) if h.kind == "full"]
        a = b = owner = fi = fw = None
        if lr:
            a = torch.cat([t[f"{h.name}.A"] for _, h in lr]).to(**f32)
            b = torch.cat([t[f"{h.name}.B"] for _, h in lr], dim=1).to(**f32).contiguous()
            owner = torch.tensor([i for i, h in lr for _ in range(h.rank)], device=device)
        if full:
            fi = torch.tensor(full, device=device)
            fw = torch.cat([t[f"{manifest.heads[i].name}.W"] for i in full]).to(**f32)
        return cls(manifest, shared, a, b, owner, fi, fw)

    def mix(self, x: torch.Tensor, h: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """Σ_j λ_j·h·W_jᵀ for rows ``x`` = h·W_0ᵀ [n, V], hidden ``h`` [n, H], ``lam`` [n, k]."""
        c = (lam @ self.shared).unsqueeze(1)
        if self.full_W is None and bool((c > 0).all()):
            # Fast path (two passes over the rows): c > 0 keeps -inf at -inf by itself.
            out = x * c
            if self.lowrank_A is not None:
                assert self.lowrank_B is not None and self.lowrank_owner is not None
                z = (h @ self.lowrank_A.T) * lam[:, self.lowrank_owner]
                out = torch.addmm(out, z, self.lowrank_B.T)
            return out
        forbidden = torch.isneginf(x)
        out = x.masked_fill(forbidden, 0.0) * c
        if self.lowrank_A is not None:
            assert self.lowrank_B is not None and self.lowrank_owner is not None
            z = (h @ self.lowrank_A.T) * lam[:, self.lowrank_owner]
            out += z @ self.lowrank_B.T
        if self.full_W is not None:
            assert self.full_idx is not None
            n, kf = h.shape[0], self.full_idx.shape[0]
            y = (h @ self.full_W.T).view(n, kf, -1)
            out += torch.einsum("nk,nkv->nv", lam[:, self.full_idx], y)
        return out.masked_fill(forbidden, float("-inf"))


@dataclass(frozen=True)
class _Row:
    heads: str
    weights: torch.Tensor  # [k]


def parse_spec(spec: Any) -> tuple[str, tuple[float, ...]]:
    """``(heads dir, weights)`` from an ``extra_args`` entry; ValueError if malformed."""
    try:
        heads, weights = str(spec["heads"]), tuple(float(w) for w in spec["weights"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{EXTRA_KEY} must be {{'heads': DIR, 'weights': [...]}}: {e}") from e
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"{EXTRA_KEY}: weights must be finite")
    return heads, weights


class SteerProcessor(LogitsProcessor):
    """Replaces each steered row with its request's weighted sum of attribute heads."""

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        spec = (sampling_params.extra_args or {}).get(EXTRA_KEY)
        if spec is not None:
            parse_spec(spec)

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        self._device = device
        self._rows: dict[int, _Row] = {}
        self._heads: OrderedDict[str, LoadedHeads] = OrderedDict()
        # Per heads artifact: (row indices, λ rows), rebuilt only when the batch changes.
        self._plan: list[tuple[LoadedHeads, torch.Tensor, torch.Tensor, int]] | None = None

    def is_argmax_invariant(self) -> bool:
        return False

    def _loaded(self, key: str) -> LoadedHeads:
        heads = self._heads.get(key)
        if heads is None:
            heads = LoadedHeads.load(Path(key), self._device)
            self._heads[key] = heads
            while len(self._heads) > MAX_CACHED_HEADS:
                self._heads.popitem(last=False)
        self._heads.move_to_end(key)
        return heads

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is not None:
            self._plan = None
            process_dict_updates(self._rows, batch_update, self._row)

    def _row(self, params: Any, _prompt: Any, _output: Any) -> _Row | None:
        spec = (params.extra_args or {}).get(EXTRA_KEY) if params else None
        if spec is None:
            return None
        key, weights = parse_spec(spec)
        k = len(self._loaded(key).manifest.heads)
        if len(weights) != k:
            raise ValueError(f"{EXTRA_KEY}: {len(weights)} weights for {k} heads in {key}")
        w = torch.tensor(weights, dtype=torch.float32, device=self._device)
        return _Row(key, w)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self._rows:
            return logits
        hidden = LAST.hidden
        if hidden is None or hidden.shape[0] != logits.shape[0]:
            raise RuntimeError(
                "steering: hidden states do not match the logits rows "
                f"({None if hidden is None else tuple(hidden.shape)} vs {tuple(logits.shape)}); "
                "is the model served through a Tiller steering architecture?"
            )
        if self._plan is None:
            self._plan = self._make_plan()
        for heads, idx, lam, last in self._plan:
            if last >= logits.shape[0]:  # rows beyond this step's batch: plan per row
                keep = idx < logits.shape[0]
                idx, lam = idx[keep], lam[keep]
            h = hidden[idx].to(torch.float32)
            logits[idx] = heads.mix(logits[idx].float(), h, lam).to(logits.dtype)
        return logits

    def _make_plan(self) -> list[tuple[LoadedHeads, torch.Tensor, torch.Tensor, int]]:
        groups: dict[str, list[tuple[int, _Row]]] = {}
        for row, r in sorted(self._rows.items()):
            groups.setdefault(r.heads, []).append((row, r))
        return [
            (
                self._loaded(key),
                torch.tensor([row for row, _ in members], device=self._device),
                torch.stack([r.weights for _, r in members]),
                members[-1][0],
            )
            for key, members in groups.items()
        ]
