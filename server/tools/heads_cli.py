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
