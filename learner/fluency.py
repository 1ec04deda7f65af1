"""Fluency under the base model: the perplexity of generated text given its prompt.

A policy that hacks its reward drifts into text the base model finds unlikely (glued tokens,
made-up words) or into repeats it finds too likely; both move this away from the base's own
value. Used by the learner's eval gate and by the held-out evaluation of ``tiller align``.

The base model scores on the learner's device in the dtype its trainer would use there
(``precision.inference_dtype``: bfloat16 where the device multiplies it natively), one copy per
process: callers that hold it at once (the gate, the CMPO trunk) share it, and it is freed when
the last of them lets go. Log-likelihoods accumulate in float32 whatever the model's dtype.
"""

from __future__ import annotations

import inspect
import math
import threading
import weakref
from pathlib import Path
from typing import Any

Scorer = tuple[Any, Any]  # (tokenizer, causal LM)

# Rows of logits turned into float32 log-probs at a time: [rows, vocab] float32 per step, so a
# long batch never needs a float32 copy of all its logits.
_LOGSOFTMAX_ROWS = 256

_lock = threading.Lock()
# (model dir, device, dtype) -> the loaded model, while anyone holds it.
_models: weakref.WeakValueDictionary[tuple[str, str, str], Any] = weakref.WeakValueDictionary()
_tokenizers: dict[str, Any] = {}


def load_scoring_model(
    model_dir: Path | str, *, device: str = "auto", precision: str = "auto"
) -> Scorer:
    """(tokenizer, model) of the base model for ``perplexity``, in eval mode.

    ``device`` and ``precision`` take ``TrainConfig``'s values (``precision.inference_device``,
    ``.inference_dtype``): by default CUDA when available, else the CPU, in bfloat16 where that
    device multiplies it natively and float32 elsewhere. A model already loaded in this process
    with the same directory, device and dtype is returned instead of a second copy.
    """
    from .precision import inference_device, inference_dtype

    dev = inference_device(device)
    dtype = inference_dtype(dev, precision)
    path = str(Path(model_dir).resolve())
    key = (path, str(dev), str(dtype))
    with _lock:  # one load per key even when two threads ask at once
        model = _models.get(key)
        if model is None:
            model = _load(path, dev, dtype)
            _models[key] = model
        if path not in _tokenizers:
            from transformers import AutoTokenizer

            _tokenizers[path] = AutoTokenizer.from_pretrained(path)
        return _tokenizers[path], model


def _load(path: str, device: Any, dtype: Any) -> Any:
    from transformers import AutoModelForCausalLM
    from transformers.utils import is_accelerate_available

    if device.type == "cuda" and is_accelerate_available():
        # Straight onto the GPU: no full host copy of the weights on the way.
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=str(device))
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    return model.eval()


def perplexity(scorer: Scorer, pairs: list[tuple[str, str]], batch_size: int = 16) -> float:
    """exp(mean NLL per token) of the completions given their prompts under the base model.

    Sequences run ``batch_size`` at a time, longest first and right-padded (a causal model's
    logits at real positions do not see the padding), since a forward per sequence is far
    slower. Only the logits that predict completion tokens are kept (``logits_to_keep`` where
    the model takes it), and they are turned into float32 log-probs a few rows at a time.
    """
    import torch

    tok, model = scorer
    device = next(model.parameters()).device
    seqs: list[tuple[list[int], int]] = []  # (prompt + completion ids, first scored position)
    for prompt, text in pairs:
        p = tok(prompt).input_ids
        c = tok(text, add_special_tokens=False).input_ids
        if c and len(p) + len(c) > max(len(p), 1):  # the first token of all has no prediction
            seqs.append((p + c, max(len(p), 1)))
    seqs.sort(key=lambda s: -len(s[0]))  # less padding per batch
    trims = "logits_to_keep" in inspect.signature(model.forward).parameters
    nll, count = 0.0, 0
    with torch.inference_mode():
        for begin in range(0, len(seqs), batch_size):
            chunk = seqs[begin : begin + batch_size]
            width = len(chunk[0][0])
            first = min(start for _, start in chunk) - 1  # earliest logits a target needs
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
            attn = torch.zeros_like(ids)
            for row, (seq, _) in enumerate(chunk):
                ids[row, : len(seq)] = torch.tensor(seq)
                attn[row, : len(seq)] = 1
            extra = {"logits_to_keep": width - first} if trims else {}
            logits = model(
                input_ids=ids.to(device), attention_mask=attn.to(device), use_cache=False, **extra
            ).logits
            off = width - logits.shape[1]  # logits[:, j] belong to position j + off
            rows = torch.cat(
                [logits[r, s - 1 - off : len(seq) - 1 - off] for r, (seq, s) in enumerate(chunk)]
            )
            targets = torch.tensor([t for seq, s in chunk for t in seq[s:]], device=device)
            nll -= _sum_logprobs(rows, targets)
            count += len(targets)
    return math.exp(nll / count) if count else math.nan


def _sum_logprobs(rows: Any, targets: Any) -> float:
    """Σ_i log softmax(rows)[i, targets[i]], in float32, ``_LOGSOFTMAX_ROWS`` rows at a time."""
    import torch

    total = 0.0
    for i in range(0, rows.shape[0], _LOGSOFTMAX_ROWS):
        part = torch.log_softmax(rows[i : i + _LOGSOFTMAX_ROWS].float(), dim=-1)
        total += float(part.gather(1, targets[i : i + _LOGSOFTMAX_ROWS, None]).sum())
    return total
