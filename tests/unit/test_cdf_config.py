"""``data.kind = "cdf"`` in the learner's config: the three providers, the trigger's provider, the
rewrite settings and the objective are checked at load, each error naming its field."""

from __future__ import annotations

from pathlib import Path

import pytest

from tiller.learner.learn.config import load_config
from tiller.server.formats.sections import ConfigError

BASE = """\
db = "log.sqlite"
registry = "reg"
workdir = "work"
model = "m"
adapter = "critic"
base_model = "tiny"
server = "127.0.0.1:1"

[train]
objective = "dpo"
"""
CDF = """
[data]
kind = "cdf"
provider = "refine"
critique_provider = "crit"
refinement_provider = "refine"
preference_provider = "verdict"
"""


def _load(tmp_path: Path, text: str) -> object:
    path = tmp_path / "learn.toml"
    path.write_text(text)
    return load_config(path, {})


def test_a_cdf_config_loads_with_its_providers(tmp_path: Path) -> None:
    cfg = _load(
        tmp_path, BASE + CDF + "rewrite_max_tokens = 32\nrewrite_repetition_penalty = 1.2\n"
    )
    d = cfg.data  # type: ignore[attr-defined]
    assert (d.kind, d.provider) == ("cdf", "refine")
    assert (d.critique_provider, d.refinement_provider, d.preference_provider) == (
        "crit", "refine", "verdict",
    )  # fmt: skip
    assert d.rewrite_max_tokens == 32 and d.rewrite_repetition_penalty == 1.2
    assert "{critique}" in d.rewrite_template


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (('critique_provider = "crit"\n', ""), r"needs data\.critique_provider"),
        (('preference_provider = "verdict"\n', ""), r"needs data\.preference_provider"),
        (('provider = "refine"\n', 'provider = "sentiment"\n'), r"data\.provider 'sentiment'"),
        (('kind = "cdf"\n', 'kind = "cdf"\nsource = "judge"\n'), r"data\.source"),
        (('kind = "cdf"\n', 'kind = "cdf"\nrewrite_template = "{prompt}"\n'), "rewrite_template"),
        (('kind = "cdf"\n', 'kind = "cdf"\nrewrite_max_tokens = 0\n'), "rewrite_max_tokens"),
        (('kind = "cdf"\n', 'kind = "cdf"\nrewrite_max_tokens = "many"\n'), "rewrite_max_tokens"),
        (('kind = "cdf"\n', 'kind = "cdf"\ncritique_provder = "x"\n'), "critique_provder"),
        (('kind = "cdf"\n', 'kind = "cdff"\n'), "cdff"),
    ],
)
def test_bad_cdf_data_names_the_field(tmp_path: Path, change: tuple[str, str], needle: str) -> None:
    old, new = change
    assert old in CDF
    with pytest.raises(ConfigError, match=needle):
        _load(tmp_path, BASE + CDF.replace(old, new, 1))


def test_cdf_fields_belong_to_kind_cdf_and_it_trains_pairs_objectives(tmp_path: Path) -> None:
    pairs = '\n[data]\nkind = "pairs"\nprovider = "s"\ncritique_provider = "crit"\n'
    with pytest.raises(ConfigError, match=r"data\.critique_provider applies to data\.kind 'cdf'"):
        _load(tmp_path, BASE + pairs)
    with pytest.raises(ConfigError, match=r"data\.kind 'cdf' cannot train objective 'sft'"):
        _load(tmp_path, BASE.replace('"dpo"', '"sft"') + CDF)
    with pytest.raises(ConfigError, match=r"data\.kind 'cdf' needs server"):
        _load(tmp_path, BASE.replace('server = "127.0.0.1:1"\n', "") + CDF)
