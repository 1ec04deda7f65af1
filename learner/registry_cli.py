"""``tiller registry``: list, promote and roll back adapter versions in a registry on disk.

Servers started with ``--registry`` follow these changes (hot-swap).
"""

from __future__ import annotations

from pathlib import Path

import click

from tiller.server.formats.errors import TillerError
from tiller.server.formats.registry import (
    PublishError,
    list_versions,
    promote,
    read_state,
    rollback,
)

_REGISTRY = click.option(
    "--registry",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    envvar="TILLER_REGISTRY",
    help="Registry directory.",
)


@click.group()
def registry() -> None:
    """Adapter versions on disk: list, promote, roll back."""


@registry.command("list")
@_REGISTRY
def list_cmd(registry: Path) -> None:
    """Every adapter with its versions; * marks the active one."""
    if not registry.is_dir():
        raise click.ClickException(f"no registry at {registry}")
    for root in sorted(p for p in registry.iterdir() if p.is_dir()):
        active = read_state(registry, root.name).active
        versions = " ".join(
            f"{'*' if v == active else ''}v{v}" for v in list_versions(registry, root.name)
        )
        click.echo(f"{root.name}: {versions or '(no complete versions)'}")


@registry.command("promote")
@_REGISTRY
@click.argument("name")
@click.argument("version", type=int)
def promote_cmd(registry: Path, name: str, version: int) -> None:
    """Make VERSION of NAME the active version (verified first)."""
    try:
        state = promote(registry, name, version)
    except (PublishError, TillerError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"{name}: active v{state.active}")


@registry.command("rollback")
@_REGISTRY
@click.argument("name")
def rollback_cmd(registry: Path, name: str) -> None:
    """Return NAME to the version promoted before the active one."""
    try:
        state = rollback(registry, name)
    except (PublishError, TillerError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"{name}: active v{state.active}")
