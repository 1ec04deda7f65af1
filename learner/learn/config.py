"""``tiller learn`` configuration: a TOML file turned into frozen dataclasses at the CLI edge.
Every key, its type and default: ``docs/config-reference.md``.

Example (paths relative to the file's directory)::

    db = "run/log.sqlite"            # the generation log the server writes
    registry = "run/registry"        # where versions are published
    workdir = "run/learner"          # training runs, checkpoints, gate candidates
    adapter = "critic"               # the adapter this learner improves
    model = "models/smollm2"         # base model directory (HF format)
    base_model = "SmolLM2-135M-Instruct"
    server = "127.0.0.1:50051"       # for active sampling and the gate (admin RPCs)
    admin_server = "127.0.0.1:50052" # optional: where admin RPCs go (tiller serve --admin-port)

    [trigger]                        # train on N new annotations or after T seconds
    min_annotations = 64
    max_interval_s = 600
    min_examples = 16

    [sample]                         # active mode: sample the prompt pool each iteration
    prompts_file = "prompts.txt"
    per_iteration = 32
    n = 2
    feedback = "Most Negative"       # used once the adapter has a conditioning

    [data]
    kind = "pairs"                   # "pairs" (DPO family), "alt" (conditional SFT) or
                                     # "cmpo" (plural heads; [heads] instead of [train])
    source = "score"                 # pairs from: judge | score | feedback
    provider = "sentiment"
    higher_is_better = false

    [train]                          # learner.trainer.TrainConfig fields
    objective = "dpo"
    lora_r = 16
    [train.objective_config]         # the objective's config fields (e.g. DPOConfig)
    beta = 0.1

    [gate]                           # learner.learn.gate.GateConfig fields
    prompts_file = "heldout.txt"
    scorer = "sentiment"
    higher_is_better = false
    min_distinct2_ratio = 0.8
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from tiller.server.formats import sections
from tiller.server.formats.manifest import DEFAULT_SEPARATOR
from tiller.server.formats.sections import ConfigError

from ..annotate.config import build_section
from ..annotate.judge import JudgeConfig
from ..heads_trainer import HeadsTrainConfig
from ..objectives.alt import ALTConfig
from ..trainer import OBJECTIVES, TrainConfig
from .gate import GateConfig

PairSource = Literal["judge", "score", "feedback"]
# kind 'cdf': the policy continues its own prompt again after reading the critique.
CDF_REWRITE_TEMPLATE = (
    "{prompt}{answer}\n\nFeedback on the text above: {critique}\n"
    "The same text, rewritten to follow the feedback:\n{prompt}"
)


@dataclass(frozen=True)
class TriggerConfig:
    """Train when ``min_annotations`` new annotations (of the data's provider) arrived, or when
    ``max_interval_s`` passed since the last iteration and at least one did."""

    min_annotations: int = 32  # new annotations that start an iteration
    max_interval_s: float = 600.0  # or this long since the last iteration (and one arrived)
    min_examples: int = 8  # fewer training examples: the iteration is skipped
    poll_s: float = 2.0  # how often the log is checked

    def __post_init__(self) -> None:
        if self.min_annotations < 1 or self.min_examples < 1:
            raise ValueError("trigger.min_annotations and trigger.min_examples must be >= 1")
        if self.max_interval_s <= 0 or self.poll_s <= 0:
            raise ValueError("trigger.max_interval_s and trigger.poll_s must be > 0")


@dataclass(frozen=True)
class SampleConfig:
    """Active mode: each iteration first samples ``per_iteration`` prompts from the pool (a
    seeded draw) through the server, logged, ``n`` samples each. ``feedback`` conditions the
    samples once the served version has a conditioning: one tag (ALT samples with the best
    tag), or several used in turn (to keep every tag's data growing)."""

    prompts: tuple[str, ...]
    per_iteration: int = 32
    n: int = 2
    feedback: str | tuple[str, ...] = ""  # a tag, or tags taken in turn prompt by prompt
    # attribute weights taken in turn prompt by prompt once the served version has heads (CMPO)
    attributes: tuple[Mapping[str, float], ...] = ()
    max_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    repetition_penalty: float | None = None
    concurrency: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError("sample.prompts is empty")
        if self.per_iteration < 1 or self.n < 1 or self.concurrency < 1:
            raise ValueError("sample.per_iteration, sample.n and sample.concurrency must be >= 1")
        for i, w in enumerate(self.attributes):
            if not isinstance(w, Mapping) or not w:
                raise ValueError(f"sample.attributes[{i}] must be a table of attribute weights")


@dataclass(frozen=True)
class DataConfig:
    """Which dataset each iteration builds from the log.

    ``kind='cmpo'``: the ``provider``'s Likert ratings (``attributes``) become CMPO pairs with
    attribute weight vectors (``data.cmpo``; ``max_subset_size`` caps the power set), trained
    as plural heads (``[heads]``).
    ``kind='alt'``: the ``provider``'s tag annotations become feedback-conditioned SFT examples
    under ``tags``/``template``/``separator`` (the conditioning the published versions carry),
    over a replay window of the ``replay_versions`` latest adapter versions. ``kind='pairs'``:
    preference pairs from ``source``; ``on_policy`` keeps only pairs sampled from the version
    being served (the base model before the first promotion), as in online DPO.
    ``kind='cdf'`` (``docs/cdf.md``): prompts split into perplexity terciles; easy ones pair the
    policy's rewrite after ``critique_provider``'s critique with the original, medium ones
    ``refinement_provider``'s refinement with it, hard ones take ``preference_provider``'s
    verdicts; trained like ``'pairs'``. ``provider`` (one of the three) triggers iterations.
    """

    kind: Literal["alt", "pairs", "cmpo", "cdf"] = "pairs"
    provider: str = ""  # the annotation provider the data comes from (kind 'cdf': the trigger's)
    source: PairSource = "score"  # kind 'pairs': pairs from judge verdicts, scores or feedback
    higher_is_better: bool = True  # source 'score': the better completion has the higher score
    min_margin: float = 0.0  # source 'score': pairs closer than this are dropped
    pairing: Literal["all", "best_worst"] = "best_worst"  # pairs per prompt: every pair or one
    on_policy: bool = True  # only completions of the version being served
    allow_truncated: bool = True  # keep completions cut at max_tokens
    # source 'judge': decide a both-order tie by p_a when |p_a - 0.5| >= this (None: skip ties)
    judge_tie_margin: float | None = None
    tags: tuple[str, ...] = ()  # kind 'alt': the feedback vocabulary
    template: str = ""  # kind 'alt': how a tag conditions the prompt
    separator: str = DEFAULT_SEPARATOR  # after the rendered prompt ("" for plain continuation)
    balance: Literal["none", "downsample", "weight"] = "weight"  # kind 'alt': tags' shares
    replay_versions: int | None = None  # kind 'alt': data of the latest N versions (None: all)
    reference: Literal["tagged", "untagged"] = "tagged"  # kind 'alt': KL reference's prompt
    contrast_tags: int = 0  # kind 'alt': other tags per example for train contrast (0: none)
    max_examples: int | None = None  # the newest N examples (None: all)
    attributes: tuple[str, ...] = ()  # kind 'cmpo': the steering attributes (head order)
    max_subset_size: int | None = None  # kind 'cmpo': the largest attribute subset paired
    critique_provider: str = ""  # kind 'cdf': critiques of easy prompts' answers
    refinement_provider: str = ""  # kind 'cdf': refined answers of medium prompts
    preference_provider: str = ""  # kind 'cdf': pairwise verdicts on hard prompts
    # kind 'cdf': the policy's rewrite request for a text prompt ({prompt}, {answer}, {critique});
    # a chat gets its answer and a user turn with the critique instead
    rewrite_template: str = CDF_REWRITE_TEMPLATE
    rewrite_max_tokens: int = 64  # kind 'cdf': the rewrite's sampling
    rewrite_temperature: float = 0.7
    rewrite_repetition_penalty: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("alt", "pairs", "cmpo", "cdf"):
            raise ValueError(f"data.kind {self.kind!r} is not one of: alt, cdf, cmpo, pairs")
        self._check_cdf()
        if self.kind == "cmpo" and not self.attributes:
            raise ValueError("data.kind 'cmpo' needs data.attributes (the steering attributes)")
        if self.attributes and self.kind != "cmpo":
            raise ValueError("data.attributes applies to data.kind 'cmpo' only")
        if self.source not in ("judge", "score", "feedback"):
            raise ValueError(f"data.source {self.source!r} is not one of: judge, score, feedback")
        if self.kind == "alt" and not self.tags:
            raise ValueError("data.kind 'alt' needs data.tags (the feedback vocabulary)")
        if self.kind != "alt" and (self.contrast_tags or self.reference != "tagged"):
            raise ValueError("data.contrast_tags and data.reference apply to data.kind 'alt' only")
        if self.reference not in ("tagged", "untagged"):
            raise ValueError(f"data.reference {self.reference!r} is not one of: tagged, untagged")
        if not 0 <= self.contrast_tags < max(1, len(self.tags)):
            raise ValueError(
                f"data.contrast_tags must be in [0, {max(0, len(self.tags) - 1)}] "
                f"(the other tags of data.tags), got {self.contrast_tags}"
            )
        m = self.judge_tie_margin
        if m is not None and not (0.0 <= m < 0.5):
            raise ValueError(f"data.judge_tie_margin must be in [0, 0.5), got {m}")
        if (self.kind == "alt" or self.source != "feedback") and not self.provider:
            raise ValueError("data.provider (the annotation provider) is required")

    def _check_cdf(self) -> None:
        names = {
            "critique_provider": self.critique_provider,
            "refinement_provider": self.refinement_provider,
            "preference_provider": self.preference_provider,
        }
        if self.kind != "cdf":
            for key, value in names.items():
                if value:
                    raise ValueError(f"data.{key} applies to data.kind 'cdf' only")
            return
        for key, value in names.items():
            if not value:
                raise ValueError(f"data.kind 'cdf' needs data.{key} (an annotation provider)")
        if self.provider not in names.values():
            raise ValueError(
                f"data.provider {self.provider!r} (whose labels trigger an iteration) must be "
                f"one of the cdf providers: {', '.join(sorted(set(names.values())))}"
            )
        if self.source != "score":  # the default: kind 'cdf' reads no pair source
            raise ValueError("data.source applies to data.kind 'pairs' only, not 'cdf'")
        if "{critique}" not in self.rewrite_template:
            raise ValueError("data.rewrite_template must contain {critique}")
        if self.rewrite_max_tokens < 1 or self.rewrite_temperature < 0:
            raise ValueError(
                "data.rewrite_max_tokens must be >= 1 and data.rewrite_temperature >= 0"
            )


@dataclass(frozen=True)
class LearnConfig:
    """The learner's file: the keys outside any table, and its tables."""

    db: Path  # the generation log the server writes (with shards: the learner's own records)
    registry: Path  # where versions are published
    workdir: Path  # training runs, checkpoints, gate candidates
    adapter: str  # the adapter this learner improves
    model: Path  # base model directory (HF format)
    base_model: str  # the base model's id, recorded in each version's manifest
    train: TrainConfig
    data: DataConfig
    trigger: TriggerConfig = field(default_factory=TriggerConfig)
    server: str = ""  # host:port of Tiller, for [sample] and [gate]
    admin_server: str = ""  # admin RPCs' address when the server has --admin-port ("" = server)
    token: str | None = None
    sample: SampleConfig | None = None
    gate: GateConfig | None = None
    heads: HeadsTrainConfig | None = None  # data.kind 'cmpo': the plural heads' training
    continue_training: bool = True  # train each version from the served one (else the base)
    max_iterations: int | None = None  # stop after this many (None: run until stopped)
    # Active mode: sample the next iteration as soon as this one's data is frozen, beside its
    # training and gate (from the version served then: one version behind, see loop.py).
    pipeline: bool = False
    # Log shards to read, one per server replica: paths or globs, resolved at every poll (see
    # learner/shards.py). Empty: the log is db itself.
    shards: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if (self.sample is not None or self.gate is not None) and not self.server:
            raise ValueError("[sample] and [gate] need server (the Tiller address)")
        wants = "alt" if self.data.kind == "alt" else None
        if wants == "alt" and self.train.objective not in ("alt", "sft"):
            raise ValueError("data.kind 'alt' trains with train.objective 'alt' or 'sft'")
        obj = self.train.loss_config
        if isinstance(obj, ALTConfig) and obj.contrast > 0 and self.data.contrast_tags < 1:
            raise ValueError(
                "train.objective_config.contrast > 0 needs data.contrast_tags >= 1 "
                "(the other tags each example is contrasted with)"
            )
        if self.data.kind in ("pairs", "cdf") and self.train.objective in ("alt", "sft"):
            k = self.data.kind
            raise ValueError(f"data.kind {k!r} cannot train objective {self.train.objective!r}")
        if self.data.kind == "cdf" and not self.server:
            raise ValueError("data.kind 'cdf' needs server: the policy rewrites answers through it")
        if (self.data.kind == "cmpo") != (self.heads is not None):
            raise ValueError("[heads] goes with data.kind 'cmpo' (and only with it)")
        if self.heads is not None and self.heads.attributes != self.data.attributes:
            raise ValueError("heads.attributes must be data.attributes")
        if self.gate is not None and self.gate.attributes and self.heads is None:
            raise ValueError("gate.attributes needs data.kind 'cmpo' (a version with heads)")
        if self.gate is not None and self.heads is not None:
            points = {"gate.attributes": self.gate.attributes}
            points |= {
                f"gate.heads[{k}].attributes": h.attributes for k, h in enumerate(self.gate.heads)
            }
            for where, weights in points.items():
                if unknown := sorted(set(weights) - set(self.heads.attributes)):
                    raise ValueError(
                        f"{where} names no head: {unknown} (heads: {list(self.heads.attributes)})"
                    )


def _lines(path: Path) -> tuple[str, ...]:
    return tuple(s for s in (line.strip() for line in path.read_text().splitlines()) if s)


def with_prompts(raw: Mapping[str, Any], base: Path, where: str) -> dict[str, Any]:
    """``raw`` with ``prompts_file`` (relative to ``base``) read into ``prompts``."""
    out = sections.table(raw, f"[{where}]")
    if "prompts_file" in out:
        if "prompts" in out:
            raise ConfigError(f"[{where}]: give prompts or prompts_file, not both")
        key = f"[{where}] prompts_file"
        name = sections.check_value(str, out.pop("prompts_file"), key)
        try:
            out["prompts"] = _lines(base / Path(name).expanduser())
        except OSError as e:
            raise ConfigError(f"{key}: {e}") from None
    return out


def _train(raw: Any, where: str, base: Path) -> TrainConfig:
    t = sections.table(raw, where)
    objective = sections.check_value(
        str,
        t.get("objective", sections.field_default(TrainConfig, "objective")),
        f"{where} objective",
    )
    if objective not in OBJECTIVES:
        raise ConfigError(f"{where}: objective {objective!r} is not one of {sorted(OBJECTIVES)}")
    if "objective_config" in t:
        sub = f"[{where[1:-1]}.objective_config]"
        t["objective_config"] = build_section(
            OBJECTIVES[objective], sections.table(t["objective_config"], sub), sub
        )
    for key in ("checkpoint_dir", "checkpoint_every"):
        if key in t:
            raise ConfigError(f"{where}: {key} is managed by the learner (per iteration)")
    built = build_section(TrainConfig, t, where)
    if built.accelerate_config is not None:  # relative to the config file, like the paths
        built = replace(built, accelerate_config=base / built.accelerate_config.expanduser())
    return built


def _gate(raw: Any, base: Path, env: Mapping[str, str], prefix: str) -> GateConfig:
    g = with_prompts(raw, base, f"{prefix}gate")
    if "judge" in g:
        where = f"[{prefix}gate.judge]"
        j = sections.table(g["judge"], where)
        key_env = sections.check_value(str, j.pop("api_key_env", ""), f"{where} api_key_env")
        if key_env:
            j["api_key"] = env.get(key_env, "unused")
        j.setdefault("name", "gate-judge")
        j.setdefault("mode", "pairwise")
        g["judge"] = build_section(JudgeConfig, j, where)
    return build_section(GateConfig, g, f"[{prefix}gate]")


def _heads(raw: Any, data: DataConfig, base_model: str, prefix: str) -> HeadsTrainConfig:
    where = f"[{prefix}heads]"
    h = sections.table(raw, where)
    for key in ("attributes", "base_model", "progress"):
        if key in h:
            raise ConfigError(f"{where}: {key} is set by the learner")
    h |= {"attributes": data.attributes, "base_model": base_model}
    return build_section(HeadsTrainConfig, h, where)


_TABLES = ("train", "data", "trigger", "sample", "gate", "heads")
_PATHS = ("db", "registry", "workdir", "model")


def parse_config(
    data: Mapping[str, Any], base: Path, env: Mapping[str, str], *, prefix: str = ""
) -> LearnConfig:
    """Build the config; relative paths resolve against ``base``; ``env`` supplies secrets
    named by ``token_env`` and the gate judge's ``api_key_env``. Every key is type-checked:
    errors are a ``ConfigError`` (a ``ValueError``) naming the table and key, with table names
    prefixed by ``prefix`` (``"learner."`` inside ``tiller align``'s file)."""
    top_where = f"[{prefix[:-1]}]" if prefix else ""
    d = dict(data)
    tables = {k: d.pop(k) for k in _TABLES if k in d}
    # The top-level keys: LearnConfig's plain fields, and token_env instead of the token itself.
    top = sections.check_fields(
        LearnConfig, d, top_where, extra={"token_env": str}, exclude=("token", *_TABLES)
    )
    for key in _PATHS:
        if key not in top:
            raise ConfigError(f"the learner config needs {key}")
        top[key] = base / top[key].expanduser()
    if "shards" in top:
        top["shards"] = tuple(str(base / Path(s).expanduser()) for s in top["shards"])
        mine = [s for s in top["shards"] if fnmatch.fnmatch(str(top["db"]), s)]
        if mine:
            raise ConfigError(
                f"shards {mine[0]!r} names db ({top['db']}): with shards, db is the learner's "
                "own file, not a shard"
            )
    if not top.get("adapter") or not top.get("base_model"):
        raise ConfigError("the learner config needs adapter and base_model")
    token_env = top.pop("token_env", None)
    data_cfg = build_section(DataConfig, tables.pop("data", {}), f"[{prefix}data]")
    heads = None
    if data_cfg.kind == "cmpo":
        if "train" in tables:
            raise ConfigError("data.kind 'cmpo' trains plural heads: use [heads], not [train]")
        heads = _heads(tables.pop("heads", {}), data_cfg, top["base_model"], prefix)
    elif "heads" in tables:
        raise ConfigError(f"[{prefix}heads] goes with data.kind 'cmpo' (and only with it)")
    sample = tables.get("sample")
    return LearnConfig(
        **top,
        train=_train(tables.get("train", {}), f"[{prefix}train]", base),
        data=data_cfg,
        trigger=build_section(TriggerConfig, tables.get("trigger", {}), f"[{prefix}trigger]"),
        token=env.get(token_env) if token_env else None,
        sample=None
        if sample is None
        else build_section(
            SampleConfig, with_prompts(sample, base, f"{prefix}sample"), f"[{prefix}sample]"
        ),
        gate=None if "gate" not in tables else _gate(tables["gate"], base, env, prefix),
        heads=heads,
    )


def load_config(path: Path, env: Mapping[str, str]) -> LearnConfig:
    """TOML, or JSON when the file ends in ``.json`` (as ``tiller align`` writes it); errors are
    a ``ConfigError`` prefixed with ``path``."""
    return sections.load_file(path, lambda data: parse_config(data, path.parent.resolve(), env))
