"""Annotator configuration: a TOML file turned into frozen dataclasses at the CLI edge.
Every key, its type and default: ``docs/config-reference.md``.

Example::

    db = "~/.cache/tiller/log/generations.sqlite"
    batch_size = 32

    [[providers]]
    name = "sentiment-tags"
    type = "quantile"
    scorer = "sentiment"
    mode = "per_prompt"
    tags = ["Most Negative", "Negative", "Neutral", "Positive", "Most Positive"]

    [[providers]]
    name = "judge-pairs"
    type = "llm_judge"
    mode = "pairwise"
    base_url = "http://127.0.0.1:8000/v1"
    model = "judge"
    api_key_env = "OPENAI_API_KEY"   # read by the CLI; never stored in the config object
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tiller.server.formats import sections
from tiller.server.formats.sections import ConfigError

from .judge import JudgeConfig


@dataclass(frozen=True)
class AnnotatorConfig:
    db: Path | None  # the generation log the server writes (None: shards)
    # JudgeConfig | QuantileConfig | RatingConfig | ScoreConfig | scorer_feedback's configs
    providers: tuple[Any, ...]
    batch_size: int = 32  # generations per provider call
    poll_interval_s: float = 1.0  # how often the log is checked for new generations
    retry_delay_s: float = 5.0  # wait before a failed batch is tried again
    # Log shards to follow instead of db (one per server replica): paths or globs, looked up
    # again at every poll; each shard keeps its own cursors, so exactly-once holds per shard.
    shards: tuple[str, ...] = ()


def build_section(cls: type, data: Mapping[str, Any], where: str) -> Any:
    """``formats.sections.build_section`` (typed, unknown keys refused) with ``template_path``
    expanded."""
    built = sections.build_section(cls, data, where)
    path = getattr(built, "template_path", None)
    return replace(built, template_path=path.expanduser()) if path is not None else built


PROVIDER_TYPES = (
    "llm_judge", "quantile", "rating", "score",
    "scorer_critique", "scorer_refinement", "scorer_pairwise",
)  # fmt: skip


def _provider(raw: Any, where: str, env: Mapping[str, str]) -> Any:
    from .quantile import QuantileConfig, ScoreConfig
    from .ratings import RatingConfig
    from .scorer_feedback import (
        ScorerCritiqueConfig,
        ScorerPairwiseConfig,
        ScorerRefinementConfig,
    )

    offline = {
        "scorer_critique": ScorerCritiqueConfig,
        "scorer_refinement": ScorerRefinementConfig,
        "scorer_pairwise": ScorerPairwiseConfig,
    }
    p = sections.table(raw, where)
    kind = p.pop("type", None)
    where = f"{where} ({p.get('name', '?')})"
    if kind == "llm_judge":
        key_env = sections.check_value(str, p.pop("api_key_env", ""), f"{where} api_key_env")
        if key_env:
            p["api_key"] = env.get(key_env, "unused")
        return build_section(JudgeConfig, p, where)
    if kind in ("quantile", "score", *offline):
        if "name" not in p:
            raise ConfigError(f"{where}: required key missing: name (string)")
        p["provider_name"] = p.pop("name")
        if kind == "scorer_refinement":  # talks to the server: may need a token, as a judge
            key_env = sections.check_value(str, p.pop("api_key_env", ""), f"{where} api_key_env")
            if key_env:
                p["api_key"] = env.get(key_env, "unused")
        cls = {"quantile": QuantileConfig, "score": ScoreConfig, **offline}[kind]
        return build_section(cls, p, where)
    if kind == "rating":
        return RatingConfig.parse(p, where)
    raise ConfigError(f"{where}: type {kind!r} is not one of {', '.join(PROVIDER_TYPES)}")


def parse_config(
    data: Mapping[str, Any], env: Mapping[str, str], *, prefix: str = ""
) -> AnnotatorConfig:
    """Build the config; ``env`` supplies secrets named by ``api_key_env``. Every key is
    type-checked: errors are a ``ConfigError`` (a ``ValueError``) naming the table and key, with
    table names prefixed by ``prefix`` (``"annotator."`` inside ``tiller align``'s file)."""
    d = dict(data)
    raw = sections.check_value(list[Any], d.pop("providers", []), f"{prefix}providers")
    providers = tuple(_provider(p, f"{prefix}providers[{i}]", env) for i, p in enumerate(raw))
    if not providers:
        raise ConfigError("the annotator config names no providers")
    top = sections.check_fields(
        AnnotatorConfig, d, f"[{prefix[:-1]}]" if prefix else "", exclude=("providers",)
    )
    if ("db" in top) == bool(top.get("shards")):
        raise ConfigError(
            "the annotator config needs db (the generation log path) or shards (several), not both"
        )
    db = top.pop("db", None)
    return AnnotatorConfig(
        **top, db=db.expanduser() if db is not None else None, providers=providers
    )


def load_config(path: Path, env: Mapping[str, str]) -> AnnotatorConfig:
    """TOML, or JSON when the file ends in ``.json`` (as ``tiller align`` writes it); errors are
    a ``ConfigError`` prefixed with ``path``."""
    return sections.load_file(path, lambda data: parse_config(data, env))


def build_providers(config: AnnotatorConfig) -> list[Any]:
    from .judge import LLMJudge
    from .quantile import QuantileConfig, QuantileTagProvider, ScoreProvider
    from .ratings import RatingConfig, RatingProvider
    from .scorer_feedback import (
        ScorerCritique,
        ScorerCritiqueConfig,
        ScorerPairwise,
        ScorerPairwiseConfig,
        ScorerRefinement,
        ScorerRefinementConfig,
    )

    made_by: dict[type, Any] = {
        ScorerCritiqueConfig: ScorerCritique,
        ScorerRefinementConfig: ScorerRefinement,
        ScorerPairwiseConfig: ScorerPairwise,
        JudgeConfig: LLMJudge,
        QuantileConfig: QuantileTagProvider,
        RatingConfig: RatingProvider,
    }
    return [made_by.get(type(p), ScoreProvider)(p) for p in config.providers]
