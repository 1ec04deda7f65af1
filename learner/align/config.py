"""``tiller align`` configuration: one TOML file for the whole loop, checked before anything starts.

Layout (paths relative to the file)::

    name = "oaif-critic"
    model = "smollm2"              # or a model directory
    duration_s = 1080              # wall-clock budget of the loop (the final evaluation is extra)
    mode = "active"                # active: the learner samples its prompt pool; passive: live
                                   # traffic and app feedback only ([learner.sample] not allowed)
    reward_provider = "sentiment"  # annotation provider plotted as the reward

    [server]
    args = ["--max-num-seqs", "64"]    # extra `tiller serve` arguments

    [judge]                        # optional: an OpenAI-compatible judge server (vLLM's)
    model = "smollm2"
    args = ["--max-model-len", "2048"]

    [annotator]                    # as `tiller annotate`'s config, without db; an llm_judge
    [[annotator.providers]]        # provider with base_url = "judge" talks to [judge]
    ...

    [learner]                      # as `tiller learn`'s config, without db/registry/workdir/
    ...                            # model/server (filled in by align)

    [eval]                         # the held-out evaluation after the loop
    prompts_file = "prompts/heldout.txt"
    scorer = "sentiment"
    higher_is_better = false
    tags = ["Most Negative", "Most Positive"]   # ALT: the two extreme tags (best first)
    attributes = {critical = 1.0}  # CMPO: the weights the adapter is evaluated with
    [eval.sweep]                   # CMPO: weights {a: λ, b: 1 − λ} for each λ, scored per attribute
    attributes = ["critical", "simple"]
    scorers = ["sentiment", "readability"]
    lambdas = [0.0, 0.5, 1.0]
"""

from __future__ import annotations

import copy
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..annotate.config import build_section
from ..annotate.config import parse_config as parse_annotator
from ..annotate.scorers import make_scorer
from ..learn.config import parse_config as parse_learner
from ..learn.config import with_prompts

JUDGE_URL = "judge"  # placeholder base_url of providers that use the [judge] server


@dataclass(frozen=True)
class SweepConfig:
    """`[eval.sweep]`: the attribute-weight sweep of a multi-head version (`sweep` module)."""

    attributes: tuple[str, str]  # swept from the second (λ = 0) to the first (λ = 1)
    scorers: tuple[str, str]  # how each attribute is measured
    lambdas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)

    def __post_init__(self) -> None:
        if len(self.attributes) != 2 or len(set(self.attributes)) != 2:
            raise ValueError("[eval.sweep]: attributes must be two distinct attribute names")
        if len(self.scorers) != 2:
            raise ValueError("[eval.sweep]: scorers must name one scorer per attribute")
        for s in self.scorers:
            make_scorer(s)  # ValueError naming the valid scorers
        if len(self.lambdas) < 2 or not all(math.isfinite(x) for x in self.lambdas):
            raise ValueError("[eval.sweep]: lambdas must be at least two finite numbers")


@dataclass(frozen=True)
class EvalConfig:
    prompts: tuple[str, ...]
    scorer: str
    higher_is_better: bool = True
    tags: tuple[str, ...] = ()
    samples: int = 2
    max_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    repetition_penalty: float | None = None
    seed: int = 4321
    perplexity: bool = True
    attributes: Mapping[str, float] = field(default_factory=dict)
    sweep: SweepConfig | None = None

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError("[eval]: prompts is empty")
        if self.tags and len(self.tags) != 2:
            raise ValueError("[eval]: tags must be the two extreme tags (best first)")
        if self.tags and self.attributes:
            raise ValueError("[eval]: give tags (ALT) or attributes (CMPO), not both")


@dataclass(frozen=True)
class JudgeServerConfig:
    model: str
    args: tuple[str, ...] = ()


@dataclass(frozen=True)
class AlignConfig:
    name: str
    model: str
    duration_s: float
    annotator: Mapping[str, Any]
    learner: Mapping[str, Any]
    mode: Literal["active", "passive"] = "active"
    server_args: tuple[str, ...] = ()
    judge: JudgeServerConfig | None = None
    eval: EvalConfig | None = None
    reward_provider: str = ""
    base: Path = field(default_factory=Path.cwd)

    @property
    def adapter(self) -> str:
        return str(self.learner["adapter"])


def learner_section(
    cfg: AlignConfig, *, db: Path, registry: Path, workdir: Path, model: Path, server: str
) -> dict[str, Any]:
    """The learner's config as ``tiller learn`` reads it (JSON-able, absolute paths)."""
    out = copy.deepcopy(dict(cfg.learner))
    for name in ("sample", "gate"):
        if name in out:
            out[name] = with_prompts(out[name], cfg.base, f"learner.{name}")
    out.update(
        db=str(db), registry=str(registry), workdir=str(workdir), model=str(model), server=server
    )
    return out


def annotator_section(cfg: AlignConfig, *, db: Path, judge_url: str | None) -> dict[str, Any]:
    out = copy.deepcopy(dict(cfg.annotator))
    out["db"] = str(db)
    for p in out.get("providers", []):
        if p.get("base_url") == JUDGE_URL:
            if judge_url is None:
                raise ValueError(
                    f"provider {p.get('name')!r} uses the judge but there is no [judge]"
                )
            p["base_url"] = judge_url
    return out


def parse_config(data: Mapping[str, Any], base: Path) -> AlignConfig:
    d = dict(data)
    for key in ("name", "annotator", "learner"):
        if key not in d:
            raise ValueError(f"the align config needs {key}")
    server = dict(d.pop("server", {}))
    judge = d.pop("judge", None)
    ev = d.pop("eval", None)
    if ev is not None:
        ev = with_prompts(ev, base, "eval")
        if "sweep" in ev:
            ev["sweep"] = build_section(SweepConfig, ev["sweep"], "[eval.sweep]")
        ev = build_section(EvalConfig, ev, "[eval]")
    cfg = AlignConfig(
        name=str(d.pop("name")),
        model=str(d.pop("model", "smollm2")),
        duration_s=float(d.pop("duration_s", 1080)),
        mode=d.pop("mode", "active"),
        annotator=d.pop("annotator"),
        learner=d.pop("learner"),
        server_args=tuple(str(a) for a in server.pop("args", [])),
        judge=JudgeServerConfig(str(judge["model"]), tuple(judge.get("args", ())))
        if judge
        else None,
        eval=ev,
        reward_provider=str(d.pop("reward_provider", "")),
        base=base,
    )
    if d or server:
        raise ValueError(f"the align config has unknown keys {sorted([*d, *server])}")
    if cfg.mode not in ("active", "passive"):
        raise ValueError(f"mode {cfg.mode!r} is not one of: active, passive")
    if cfg.mode == "passive" and "sample" in cfg.learner:
        raise ValueError("mode 'passive' learns from live traffic only: remove [learner.sample]")
    if cfg.mode == "active" and "sample" not in cfg.learner:
        raise ValueError("mode 'active' needs [learner.sample] (the prompt pool)")
    if cfg.duration_s <= 0:
        raise ValueError("duration_s must be > 0")
    # Check the sub-configs now, with placeholder paths: errors surface before anything starts.
    tmp = Path("/nonexistent")
    learner = learner_section(cfg, db=tmp, registry=tmp, workdir=tmp, model=tmp, server="x:1")
    parse_learner(learner, tmp, {})
    parse_annotator(annotator_section(cfg, db=tmp, judge_url="http://x/v1"), {})
    return cfg


def load_config(path: Path) -> AlignConfig:
    return parse_config(tomllib.loads(path.read_text()), path.parent.resolve())
