"""Annotator configuration: a TOML file turned into frozen dataclasses at the CLI edge.

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

import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tiller.server.formats import sections

from .judge import JudgeConfig


@dataclass(frozen=True)
class AnnotatorConfig:
    db: Path
    providers: tuple[Any, ...]  # JudgeConfig | QuantileConfig | RatingConfig | ScoreConfig
    batch_size: int = 32
    poll_interval_s: float = 1.0
    retry_delay_s: float = 5.0


def build_section(cls: type, data: Mapping[str, Any], where: str) -> Any:
    """``formats.sections.build_section`` (typed, unknown keys refused) with ``template_path``
    expanded."""
    converted = dict(data)
    if converted.get("template_path"):
        converted["template_path"] = Path(str(converted["template_path"])).expanduser()
    return sections.build_section(cls, converted, where)


def parse_config(data: Mapping[str, Any], env: Mapping[str, str]) -> AnnotatorConfig:
    """Build the config; ``env`` supplies secrets named by ``api_key_env``."""
    from .quantile import QuantileConfig, ScoreConfig
    from .ratings import RatingConfig

    providers: list[Any] = []
    for i, raw in enumerate(data.get("providers", [])):
        p = dict(raw)
        kind = p.pop("type", None)
        where = f"providers[{i}] ({p.get('name', '?')})"
        if kind == "llm_judge":
            key_env = p.pop("api_key_env", None)
            if key_env:
                p["api_key"] = env.get(key_env, "unused")
            providers.append(build_section(JudgeConfig, p, where))
        elif kind == "quantile":
            p["provider_name"] = p.pop("name")
            providers.append(build_section(QuantileConfig, p, where))
        elif kind == "score":
            p["provider_name"] = p.pop("name")
            providers.append(build_section(ScoreConfig, p, where))
        elif kind == "rating":
            providers.append(RatingConfig.parse(p, where))
        else:
            raise ValueError(
                f"{where}: type {kind!r} is not one of llm_judge, quantile, rating, score"
            )
    if not providers:
        raise ValueError("the annotator config names no providers")
    if "db" not in data:
        raise ValueError("the annotator config needs db (the generation log path)")
    return AnnotatorConfig(
        db=Path(data["db"]).expanduser(),
        providers=tuple(providers),
        batch_size=int(data.get("batch_size", 32)),
        poll_interval_s=float(data.get("poll_interval_s", 1.0)),
        retry_delay_s=float(data.get("retry_delay_s", 5.0)),
    )


def load_config(path: Path, env: Mapping[str, str]) -> AnnotatorConfig:
    """TOML, or JSON when the file ends in ``.json`` (as ``tiller align`` writes it)."""
    text = path.read_text()
    return parse_config(json.loads(text) if path.suffix == ".json" else tomllib.loads(text), env)


def build_providers(config: AnnotatorConfig) -> list[Any]:
    from .judge import LLMJudge
    from .quantile import QuantileConfig, QuantileTagProvider, ScoreProvider
    from .ratings import RatingConfig, RatingProvider

    out: list[Any] = []
    for p in config.providers:
        if isinstance(p, JudgeConfig):
            out.append(LLMJudge(p))
        elif isinstance(p, QuantileConfig):
            out.append(QuantileTagProvider(p))
        elif isinstance(p, RatingConfig):
            out.append(RatingProvider(p))
        else:
            out.append(ScoreProvider(p))
    return out
