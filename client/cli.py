"""The ``tiller`` command. Client commands live here; server commands load lazily from
``tiller.server.cli`` so that the base install (client only) works without torch or vLLM."""

from __future__ import annotations

import importlib
import inspect
import json
import sys
from typing import Any

import click

from .client import Client, TillerClientError

# The client's one default target (the server's default host and port), from Client itself.
DEFAULT_TARGET: str = inspect.signature(Client).parameters["target"].default
_EXTRA = dict.fromkeys(("annotate", "log", "registry", "learn", "align"), "learner")
_LAZY = {
    "serve": "tiller.server.cli:serve",
    "up": "tiller.server.cli:up",
    "model": "tiller.server.cli:model",
    "heads": "tiller.server.tools.heads_cli:heads",
    "annotate": "tiller.learner.annotate.cli:annotate",
    "log": "tiller.learner.logcli:log",
    "registry": "tiller.learner.registry_cli:registry",
    "learn": "tiller.learner.learn.cli:learn",
    "align": "tiller.learner.align.cli:align",
    "health": "tiller.client.health:health",
}


class _Group(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *_LAZY])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in _LAZY:
            module, attr = _LAZY[name].split(":")
            try:
                return getattr(importlib.import_module(module), attr)
            except ImportError as e:
                extra = _EXTRA.get(name, "cpu")
                raise click.ClickException(
                    f"'tiller {name}' needs the {extra} extras (pip install 'tiller[{extra}]'): {e}"
                ) from e
        return super().get_command(ctx, name)


@click.group(cls=_Group)
def main() -> None:
    """Tiller: steerable LLM serving with online learning."""


def _weights(pairs: tuple[str, ...], option: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for pair in pairs:
        name, sep, value = pair.rpartition("=")
        if not sep or not name:
            raise click.BadParameter(f"expected NAME=WEIGHT, got {pair!r}", param_hint=option)
        try:
            out[name] = float(value)
        except ValueError:
            raise click.BadParameter(
                f"weight of {name!r} is not a number", param_hint=option
            ) from None
    return out


@main.command()
@click.argument("prompt")
@click.option("--target", default=DEFAULT_TARGET, show_default=True, envvar="TILLER_TARGET")
@click.option("--token", default=None, envvar="TILLER_TOKEN", help="Bearer token.")
@click.option("--feedback", default="", help="ALT feedback tag to condition on.")
@click.option("--mix", "mix", multiple=True, help='Feedback mixture entry "TAG=WEIGHT".')
@click.option("--attr", "attrs", multiple=True, help='Attribute weight "NAME=WEIGHT".')
@click.option("--adapter", default="", help="Adapter name (optionally NAME@vN).")
@click.option("--max-tokens", type=int, default=None)
@click.option("--temperature", type=float, default=None)
@click.option("--top-p", type=float, default=None)
@click.option("--seed", type=int, default=None)
@click.option("--n", type=int, default=None)
@click.option("--stream/--no-stream", default=False)
@click.option("--json", "as_json", is_flag=True, help="Print the whole result as JSON.")
@click.option("--timeout", type=float, default=120.0, show_default=True)
def generate(
    prompt: str,
    target: str,
    token: str | None,
    feedback: str,
    mix: tuple[str, ...],
    attrs: tuple[str, ...],
    adapter: str,
    max_tokens: int | None,
    temperature: float | None,
    top_p: float | None,
    seed: int | None,
    n: int | None,
    stream: bool,
    as_json: bool,
    timeout: float,
) -> None:
    """Generate a completion for PROMPT on a running server."""
    name, _, version = adapter.partition("@v")
    kw: dict[str, Any] = dict(
        feedback=feedback,
        feedback_mix=_weights(mix, "--mix"),
        attributes=_weights(attrs, "--attr"),
        adapter=name,
        adapter_version=int(version) if version else None,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        n=n,
    )
    try:
        with Client(target, timeout=timeout, token=token) as client:
            if stream:
                for piece in client.stream(prompt, **kw):
                    click.echo(piece.text, nl=False)
                click.echo()
                return
            g = client.generate(prompt, **kw)
    except TillerClientError as e:
        raise click.ClickException(str(e)) from e
    if as_json:
        click.echo(
            json.dumps(
                {
                    "request_id": g.request_id,
                    "adapter": g.adapter,
                    "version": g.adapter_version,
                    "seed": g.seed,
                    "rendered_prompt": g.rendered_prompt,
                    "completions": [
                        {
                            "generation_id": c.generation_id,
                            "text": c.text,
                            "finish_reason": c.finish_reason,
                        }
                        for c in g.completions
                    ],
                    "usage": {
                        "prompt_tokens": g.prompt_tokens,
                        "completion_tokens": g.completion_tokens,
                    },
                },
                indent=2,
            )
        )
        return
    for c in g.completions:
        click.echo(c.text)


@main.command()
@click.option("--target", default=DEFAULT_TARGET, show_default=True, envvar="TILLER_TARGET")
@click.option("--token", default=None, envvar="TILLER_TOKEN")
def adapters(target: str, token: str | None) -> None:
    """List the adapters a running server serves."""
    try:
        with Client(target, token=token) as client:
            rows = client.adapters()
    except TillerClientError as e:
        raise click.ClickException(str(e)) from e
    for a in rows:
        default = " (default)" if a.is_default else ""
        tags = ", ".join(a.feedback_tags) or "-"
        click.echo(f"{a.name}@v{a.active_version}{default}  tags: {tags}")


@main.command()
@click.argument("generation_id")
@click.option("--target", default=DEFAULT_TARGET, show_default=True, envvar="TILLER_TARGET")
@click.option("--token", default=None, envvar="TILLER_TOKEN")
@click.option("--score", type=float, default=None, help="A numeric rating.")
@click.option("--tag", default="", help="A feedback tag.")
@click.option("--critique", default="")
@click.option("--refinement", default="", help="A better answer.")
@click.option("--preferred-over", default=None, help="This generation beats that one.")
@click.option("--key", "idempotency_key", default="", help="Idempotency key.")
@click.option("--source", default="cli")
def feedback(
    generation_id: str,
    target: str,
    token: str | None,
    score: float | None,
    tag: str,
    critique: str,
    refinement: str,
    preferred_over: str | None,
    idempotency_key: str,
    source: str,
) -> None:
    """Send app feedback on a logged generation (it joins the learner's data)."""
    try:
        with Client(target, token=token) as client:
            receipt = client.submit_feedback(
                generation_id,
                score=score,
                tag=tag,
                critique=critique,
                refinement=refinement,
                preferred_over=preferred_over,
                idempotency_key=idempotency_key,
                source=source,
            )
    except TillerClientError as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"{receipt.feedback_id}{' (duplicate)' if receipt.duplicate else ''}")


@main.command()
@click.option("--target", default=DEFAULT_TARGET, show_default=True, envvar="TILLER_TARGET")
def status(target: str) -> None:
    """Show a running server's status."""
    try:
        with Client(target) as client:
            s = client.status()
    except TillerClientError as e:
        raise click.ClickException(str(e)) from e
    click.echo(json.dumps(s.__dict__))


if __name__ == "__main__":
    sys.exit(main())
