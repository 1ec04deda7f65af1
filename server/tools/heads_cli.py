"""``tiller heads``: make and inspect steering-heads artifacts (adapter versions with heads)."""

from __future__ import annotations

import json
from pathlib import Path

import click

_MODEL = click.option(
    "--model",
    "model",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    required=True,
    help="The base model directory (HF format) the heads are for.",
)
_VERSION = [
    click.option("--name", default="steer", show_default=True, help="Adapter name."),
    click.option("--version", type=int, default=1, show_default=True),
]


def _version_opts(f):  # type: ignore[no-untyped-def]
    for opt in reversed(_VERSION):
        f = opt(f)
    return f


@click.group()
def heads() -> None:
    """Steering heads (CMPO plural LM heads) for attribute-weighted generation."""


@heads.command("init")
@_MODEL
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--attribute", "attributes", multiple=True, required=True, help="Head name.")
@click.option("--kind", type=click.Choice(["lowrank", "full"]), default="lowrank")
@click.option("--rank", type=int, default=8, show_default=True)
@click.option("--scale", type=float, default=0.05, show_default=True, help="Noise scale.")
@click.option("--seed", type=int, default=0, show_default=True)
@_version_opts
def heads_init(
    model: Path,
    out: Path,
    attributes: tuple[str, ...],
    kind: str,
    rank: int,
    scale: float,
    seed: int,
    name: str,
    version: int,
) -> None:
    """Write an adapter version OUT with a ``base`` head and one head per --attribute,
    initialised from the base head plus seeded noise (testing, or a starting point to train)."""
    from .heads_build import init_heads, write_version

    init_heads(model, out, attributes, kind=kind, rank=rank, scale=scale, seed=seed)
    click.echo(write_version(out, name, version, model.name))


def _word_lists(values: tuple[str, ...]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for v in values:
        name, sep, words = v.partition("=")
        listed = [w.strip() for w in words.split(",") if w.strip()]
        if not sep or not name or not listed:
            raise click.BadParameter(
                f"expected NAME=WORD,WORD,..., got {v!r}", param_hint="--words"
            )
        if name == "base" or name in out:
            raise click.BadParameter(f"attribute {name!r} is taken", param_hint="--words")
        out[name] = listed
    return out


@heads.command("lexical")
@_MODEL
@click.argument("out", type=click.Path(path_type=Path))
@click.option(
    "--words",
    "word_lists",
    multiple=True,
    required=True,
    help="NAME=WORD,WORD,...: a head NAME that raises these words.",
)
@click.option(
    "--strength",
    type=float,
    default=4.0,
    show_default=True,
    help="Logit boost of the words at weight 1.",
)
@_version_opts
def heads_lexical(
    model: Path,
    out: Path,
    word_lists: tuple[str, ...],
    strength: float,
    name: str,
    version: int,
) -> None:
    """Write an adapter version OUT with a ``base`` head and one head per --words that raises
    the logits of its words by about STRENGTH × its weight (``--attr NAME=1``: the base model
    plus the boost; ``--attr base=0.5 --attr NAME=0.5``: half the boost). Takes seconds."""
    from .heads_build import lexical_heads, write_version

    _, missing = lexical_heads(model, out, _word_lists(word_lists), strength=strength)
    for attr, words in missing.items():
        if words:
            click.echo(f"{attr}: no single token for {', '.join(words)} (left out)", err=True)
    click.echo(write_version(out, name, version, model.name))


def _head_ref(value: str) -> tuple[Path, str]:
    path, sep, attr = value.rpartition(":")
    if not sep or not path or not attr:
        raise click.BadParameter(f"expected DIR:ATTRIBUTE, got {value!r}")
    return Path(path), attr


@heads.command("diff")
@_MODEL
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--plus", required=True, help="DIR:ATTRIBUTE of the head to move towards.")
@click.option("--minus", required=True, help="DIR:ATTRIBUTE of the head to move away from.")
@click.option("--attribute", required=True, help="Name of the new head.")
@_version_opts
def heads_diff(
    model: Path, out: Path, plus: str, minus: str, attribute: str, name: str, version: int
) -> None:
    """Write an adapter version OUT whose head ATTRIBUTE is W_0 + (W_plus - W_minus)."""
    from .heads_build import difference_head, write_version

    difference_head(model, _head_ref(plus), _head_ref(minus), out, attribute)
    click.echo(write_version(out, name, version, model.name))


@heads.command("show")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
def heads_show(directory: Path) -> None:
    """Print a heads artifact's manifest after checking its tensors."""
    from ..formats.heads import read_heads

    click.echo(json.dumps(read_heads(directory).to_json(), indent=2))
