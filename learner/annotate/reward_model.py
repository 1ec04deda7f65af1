"""A local reward model as an offline scorer: ``rm:<dir>`` wherever a scorer name is accepted.

``<dir>`` is any transformers directory that ``AutoModelForSequenceClassification`` loads (its
``config.json`` names a ``*ForSequenceClassification`` architecture) with its tokenizer. The
score of a text is the model's logit for it: the only one for a one-label reward model, else
the logit of ``label`` (default: the last label). Settings follow a ``?``, joined by ``&``::

    scorer = "rm:/models/my-rm?label=0&batch_size=8&max_length=256&device=cpu"

============  =======  ==========================================================
key           default  meaning
============  =======  ==========================================================
label         last     which logit is the score (models with several labels)
batch_size    16       texts per forward pass
max_length    512      tokens kept per text (the tokenizer's truncation side)
device        auto     ``auto`` (CUDA when available, else the CPU), ``cpu``, ``cuda``
============  =======  ==========================================================

Only the response text is scored, without its prompt. The model runs in bfloat16 on a CUDA
device that supports it and in float32 elsewhere (the trainer's ``auto`` precision). A relative
``<dir>`` is resolved against the working directory when the name is checked.

``parse_spec`` checks a name without importing torch or loading weights (configs call it);
``load`` builds the scorer once per model directory and settings. The scorer is thread-safe:
calls are serialised by a lock (the annotator's providers share one instance).
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PREFIX = "rm:"
DEVICES = ("auto", "cpu", "cuda")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass(frozen=True)
class RewardModelSpec:
    """A parsed ``rm:`` scorer name (module docstring); ``label=None``: the last label."""

    path: Path
    label: int | None = None
    batch_size: int = 16
    max_length: int = 512
    device: str = "auto"


def _options(name: str, query: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in filter(None, query.split("&")):
        key, eq, value = item.partition("=")
        if key == "device":
            if value not in DEVICES:
                raise ValueError(f"scorer {name!r}: device must be one of {', '.join(DEVICES)}")
            out[key] = value
        elif key in ("label", "batch_size", "max_length"):
            try:
                out[key] = int(value)
            except ValueError:
                raise ValueError(
                    f"scorer {name!r}: {key} must be an integer, got {value!r}"
                ) from None
            if out[key] < (0 if key == "label" else 1):
                raise ValueError(f"scorer {name!r}: {key} must be >= {0 if key == 'label' else 1}")
        else:
            raise ValueError(
                f"scorer {name!r}: unknown setting {key!r}"
                f"{'' if eq else ' (expected key=value)'}; valid: batch_size, device, label, "
                "max_length"
            )
    return out


def _num_labels(config: dict[str, Any]) -> int:
    if isinstance(config.get("num_labels"), int):
        return int(config["num_labels"])
    id2label = config.get("id2label")
    return len(id2label) if isinstance(id2label, dict) and id2label else 2  # transformers' default


def parse_spec(name: str) -> RewardModelSpec:
    """The settings of ``rm:<dir>[?key=value&...]``, after checking that ``<dir>`` holds a
    sequence-classification model and a tokenizer (no weights are read). ``ValueError`` naming
    the scorer, the directory and what is wrong otherwise."""
    if not name.startswith(PREFIX):
        raise ValueError(f"scorer {name!r}: a reward-model scorer is named rm:<model dir>")
    path_text, _, query = name[len(PREFIX) :].partition("?")
    if not path_text:
        raise ValueError(f"scorer {name!r}: no model directory after {PREFIX!r}")
    path = Path(path_text).expanduser().resolve()
    where = f"scorer {name!r}: reward model directory {path}"
    if not path.is_dir():
        raise ValueError(f"{where} does not exist or is not a directory")
    try:
        config = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise ValueError(f"{where} has no config.json (not a transformers model)") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{where}: config.json unreadable: {e}") from None
    archs = config.get("architectures") or []
    if archs and not any(str(a).endswith("ForSequenceClassification") for a in archs):
        raise ValueError(
            f"{where} holds {', '.join(map(str, archs))}, not a *ForSequenceClassification "
            "model (loading it would add an untrained score head)"
        )
    if not any((path / f).exists() for f in _TOKENIZER_FILES):
        raise ValueError(f"{where} has no tokenizer ({', '.join(_TOKENIZER_FILES)})")
    spec = RewardModelSpec(path=path, **_options(name, query))
    n = _num_labels(config)
    if spec.label is not None and spec.label >= n:
        raise ValueError(f"scorer {name!r}: label {spec.label} out of range; the model has {n}")
    return spec


class RewardModelScorer:
    """``score(text)``: the reward model's logit for ``text``; ``score_batch(texts)``: the same
    for each text, ``spec.batch_size`` per forward pass. ``ValueError`` naming the directory
    when the model or tokenizer cannot be loaded; ``ImportError`` without torch/transformers."""

    def __init__(self, spec: RewardModelSpec) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from ..precision import native_bf16

        self.name = f"{PREFIX}{spec.path}"
        self.spec = spec
        auto = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(auto if spec.device == "auto" else spec.device)
        use_bf16 = self.device.type == "cuda" and native_bf16(self.device)
        dtype = torch.bfloat16 if use_bf16 else torch.float32
        try:
            tokenizer: Any = AutoTokenizer.from_pretrained(spec.path)
            model: Any = AutoModelForSequenceClassification.from_pretrained(spec.path, dtype=dtype)
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"reward model directory {spec.path}: cannot load: {e}") from e
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ValueError(f"reward model directory {spec.path}: no pad or eos token")
            tokenizer.pad_token = tokenizer.eos_token
        # Decoder classifiers pool the last non-pad token and need to know which id pads.
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        n = int(model.config.num_labels)
        self.label = n - 1 if spec.label is None else spec.label
        if not 0 <= self.label < n:
            raise ValueError(f"reward model directory {spec.path}: label {self.label} of {n}")
        # A text with no tokens (an empty one, without a BOS) is scored as this one token.
        self._empty = [
            next(t for t in (tokenizer.bos_token_id, tokenizer.pad_token_id) if t is not None)
        ]
        self._torch: Any = torch
        self._tokenizer = tokenizer
        self._model = model.to(self.device).eval()
        self._lock = threading.Lock()

    def score(self, text: str) -> float:
        return self.score_batch([text])[0]

    def score_batch(self, texts: Sequence[str]) -> list[float]:
        """One float per text, in order; a text scores the same (to float rounding) alone or in
        any batch."""
        out: list[float] = []
        with self._lock, self._torch.inference_mode():
            for i in range(0, len(texts), self.spec.batch_size):
                logits = self._model(**self._encode(texts[i : i + self.spec.batch_size])).logits
                out.extend(float(v) for v in logits[:, self.label].float().cpu())
        return out

    def _encode(self, texts: Sequence[str]) -> dict[str, Any]:
        torch = self._torch
        ids = self._tokenizer(list(texts), truncation=True, max_length=self.spec.max_length)
        rows = [r or self._empty for r in ids["input_ids"]]
        width = max(map(len, rows))
        # Right padding: a causal model's real tokens never attend to it; the classifier pools
        # the last non-pad token.
        input_ids = torch.full((len(rows), width), self._tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for k, r in enumerate(rows):
            input_ids[k, : len(r)] = torch.tensor(r)
            mask[k, : len(r)] = 1
        return {"input_ids": input_ids.to(self.device), "attention_mask": mask.to(self.device)}


@functools.cache
def _load(spec: RewardModelSpec) -> RewardModelScorer:
    return RewardModelScorer(spec)


def load(name: str) -> RewardModelScorer:
    """The scorer for ``rm:`` name ``name``, loaded once per process for each directory and
    settings (two spellings of one path share it). Errors as ``parse_spec`` and the scorer."""
    return _load(parse_spec(name))
