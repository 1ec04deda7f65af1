"""``tiller align`` configuration: one TOML file for the whole loop, checked before anything starts.
Every key, its type and default: ``docs/config-reference.md``.

Layout (paths relative to the file)::

    name = "oaif-critic"
    model = "smollm2"              # or a model directory
    duration_s = 1080              # wall-clock budget of the loop (the final evaluation is extra)
    mode = "active"                # active: the learner samples its prompt pool; passive: live
                                   # traffic and app feedback only ([learner.sample] not allowed)
    reward_provider = "sentiment"  # annotation provider plotted as the reward
    worker_cpus = 0                # without CUDA: CPUs for annotator, learner and judge, apart
                                   # from the engine's threads (-1: a quarter; 0: no pinning)

    [server]
    args = ["--max-num-seqs", "64"]    # extra `tiller serve` arguments
    [server.engine_args]           # any vLLM engine argument, passed after `--`
    max_model_len = 2048

    [sampler]                      # optional: a replica for the loop's own generations (learner
    args = []                      # sampling, gate, "self" judge, evaluation) on the workers'
    [sampler.engine_args]          # CPUs under SCHED_IDLE; on a GPU give each engine its share
    gpu_memory_utilization = 0.3   # (gpu_memory_utilization in both [server] and [sampler])

    [judge]                        # optional: an OpenAI-compatible judge server (vLLM's)
    model = "smollm2"
    args = ["--max-model-len", "2048"]

    [annotator]                    # as `tiller annotate`'s config, without db; an llm_judge
    [[annotator.providers]]        # provider with base_url = "judge" talks to [judge]; with
    ...                            # base_url = "self", to the served base model (Tiller's HTTP)

    [learner]                      # as `tiller learn`'s config, without db/registry/workdir/
    ...                            # model/server (filled in by align)

    [eval]                         # the held-out evaluation after the loop
    prompts_file = "prompts/heldout.txt"
    scorer = "sentiment"
    higher_is_better = false
    tags = ["Most Negative", "Most Positive"]   # ALT: the two extreme tags (best first)
    attributes = {critical = 1.0}  # CMPO: the weights the adapter is evaluated with
    [eval.sampling]                # the one held-out sampling spec (learner/heldout.py)
    samples = 1
    seed = 4321
    [eval.sweep]                   # CMPO: weights {a: λ, b: 1 − λ} for each λ, scored per attribute
    attributes = ["critical", "simple"]
    scorers = ["sentiment", "readability"]
    lambdas = [0.0, 0.5, 1.0]
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tiller.server.formats import sections
from tiller.server.formats.sections import ConfigError

from ..annotate.config import build_section
from ..annotate.config import parse_config as parse_annotator
from ..annotate.scorers import check_scorer
from ..heldout import HeldoutSampling, check_guidance
from ..learn.config import parse_config as parse_learner
from ..learn.config import with_prompts

JUDGE_URL = "judge"  # placeholder base_url of providers that use the [judge] server
# Placeholder base_url of providers that judge with the served base model itself, over the run
# server's OpenAI-compatible API: pinned to the base (model = its name) and never logged.
SELF_URL = "self"


@dataclass(frozen=True)
class SweepConfig:
    """`[eval.sweep]`: the attribute-weight sweep of a multi-head version (`sweep` module)."""

    attributes: tuple[str, str]  # swept from the second (λ = 0) to the first (λ = 1)
    scorers: tuple[str, str]  # how each attribute is measured
    lambdas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    # per scorer: is a higher score more of the attribute? (the heads' verdicts' direction)
    higher_is_better: tuple[bool, bool] = (True, True)

    def __post_init__(self) -> None:
        if len(self.attributes) != 2 or len(set(self.attributes)) != 2:
            raise ValueError("[eval.sweep]: attributes must be two distinct attribute names")
        if len(self.scorers) != 2:
            raise ValueError("[eval.sweep]: scorers must name one scorer per attribute")
        for s in self.scorers:
            check_scorer(s)  # ValueError naming the valid scorers
        if len(self.lambdas) < 2 or not all(math.isfinite(x) for x in self.lambdas):
            raise ValueError("[eval.sweep]: lambdas must be at least two finite numbers")
        if len(set(self.lambdas)) != len(self.lambdas):
            raise ValueError(f"[eval.sweep]: lambdas repeat a value: {list(self.lambdas)}")
        if len(self.higher_is_better) != 2:
            raise ValueError("[eval.sweep]: higher_is_better must give one bool per scorer")


@dataclass(frozen=True)
class EvalConfig:
    prompts: tuple[str, ...]
    scorer: str
    higher_is_better: bool = True
    tags: tuple[str, ...] = ()
    sampling: HeldoutSampling = field(default_factory=HeldoutSampling)  # [eval.sampling]
    perplexity: bool = True
    attributes: Mapping[str, float] = field(default_factory=dict)
    sweep: SweepConfig | None = None
    # ALT: the trained version and the prompted bootstrap sample each tag guided away from the
    # other (heldout.guided) with this weight; the base model stays unguided. 0: off.
    guidance: float = 0.0

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError("[eval]: prompts is empty")
        check_guidance(self.guidance, self.sampling, "eval")
        if self.guidance > 0 and not self.tags:
            raise ValueError("eval.guidance needs eval.tags (the two tags to guide between)")
        check_scorer(self.scorer)  # a bad rm: directory fails here, not after the run
        if self.tags and len(self.tags) != 2:
            raise ValueError("[eval]: tags must be the two extreme tags (best first)")
        if self.tags and self.attributes:
            raise ValueError("[eval]: give tags (ALT) or attributes (CMPO), not both")


@dataclass(frozen=True)
class JudgeServerConfig:
    """`[judge]`: an OpenAI-compatible judge server (vLLM's) started beside Tiller."""

    model: str  # "smollm2" or a model directory
    args: tuple[str, ...] = ()  # extra `vllm serve` arguments


@dataclass(frozen=True)
class ServerSection:
    """`[server]` (the users' server) or `[sampler]` (the loop's replica): a `tiller serve`
    process align starts."""

    args: tuple[str, ...] = ()  # extra `tiller serve` arguments
    # vLLM engine arguments (vLLM's names, dashes or underscores), passed after `--`
    engine_args: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AlignConfig:
    name: str  # the run's name (run directories are <name>-<time>)
    annotator: Mapping[str, Any]  # `tiller annotate`'s config, without db
    learner: Mapping[str, Any]  # `tiller learn`'s config, without db/registry/workdir/model/server
    model: str = "smollm2"  # "smollm2" or a model directory
    duration_s: float = 1080.0  # wall-clock budget of the loop (the final evaluation is extra)
    # active: the learner samples its prompt pool; passive: live traffic and app feedback only
    mode: Literal["active", "passive"] = "active"
    server_args: tuple[str, ...] = ()  # [server] args
    # [sampler]: a second `tiller serve` for the loop's own generations (the learner's sampling
    # and gate, the "self" judge, the evaluation), so that they never share the users' engine
    # batch. Its args include [sampler.engine_args]' flags. None: all on the users' server.
    sampler: ServerSection | None = None
    judge: JudgeServerConfig | None = None
    eval: EvalConfig | None = None
    reward_provider: str = ""  # annotation provider plotted as the reward
    # Without CUDA: CPUs kept for the annotator, learner and judge, apart from the server's
    # engine threads (-1: a quarter of the usable CPUs, at least 1; 0: no pinning). Off by
    # default: on 2 cores the learner's core is the one vLLM leaves to the server's frontend.
    worker_cpus: int = 0
    # "background": the annotator, learner and judge run under SCHED_IDLE, so users' requests
    # (the server's threads) get the CPUs first; "normal": they compete as equals.
    worker_priority: Literal["background", "normal"] = "background"
    base: Path = field(default_factory=Path.cwd)  # the file's directory: relative paths start here

    @property
    def adapter(self) -> str:
        return str(self.learner["adapter"])

    @property
    def background_workers(self) -> bool:
        """The annotator, learner and judge run under ``SCHED_IDLE``."""
        return self.worker_priority == "background"


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


def annotator_section(
    cfg: AlignConfig, *, db: Path, judge_url: str | None, self_url: str, base_model: str
) -> dict[str, Any]:
    """The annotator's config as ``tiller annotate`` reads it: the judge placeholders resolved
    (``judge``: the [judge] server; ``self``: the run server's HTTP API, its base model)."""
    out = copy.deepcopy(dict(cfg.annotator))
    out["db"] = str(db)
    for p in out.get("providers", []):
        if p.get("base_url") == SELF_URL:
            p["base_url"] = self_url
            p["model"] = base_model
            p["extra_body"] = {**p.get("extra_body", {}), "log": False}
        elif p.get("base_url") == JUDGE_URL:
            if judge_url is None:
                raise ValueError(
                    f"provider {p.get('name')!r} uses the judge but there is no [judge]"
                )
            p["base_url"] = judge_url
    return out


_TABLES = ("server", "sampler", "judge", "annotator", "learner", "eval")


def parse_config(data: Mapping[str, Any], base: Path) -> AlignConfig:
    """Build the config and check the annotator's and the learner's sections too (with
    placeholder paths), so that errors surface before anything starts. Every key is
    type-checked: errors are a ``ConfigError`` (a ``ValueError``) naming the table and key."""
    d = dict(data)
    tables = {k: d.pop(k) for k in _TABLES if k in d}
    top = sections.check_fields(AlignConfig, d, "", exclude=(*_TABLES, "server_args", "base"))
    for key in ("name", "annotator", "learner"):
        if key not in top and key not in tables:
            raise ConfigError(f"the align config needs {key}")
    server = build_section(ServerSection, tables.get("server", {}), "[server]")
    sampler = None
    if "sampler" in tables:
        given = build_section(ServerSection, tables["sampler"], "[sampler]")
        sampler = ServerSection(args=(*given.args, *_engine_flags(given.args, given.engine_args)))
    judge = tables.get("judge")
    ev = tables.get("eval")
    if ev is not None:
        ev = build_section(EvalConfig, with_prompts(ev, base, "eval"), "[eval]")
    cfg = AlignConfig(
        **top,
        annotator=sections.table(tables["annotator"], "[annotator]"),
        learner=sections.table(tables["learner"], "[learner]"),
        server_args=(*server.args, *_engine_flags(server.args, server.engine_args)),
        sampler=sampler,
        judge=None if judge is None else build_section(JudgeServerConfig, judge, "[judge]"),
        eval=ev,
        base=base,
    )
    if cfg.mode == "passive" and "sample" in cfg.learner:
        raise ConfigError("mode 'passive' learns from live traffic only: remove [learner.sample]")
    if cfg.mode == "active" and "sample" not in cfg.learner:
        raise ConfigError("mode 'active' needs [learner.sample] (the prompt pool)")
    if cfg.duration_s <= 0:
        raise ConfigError("duration_s must be > 0")
    if cfg.worker_cpus < -1:
        raise ConfigError(
            f"worker_cpus must be -1 (auto), 0 (no pinning) or > 0, got {cfg.worker_cpus}"
        )
    tmp = Path("/nonexistent")
    learner = learner_section(cfg, db=tmp, registry=tmp, workdir=tmp, model=tmp, server="x:1")
    parse_learner(learner, tmp, {}, prefix="learner.")
    annotator = annotator_section(
        cfg, db=tmp, judge_url="http://x/v1", self_url="http://x/v1", base_model="base"
    )
    parse_annotator(annotator, {}, prefix="annotator.")
    return cfg


def load_config(path: Path) -> AlignConfig:
    """The TOML file at ``path``; errors are a ``ConfigError`` prefixed with ``path``."""
    return sections.load_file(path, lambda data: parse_config(data, path.parent.resolve()))


def _engine_flags(args: Sequence[str], table: Mapping[str, Any]) -> list[str]:
    """`tiller serve` flags for ``[server.engine_args]`` (or ``[sampler.engine_args]``), after
    ``--`` (vLLM checks them)."""
    out: list[str] = [] if not table or "--" in args else ["--"]
    for key, value in table.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list | tuple):
            out += [flag, *map(str, value)]
        elif isinstance(value, Mapping):
            out += [flag, json.dumps(value)]
        else:
            out += [flag, str(value)]
    return out
