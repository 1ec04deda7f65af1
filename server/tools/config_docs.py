"""Print the reference of every config key (Markdown), generated from the config dataclasses.

    python -m tiller.server.tools.config_docs > docs/config-reference.md

Per section: each key with its type (as TOML writes it), its default and the first paragraph
of the comment beside or above the field. A unit test fails when the committed file differs
from this output.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import json
import textwrap
import tokenize
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tiller.server.formats.sections import default_of, table_class, type_hints, type_name

Row = tuple[str, str, str, str]  # key, type, default, description
PROMPTS_FILE: Row = ("prompts_file", "path", "unset", "a file of prompts, one a line (or: prompts)")


@dataclass(frozen=True)
class Section:
    """One table of a config file: ``cls``'s fields, less ``skip``, plus ``extra`` rows."""

    name: str
    cls: type[Any]
    skip: tuple[str, ...] = ()
    extra: tuple[Row, ...] = ()
    rename: Mapping[str, str] = field(default_factory=dict)
    note: str = ""
    base: Any = None  # a nested table's defaults: the parent field's default instance


def _comments(cls: type[Any]) -> dict[str, str]:
    """Each field's comment: the one on its line, else the comment lines right above it."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    notes = {
        t.start[0]: t.string.lstrip("#").strip()
        for t in tokenize.generate_tokens(io.StringIO(source).readline)
        if t.type == tokenize.COMMENT
    }
    node = ast.parse(source).body[0]
    assert isinstance(node, ast.ClassDef)
    out = {}
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        end = stmt.end_lineno or stmt.lineno
        if end in notes:
            out[stmt.target.id] = notes[end]
            continue
        above: list[str] = []
        n = stmt.lineno - 1
        while n in notes and lines[n - 1].lstrip().startswith("#"):
            above.insert(0, notes[n])
            n -= 1
        if above:
            out[stmt.target.id] = " ".join(above)
    return out


def _doc(cls: type[Any]) -> str:
    """The first paragraph of ``cls``'s own docstring (not one it inherits or is generated)."""
    doc = cls.__dict__.get("__doc__") or ""
    if doc.startswith(f"{cls.__name__}("):
        return ""  # the signature dataclasses writes for classes without a docstring
    return " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())


def _value(v: Any) -> str:
    if v is None:
        return "unset"
    if isinstance(v, Path):
        v = str(v)
    if isinstance(v, (str, bool, int, float)):
        return json.dumps(v)
    if dataclasses.is_dataclass(v):
        return "(table)"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{k} = {_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (tuple, list, frozenset)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    return repr(v)


def _default(f: dataclasses.Field[Any], base: Any) -> str:
    value = getattr(base, f.name) if base is not None else default_of(f)
    return "required" if value is dataclasses.MISSING else _value(value)


def _nested_name(parent: str, name: str) -> str:
    """``[gate.sampling]`` in a file's table; ``ServerConfig.engine`` outside any file."""
    if parent.startswith("[") and parent.endswith("]"):
        return f"[{parent[1:-1]}.{name}]"
    return f"{parent}.{name}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _with_extra(rows: list[Row], extra: tuple[Row, ...]) -> list[Row]:
    """``rows`` in field order, each extra row after the field it stands for (``prompts_file``
    after ``prompts``), else at the end."""
    out = list(rows)
    for row in extra:
        at = [i for i, r in enumerate(out) if row[0].startswith(r[0] + "_")]
        out.insert(at[-1] + 1 if at else len(out), row)
    return out


def render(section: Section) -> Iterator[str]:
    """The Markdown of ``section`` and of the tables nested in it (dataclass-typed fields)."""
    hints = type_hints(section.cls)
    notes = _comments(section.cls)
    rows: list[Row] = []
    nested: list[Section] = []
    for f in dataclasses.fields(section.cls):
        if not f.init or f.name in section.skip:
            continue
        sub = table_class(hints[f.name])
        if sub is not None:
            given = default_of(f)
            base = given if dataclasses.is_dataclass(given) else None
            nested.append(Section(_nested_name(section.name, f.name), sub, base=base))
            continue
        key = section.rename.get(f.name, f.name)
        rows.append(
            (key, type_name(hints[f.name]), _default(f, section.base), notes.get(f.name, ""))
        )
    yield f"### {section.name}"
    yield ""
    intro = " ".join(s for s in (_doc(section.cls), section.note) if s)
    if intro:
        yield intro
        yield ""
    yield "| key | type | default | description |"
    yield "| --- | --- | --- | --- |"
    for row in _with_extra(rows, section.extra):
        yield "| " + " | ".join(_cell(c) for c in row) + " |"
    yield ""
    for s in nested:
        yield from render(s)


def components() -> list[tuple[str, str, list[Section]]]:
    """(title, introduction, sections) of each component's config."""
    from tiller.learner.align.config import (
        AlignConfig,
        EvalConfig,
        JudgeServerConfig,
        ServerSection,
    )
    from tiller.learner.annotate.config import AnnotatorConfig
    from tiller.learner.annotate.judge import JudgeConfig
    from tiller.learner.annotate.quantile import QuantileConfig, ScoreConfig
    from tiller.learner.annotate.ratings import RatedAttribute, RatingConfig
    from tiller.learner.annotate.scorer_feedback import (
        ScorerCritiqueConfig,
        ScorerPairwiseConfig,
        ScorerRefinementConfig,
    )
    from tiller.learner.heads_trainer import HeadsTrainConfig
    from tiller.learner.learn.config import DataConfig, LearnConfig, SampleConfig, TriggerConfig
    from tiller.learner.learn.gate import GateConfig, HeadCheck
    from tiller.learner.trainer import OBJECTIVES, TrainConfig
    from tiller.server.config import ServerConfig, TokenGrant

    api_key: Row = ("api_key_env", "string", "unset", "environment variable holding the API key")
    name: Mapping[str, str] = {"provider_name": "name"}
    learn_tables = ("train", "data", "trigger", "sample", "gate", "heads")
    learn = [
        Section(
            "top level",
            LearnConfig,
            skip=("token", *learn_tables),
            extra=(("token_env", "string", "unset", "environment variable holding the token"),),
            note="Relative paths start at the file's directory.",
        ),
        Section("[trigger]", TriggerConfig),
        Section("[sample]", SampleConfig, extra=(PROMPTS_FILE,)),
        Section("[data]", DataConfig),
        Section(
            "[train]",
            TrainConfig,
            skip=("checkpoint_dir", "checkpoint_every", "objective_config"),
            note="Not with data.kind 'cmpo' (that trains [heads]).",
        ),
        *(
            Section(f'[train.objective_config] (objective = "{key}")', cls)
            for key, cls in OBJECTIVES.items()
        ),
        Section("[gate]", GateConfig, skip=("judge", "heads"), extra=(PROMPTS_FILE,)),
        Section(
            "[[gate.heads]]",
            HeadCheck,
            note="CMPO: with gate.attributes (the first head's point); each entry is one more.",
        ),
        Section(
            "[gate.judge]",
            JudgeConfig,
            extra=(api_key,),
            note='Here name defaults to "gate-judge" and mode to "pairwise" (the only mode).',
        ),
        Section(
            "[heads]",
            HeadsTrainConfig,
            skip=("attributes", "base_model", "progress"),
            note="With data.kind 'cmpo' only; the heads' attributes are data.attributes.",
        ),
    ]
    annotate = [
        Section("top level", AnnotatorConfig, skip=("providers",)),
        Section('[[providers]] type = "llm_judge"', JudgeConfig, extra=(api_key,)),
        Section('[[providers]] type = "quantile"', QuantileConfig, rename=name),
        Section('[[providers]] type = "score"', ScoreConfig, rename=name),
        Section('[[providers]] type = "rating"', RatingConfig, rename=name),
        Section('[[providers.attributes]] (type = "rating")', RatedAttribute),
        Section('[[providers]] type = "scorer_critique"', ScorerCritiqueConfig, rename=name),
        Section('[[providers]] type = "scorer_refinement"', ScorerRefinementConfig, rename=name),
        Section('[[providers]] type = "scorer_pairwise"', ScorerPairwiseConfig, rename=name),
    ]
    align_tables = ("annotator", "learner", "server_args", "judge", "eval", "base")
    align = [
        Section("top level", AlignConfig, skip=align_tables),
        Section("[server]", ServerSection),
        Section("[judge]", JudgeServerConfig),
        Section("[eval]", EvalConfig, extra=(PROMPTS_FILE,)),
    ]
    serve = [
        Section("ServerConfig", ServerConfig),
        Section(
            "[[tokens]] (the --tokens file)",
            TokenGrant,
            extra=(("token", "string", "unset", "the token itself (instead of sha256)"),),
        ),
    ]
    return [
        ("tiller learn", "`tiller learn --config FILE` (TOML, or JSON ending in .json).", learn),
        ("tiller annotate", "`tiller annotate --config FILE` (TOML or JSON).", annotate),
        (
            "tiller align",
            "`tiller align --config FILE` (TOML). [annotator] is `tiller annotate`'s file "
            "without db; [learner] is `tiller learn`'s file without db, registry, workdir, "
            "model and server (align fills them in), its tables written [learner.train] etc.",
            align,
        ),
        (
            "tiller serve",
            "No file: `tiller serve`'s options build these (see `tiller serve --help`) and "
            "read their defaults from them; a server built from code gets the same defaults.",
            serve,
        ),
    ]


def reference() -> str:
    out = [
        "# Config reference",
        "",
        "Generated from the config dataclasses by "
        "`python -m tiller.server.tools.config_docs > docs/config-reference.md`; do not edit "
        "(a unit test fails when this file is stale). Every value is type-checked when the file "
        "is loaded: a wrong type or an unknown key is an error naming the file, the table, the "
        "key and the expected type.",
        "",
    ]
    for title, intro, secs in components():
        out += [f"## {title}", "", intro, ""]
        for s in secs:
            out += list(render(s))
    return "\n".join(out).rstrip("\n") + "\n"


if __name__ == "__main__":
    print(reference(), end="")
