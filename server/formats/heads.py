"""The steering-heads artifact: k attribute LM heads over the base model's trunk (CMPO Eq 3.1).

Layout: two files in a directory — normally an adapter version directory (beside or instead
of the LoRA weights), so that the version's ``tiller-manifest.json`` hashes them and its
``attributes`` list the same names in the same order::

    tiller-heads.json      manifest (below)
    heads.safetensors      tensors, named "<attribute>.A", "<attribute>.B", "<attribute>.W"

Manifest (JSON)::

    {"format": 1, "base_model": "SmolLM2-135M-Instruct", "hidden_size": 576, "vocab_size": 49152,
     "dtype": "float32",
     "attributes": [
        {"name": "base",        "kind": "base",    "default_weight": 1.0},
        {"name": "helpfulness", "kind": "lowrank", "rank": 8, "default_weight": 0.0},
        {"name": "verbosity",   "kind": "full",    "default_weight": 0.0}]}

Head kinds, with ``W_0`` the base model's own LM head (shape ``[vocab, hidden]``):

- ``base``: ``W_j = W_0`` (no tensors).
- ``lowrank``: ``W_j = W_0 + B_j·A_j`` with ``<name>.A`` of shape ``[rank, hidden]`` and
  ``<name>.B`` of shape ``[vocab, rank]``.
- ``full``: ``W_j = <name>.W`` of shape ``[vocab, hidden]``.

A request's logits are ``Σ_j λ_j · h·W_jᵀ`` (h: the trunk's last hidden state, after the final
norm), then the usual softmax/sampling. Weights are used as given: no normalisation.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .errors import InvalidArgument

if TYPE_CHECKING:
    import torch

HEADS_MANIFEST = "tiller-heads.json"
HEADS_FILE = "heads.safetensors"
Kind = Literal["base", "lowrank", "full"]
KINDS: tuple[Kind, ...] = ("base", "lowrank", "full")


class HeadsError(InvalidArgument):
    """A heads artifact is missing, malformed, or does not fit the served model."""


@dataclass(frozen=True)
class HeadSpec:
    name: str
    kind: Kind
    rank: int = 0
    default_weight: float = 0.0


@dataclass(frozen=True)
class HeadsManifest:
    base_model: str
    hidden_size: int
    vocab_size: int
    heads: tuple[HeadSpec, ...]
    dtype: str = "float32"

    def __post_init__(self) -> None:
        names = [h.name for h in self.heads]
        if not names:
            raise HeadsError("heads manifest has no attributes")
        if len(set(names)) != len(names):
            raise HeadsError(f"heads manifest has duplicate attributes: {names}")
        for h in self.heads:
            if not h.name or "." in h.name:
                raise HeadsError(f"attribute name {h.name!r} must be non-empty without '.'")
            if h.kind not in KINDS:
                raise HeadsError(
                    f"attribute {h.name!r}: kind {h.kind!r} is not one of: {', '.join(KINDS)}"
                )
            if h.kind == "lowrank" and h.rank < 1:
                raise HeadsError(f"attribute {h.name!r}: a lowrank head needs rank >= 1")
            if not math.isfinite(h.default_weight):
                raise HeadsError(f"attribute {h.name!r}: default_weight must be finite")
        if self.hidden_size < 1 or self.vocab_size < 1:
            raise HeadsError("heads manifest: hidden_size and vocab_size must be >= 1")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(h.name for h in self.heads)

    @property
    def default_weights(self) -> tuple[float, ...]:
        return tuple(h.default_weight for h in self.heads)

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Tensor name -> shape that ``heads.safetensors`` must hold (exactly these)."""
        out: dict[str, tuple[int, ...]] = {}
        for h in self.heads:
            if h.kind == "lowrank":
                out[f"{h.name}.A"] = (h.rank, self.hidden_size)
                out[f"{h.name}.B"] = (self.vocab_size, h.rank)
            elif h.kind == "full":
                out[f"{h.name}.W"] = (self.vocab_size, self.hidden_size)
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "format": 1,
            "base_model": self.base_model,
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "dtype": self.dtype,
            "attributes": [
                {"name": h.name, "kind": h.kind, "rank": h.rank, "default_weight": h.default_weight}
                for h in self.heads
            ],
        }


def parse_heads_manifest(data: Mapping[str, Any]) -> HeadsManifest:
    try:
        if int(data.get("format", 1)) != 1:
            raise HeadsError(f"heads manifest format {data['format']} is not supported (1)")
        return HeadsManifest(
            base_model=str(data.get("base_model", "")),
            hidden_size=int(data["hidden_size"]),
            vocab_size=int(data["vocab_size"]),
            dtype=str(data.get("dtype", "float32")),
            heads=tuple(
                HeadSpec(
                    name=str(a["name"]),
                    kind=a["kind"],
                    rank=int(a.get("rank", 0)),
                    default_weight=float(a.get("default_weight", 0.0)),
                )
                for a in data["attributes"]
            ),
        )
    except KeyError as e:
        raise HeadsError(f"heads manifest is missing field {e.args[0]!r}") from e
    except (TypeError, ValueError) as e:
        raise HeadsError(f"heads manifest is malformed: {e}") from e


def has_heads(directory: Path) -> bool:
    return (directory / HEADS_MANIFEST).is_file()


def attach_heads(
    version_dir: Path,
    attributes: tuple[str, ...],
    dims: tuple[int, int] | None,
) -> HeadsManifest | None:
    """The heads an adapter version ships, checked against its manifest's ``attributes`` and
    the served model's ``dims`` (hidden, vocab; None: the model cannot serve heads)."""
    if not has_heads(version_dir):
        return None
    heads = read_heads(version_dir)
    if attributes and attributes != heads.names:
        raise HeadsError(
            f"{version_dir}: manifest attributes {list(attributes)} differ from the heads' "
            f"{list(heads.names)}"
        )
    if dims is None:
        raise HeadsError(
            f"{version_dir} ships steering heads, but the served model's architecture has no "
            "steering support (Llama, Qwen2, Qwen3)"
        )
    check_fits(heads, *dims, where=str(version_dir))
    return heads


def read_heads(directory: Path) -> HeadsManifest:
    """Read the manifest and check the safetensors header against it (no tensor is loaded)."""
    from safetensors import safe_open

    try:
        manifest = parse_heads_manifest(json.loads((directory / HEADS_MANIFEST).read_text()))
    except FileNotFoundError as e:
        raise HeadsError(f"no {HEADS_MANIFEST} in {directory}") from e
    except json.JSONDecodeError as e:
        raise HeadsError(f"{directory / HEADS_MANIFEST} is not valid JSON: {e}") from e
    want = manifest.expected_shapes()
    have: dict[str, tuple[int, ...]] = {}
    path = directory / HEADS_FILE
    if want or path.exists():
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    have[key] = tuple(f.get_slice(key).get_shape())
        except FileNotFoundError as e:
            raise HeadsError(f"{path} is missing") from e
        except Exception as e:
            raise HeadsError(f"{path} is not a readable safetensors file: {e}") from e
    if have != want:
        diff = sorted(
            f"{k}: expected {want.get(k)}, found {have.get(k)}"
            for k in set(want) | set(have)
            if want.get(k) != have.get(k)
        )
        raise HeadsError(f"{path} does not match its manifest: {'; '.join(diff)}")
    return manifest


def check_fits(manifest: HeadsManifest, hidden_size: int, vocab_size: int, where: str) -> None:
    """The heads must have the served model's hidden and vocabulary sizes."""
    if (manifest.hidden_size, manifest.vocab_size) != (hidden_size, vocab_size):
        raise HeadsError(
            f"heads in {where} are for hidden_size {manifest.hidden_size}, vocab_size "
            f"{manifest.vocab_size}; the served model has {hidden_size}, {vocab_size}"
        )


def load_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """All head tensors of ``directory`` (CPU)."""
    from safetensors.torch import load_file

    path = directory / HEADS_FILE
    return load_file(str(path)) if path.exists() else {}


def save_heads(
    directory: Path, manifest: HeadsManifest, tensors: Mapping[str, torch.Tensor]
) -> Path:
    """Write an artifact; checks tensor names/shapes against the manifest first."""
    from safetensors.torch import save_file

    want = manifest.expected_shapes()
    have = {k: tuple(v.shape) for k, v in tensors.items()}
    if have != want:
        raise HeadsError(f"tensors {have} do not match the manifest's {want}")
    directory.mkdir(parents=True, exist_ok=True)
    if tensors:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / HEADS_FILE))
    (directory / HEADS_MANIFEST).write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
    return directory


def resolve_weights(
    manifest: HeadsManifest, given: tuple[tuple[str, float], ...]
) -> tuple[float, ...]:
    """λ in head order. No weights given: the manifest's defaults; otherwise the given weights,
    and 0 for attributes the request does not name (the request replaces the defaults)."""
    if not given:
        return manifest.default_weights
    by_name = dict(given)
    unknown = sorted(set(by_name) - set(manifest.names))
    if unknown:
        raise InvalidArgument(
            f"unknown attribute {unknown[0]!r}; valid: {', '.join(manifest.names)}",
            field="attributes",
        )
    return tuple(float(by_name.get(n, 0.0)) for n in manifest.names)


def is_identity(manifest: HeadsManifest, weights: tuple[float, ...]) -> bool:
    """True when ``weights`` put exactly 1 on one ``base`` head and 0 elsewhere: the base model."""
    hot = [i for i, w in enumerate(weights) if w != 0.0]
    return len(hot) == 1 and weights[hot[0]] == 1.0 and manifest.heads[hot[0]].kind == "base"
