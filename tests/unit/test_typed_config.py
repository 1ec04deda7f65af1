"""Typed configs: every key of every config file is type-checked when the file loads, and the
error names the file, the table, the key and the expected type; the server's defaults live in
its dataclasses only; docs/config-reference.md is the generator's output."""

from __future__ import annotations

import re
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

from tiller.learner.align.config import load_config as load_align
from tiller.learner.annotate.config import load_config as load_annotate
from tiller.learner.learn.config import load_config as load_learn
from tiller.learner.objectives.alt import ALTConfig
from tiller.server.config import EngineConfig, Limits, LogConfig, ServerConfig
from tiller.server.formats.sections import ConfigError, field_default

ROOT = Path(__file__).resolve().parents[2]

LEARN = """\
db = "log.sqlite"
registry = "reg"
workdir = "work"
model = "m"
adapter = "critic"
base_model = "tiny"
server = "127.0.0.1:1"
{top}
[data]
kind = "pairs"
source = "score"
provider = "len"
{tables}
"""


def _file(tmp_path: Path, text: str, name: str = "cfg.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def _fails(load: object, path: Path, needle: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(path)  # type: ignore[operator]
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    rest = message.removeprefix(f"{path}: ")
    assert re.search(needle, rest), message
    return rest


@pytest.mark.parametrize(
    ("top", "tables", "needle"),
    [
        # top level: a string is never read as a bool or a number
        (
            'continue_training = "false"',
            "",
            r"^continue_training: Input should be a valid boolean \(got 'false'\)",
        ),
        ('max_iterations = "3"', "", r"^max_iterations: Input should be a valid integer"),
        ("admin_server = 3", "", r"^admin_server: Input should be a valid string \(got 3\)"),
        ("bogus = 1", "", r"unknown keys \['bogus'\]"),
        ("train = 3", "", r"^\[train\]: must be a table \(got 3\)"),
        # [train]: bool, number, Literal, list for a scalar, scalar for a list, unknown key
        (
            "",
            '[train]\ngradient_checkpointing = "false"',
            r"\[train\] gradient_checkpointing: Input should be a valid boolean \(got 'false'\)",
        ),
        ("", '[train]\nlr = "fast"', r"\[train\] lr: Input should be a valid number"),
        (
            "",
            '[train]\nlr_schedule = "cosine"',
            r"\[train\] lr_schedule: Input should be 'constant' or 'linear' \(got 'cosine'\)",
        ),
        ("", "[train]\nlora_r = [8]", r"\[train\] lora_r: Input should be a valid integer"),
        ("", "[train]\nlora_r = 8.5", r"\[train\] lora_r: Input should be a valid integer"),
        (
            "",
            '[train]\ntarget_modules = "q_proj"',
            r"\[train\] target_modules: Input should be a valid array",
        ),
        ("", "[train]\nlr_warmup = 3", r"\[train\]: unknown keys \['lr_warmup'\]"),
        (
            "",
            '[train]\nobjective = "dpo"\n[train.objective_config]\nbeta = "big"',
            r"\[train.objective_config\] beta: Input should be a valid number",
        ),
        ("", "[train]\nobjective = 1", r"\[train\] objective: Input should be a valid string"),
        # the other tables
        (
            "",
            "[trigger]\nmin_annotations = true",
            r"\[trigger\] min_annotations: Input should be a valid integer \(got True\)",
        ),
        (
            "",
            '[sample]\nprompts = ["a"]\nfeedback = 3',
            r"\[sample\] feedback: Input should be string \| array of string \(got 3\)",
        ),
        (
            "",
            '[sample]\nprompts = ["a"]\nattributes = [{x = "high"}]',
            r"\[sample\] attributes\[0\].x: Input should be a valid number",
        ),
        (
            "",
            '[gate]\nprompts = ["a"]\nscorer = "length"\nhigher_is_better = "no"',
            r"\[gate\] higher_is_better: Input should be a valid boolean",
        ),
        (
            "",
            '[gate]\nprompts = ["a"]\n[gate.judge]\nbase_url = "http://h/v1"\nmodel = "m"\n'
            'timeout_s = "30"',
            r"\[gate.judge\] timeout_s: Input should be a valid number",
        ),
        ("", '[gate]\nprompts_file = 7\nscorer = "length"', r"\[gate\] prompts_file: .*string"),
    ],
)
def test_learn_config_wrong_types_name_the_file_and_key(
    tmp_path: Path, top: str, tables: str, needle: str
) -> None:
    path = _file(tmp_path, LEARN.format(top=top, tables=tables))
    _fails(lambda p: load_learn(p, {}), path, needle)


def test_learn_config_keeps_its_checks_and_converts_json_numbers(tmp_path: Path) -> None:
    path = _file(tmp_path, LEARN.format(top="", tables="[train]\ncheckpoint_dir = 'x'"))
    _fails(lambda p: load_learn(p, {}), path, r"\[train\]: checkpoint_dir is managed by")
    good = _file(tmp_path, LEARN.format(top="max_iterations = 2", tables="[train]\nlr = 1"))
    cfg = load_learn(good, {})
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float) and cfg.max_iterations == 2
    assert cfg.db == tmp_path / "log.sqlite" and cfg.continue_training is True


def test_learn_config_alt_contrast_and_reference(tmp_path: Path) -> None:
    def alt(data: str, tables: str = "") -> Path:
        text = LEARN.format(top="", tables='[train]\nobjective = "alt"\n' + tables).replace(
            'kind = "pairs"\nsource = "score"',
            f'kind = "alt"\ntags = ["A", "B", "C"]\ntemplate = "{{feedback}}: {{prompt}}"\n{data}',
        )
        return _file(tmp_path, text)

    contrast = "[train.objective_config]\ncontrast = 0.5"
    _fails(lambda p: load_learn(p, {}), alt("", contrast), r"needs data.contrast_tags >= 1")
    _fails(
        lambda p: load_learn(p, {}), alt("contrast_tags = 3"), r"contrast_tags must be in \[0, 2\]"
    )
    _fails(lambda p: load_learn(p, {}), alt('reference = "base"'), r"reference")
    cfg = load_learn(alt('contrast_tags = 2\nreference = "untagged"', contrast), {})
    assert cfg.data.contrast_tags == 2 and cfg.data.reference == "untagged"
    assert cfg.train.loss_config == ALTConfig(contrast=0.5)
    pairs = _file(
        tmp_path,
        LEARN.format(top="", tables="").replace(
            'provider = "len"', 'provider = "len"\ncontrast_tags = 1'
        ),
    )
    _fails(lambda p: load_learn(p, {}), pairs, r"apply to data.kind 'alt' only")


def test_learn_config_syntax_errors_name_the_file(tmp_path: Path) -> None:
    path = _file(tmp_path, "db = \n")
    _fails(lambda p: load_learn(p, {}), path, r"Invalid value")
    bad_json = _file(tmp_path, '{"db": "x", "max_iterations": "3"}', name="cfg.json")
    _fails(lambda p: load_learn(p, {}), bad_json, r"max_iterations: Input should be a valid int")


ANNOTATE = """\
db = "log.sqlite"
{top}
[[providers]]
name = "len"
type = "score"
scorer = "length"
{tables}
"""


@pytest.mark.parametrize(
    ("top", "tables", "needle"),
    [
        ('batch_size = "32"', "", r"^batch_size: Input should be a valid integer \(got '32'\)"),
        ("poll_interval_s = [1]", "", r"poll_interval_s: Input should be a valid number"),
        ("bogus = 1", "", r"unknown keys \['bogus'\]"),
        (
            "",
            '[[providers]]\nname = "q"\ntype = "quantile"\nscorer = "length"\ntags = ["a", "b"]\n'
            'mode = "sometimes"',
            r"providers\[1\] \(q\) mode: Input should be 'per_prompt', 'global' or 'fixed'",
        ),
        (
            "",
            '[[providers]]\nname = "j"\ntype = "llm_judge"\nmode = "pairwise"\n'
            'base_url = "http://h/v1"\nmodel = "m"\nstructured = "yes"',
            r"providers\[1\] \(j\) structured: Input should be a valid boolean",
        ),
        (
            "",
            '[[providers]]\nname = "r"\ntype = "rating"\n[[providers.attributes]]\nname = "a"\n'
            'scorer = "length"\ncuts = "1, 2"',
            r"providers\[1\] \(r\): attributes\[0\] cuts: Input should be a valid array",
        ),
    ],
)
def test_annotate_config_wrong_types_name_the_file_and_key(
    tmp_path: Path, top: str, tables: str, needle: str
) -> None:
    path = _file(tmp_path, ANNOTATE.format(top=top, tables=tables))
    _fails(lambda p: load_annotate(p, {}), path, needle)


ALIGN = """\
name = "x"
{top}
[annotator]
[[annotator.providers]]
name = "len"
type = "score"
scorer = "length"

[learner]
adapter = "a"
base_model = "b"
{learner}
[learner.data]
kind = "pairs"
source = "score"
provider = "len"

[learner.sample]
prompts = ["p"]
{tables}
"""


@pytest.mark.parametrize(
    ("top", "learner", "tables", "needle"),
    [
        ('duration_s = "long"', "", "", r"^duration_s: Input should be a valid number"),
        ('mode = "sometimes"', "", "", r"^mode: Input should be 'active' or 'passive'"),
        (
            'worker_priority = "low"',
            "",
            "",
            r"^worker_priority: Input should be 'background' or 'normal'",
        ),
        ("model = true", "", "", r"^model: Input should be a valid string \(got True\)"),
        ("", 'continue_training = "false"', "", r"\[learner\] continue_training: .*boolean"),
        ("", 'max_iterations = "3"', "", r"\[learner\] max_iterations: .*valid integer"),
        ("", "", '[learner.train]\nlr = "fast"', r"\[learner.train\] lr: .*valid number"),
        ("", "", '[server]\nargs = "--x"', r"\[server\] args: Input should be a valid array"),
        ("", "", "[judge]\nmodel = 3", r"\[judge\] model: Input should be a valid string"),
        ("", "", "[judge]\nargs = []", r"\[judge\]: required key missing: model \(string\)"),
        ("", "", "[sampler]\nargs = 1", r"\[sampler\] args: Input should be a valid array"),
        ("", "", "[sampler]\nport = 1", r"\[sampler\].*port"),
        (
            "",
            "",
            '[eval]\nprompts = ["p"]\nscorer = "length"\nperplexity = "no"',
            r"\[eval\] perplexity: Input should be a valid boolean",
        ),
    ],
)
def test_align_config_wrong_types_name_the_file_and_key(
    tmp_path: Path, top: str, learner: str, tables: str, needle: str
) -> None:
    path = _file(tmp_path, ALIGN.format(top=top, learner=learner, tables=tables))
    _fails(load_align, path, needle)


def test_align_config_checks_the_annotator_section(tmp_path: Path) -> None:
    text = ALIGN.format(top="", learner="", tables="").replace(
        "[annotator]\n", '[annotator]\nbatch_size = "8"\n'
    )
    _fails(load_align, _file(tmp_path, text), r"\[annotator\] batch_size: .*valid integer")
    assert load_align(_file(tmp_path, ALIGN.format(top="", learner="", tables=""))).name == "x"


def test_align_server_engine_args_become_vllm_flags_after_the_separator(tmp_path: Path) -> None:
    tables = (
        '[server]\nargs = ["--max-tokens-cap", "64"]\n'
        "[server.engine_args]\nmax_num_seqs = 7\nenforce_eager = false\n"
        '"max-num-batched-tokens" = 512\n'
    )
    cfg = load_align(_file(tmp_path, ALIGN.format(top="", learner="", tables=tables)))
    assert cfg.server_args == (
        "--max-tokens-cap", "64", "--",
        "--max-num-seqs", "7", "--no-enforce-eager", "--max-num-batched-tokens", "512",
    )  # fmt: skip


def test_align_sampler_table_becomes_the_replicas_serve_flags(tmp_path: Path) -> None:
    plain = load_align(_file(tmp_path, ALIGN.format(top="", learner="", tables="")))
    assert plain.sampler is None
    tables = (
        '[sampler]\nargs = ["--max-tokens-cap", "64"]\n[sampler.engine_args]\nmax_num_seqs = 8\n'
    )
    cfg = load_align(_file(tmp_path, ALIGN.format(top="", learner="", tables=tables)))
    assert cfg.sampler is not None
    assert cfg.sampler.args == ("--max-tokens-cap", "64", "--", "--max-num-seqs", "8")
    assert cfg.server_args == ()  # the users' server keeps its own flags
    empty = load_align(_file(tmp_path, ALIGN.format(top="", learner="", tables="[sampler]\n")))
    assert empty.sampler is not None and empty.sampler.args == ()


def test_a_server_built_from_code_has_the_cli_defaults(tmp_path: Path) -> None:
    from tiller.server.cli import serve, serve_config

    ctx = serve.make_context("serve", ["--model", str(tmp_path)])
    from_cli = serve_config(dict(ctx.params))
    from_code = ServerConfig(engine=EngineConfig(model=tmp_path))
    assert from_cli.limits.max_request_s == from_code.limits.max_request_s == 900.0
    assert replace(from_cli, log=None) == from_code
    assert from_cli.log is not None and from_cli.log == LogConfig(path=from_cli.log.path)


def test_the_cli_options_read_their_defaults_from_the_dataclasses() -> None:
    from tiller.client.cli import DEFAULT_TARGET
    from tiller.server.cli import serve

    options = {p.name: p for p in serve.params}
    assert options["max_request_seconds"].default == field_default(Limits, "max_request_s")
    assert options["drain_grace"].default == field_default(ServerConfig, "drain_grace_s")
    assert options["kv_blocks"].default == field_default(EngineConfig, "num_kv_blocks")
    host, port = field_default(ServerConfig, "host"), field_default(ServerConfig, "port")
    assert f"{host}:{port}" == DEFAULT_TARGET
    with pytest.raises(KeyError, match="no default"):
        field_default(EngineConfig, "model")


def test_config_reference_is_the_generators_output() -> None:
    from tiller.server.tools.config_docs import reference

    committed = ROOT / "docs" / "config-reference.md"
    assert committed.exists(), "docs/config-reference.md is not committed"
    assert committed.read_text() == reference(), (
        "docs/config-reference.md is stale: run "
        "python -m tiller.server.tools.config_docs > docs/config-reference.md"
    )


def test_each_table_of_an_array_of_tables_refuses_unknown_keys() -> None:
    from tiller.learner.annotate.ratings import RatingConfig
    from tiller.server.formats.sections import build_section

    entry = {"name": "a", "scorer": "length", "cuts": [1.0]}
    ok = build_section(RatingConfig, {"provider_name": "r", "attributes": [entry]}, "[p]")
    assert ok.attributes[0].name == "a" and ok.attributes[0].cuts == (1.0,)
    typo = {"provider_name": "r", "attributes": [entry, {**entry, "higher_is_beter": False}]}
    with pytest.raises(
        ConfigError, match=r"\[\[p\.attributes\]\] #2: unknown keys \['higher_is_beter'\]"
    ):
        build_section(RatingConfig, typo, "[p]")
