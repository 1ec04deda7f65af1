"""The ``tiller`` command. Client commands live here; server commands load lazily from
``tiller.server.cli`` so that the base install (client only) works without torch or vLLM."""

from __future__ import annotations

import importlib
import inspect
import json
import sys
from typing import Any

import click
import grpc

from .client import Client
from .errors import TillerClientError

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


# The server's answer to a chat request for a model without a chat template.
_NO_TEMPLATE = "no chat template"

_REQUEST_OPTIONS = [
    click.option("--target", default=DEFAULT_TARGET, show_default=True, envvar="TILLER_TARGET"),
    click.option("--token", default=None, envvar="TILLER_TOKEN", help="Bearer token."),
    click.option("--feedback", default="", help="ALT feedback tag to condition on."),
    click.option("--mix", "mix", multiple=True, help='Feedback mixture entry "TAG=WEIGHT".'),
    click.option("--attr", "attrs", multiple=True, help='Attribute weight "NAME=WEIGHT".'),
    click.option("--adapter", default="", help="Adapter name (optionally NAME@vN)."),
    click.option("--system", default="", help="A system message (chat only)."),
    click.option("--max-tokens", type=int, default=None),
    click.option("--temperature", type=float, default=None),
    click.option("--top-p", type=float, default=None),
    click.option("--seed", type=int, default=None),
    click.option("--timeout", type=float, default=120.0, show_default=True),
]


def _request_options(f: Any) -> Any:
    for opt in reversed(_REQUEST_OPTIONS):
        f = opt(f)
    return f


def _request_kw(kw: dict[str, Any]) -> dict[str, Any]:
    """The ``Client.generate`` keyword arguments of the shared options (popped from ``kw``)."""
    name, _, version = kw.pop("adapter").partition("@v")
    return dict(
        feedback=kw.pop("feedback"),
        feedback_mix=_weights(kw.pop("mix"), "--mix"),
        attributes=_weights(kw.pop("attrs"), "--attr"),
        adapter=name,
        adapter_version=int(version) if version else None,
        max_tokens=kw.pop("max_tokens"),
        temperature=kw.pop("temperature"),
        top_p=kw.pop("top_p"),
        seed=kw.pop("seed"),
    )


def _no_template(e: TillerClientError) -> bool:
    return e.code == grpc.StatusCode.INVALID_ARGUMENT and _NO_TEMPLATE in e.message


def _chat(system: str, turns: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{"role": "system", "content": system}, *turns] if system else turns


@main.command()
@click.argument("prompt")
@_request_options
@click.option("--raw", is_flag=True, help="Send PROMPT as a plain completion, not a chat turn.")
@click.option("--n", type=int, default=None)
@click.option("--stream/--no-stream", default=False)
@click.option("--json", "as_json", is_flag=True, help="Print the whole result as JSON.")
def generate(
    prompt: str,
    target: str,
    token: str | None,
    system: str,
    timeout: float,
    raw: bool,
    n: int | None,
    stream: bool,
    as_json: bool,
    **options: Any,
) -> None:
    """Generate an answer to PROMPT on a running server.

    PROMPT goes as a chat user message (the model's chat template renders it); a model
    without a chat template gets it as a plain completion, as --raw sends it."""
    if raw and system:
        raise click.UsageError("--system is a chat message: it does not go with --raw")
    kw = {**_request_kw(options), "n": n}
    try:
        with Client(target, timeout=timeout, token=token) as client:
            if not raw:
                try:
                    chat = _chat(system, [{"role": "user", "content": prompt}])
                    _emit(client, chat, kw, stream, as_json)
                    return
                except TillerClientError as e:
                    if not _no_template(e) or system:
                        raise
                click.echo("tiller: the model has no chat template; sent as plain text", err=True)
            _emit(client, prompt, kw, stream, as_json)
    except TillerClientError as e:
        raise click.ClickException(str(e)) from e


def _emit(
    client: Client,
    prompt: str | list[dict[str, str]],
    kw: dict[str, Any],
    stream: bool,
    as_json: bool,
) -> None:
    if stream:
        for piece in client.stream(prompt, **kw):
            click.echo(piece.text, nl=False)
        click.echo()
        return
    g = client.generate(prompt, **kw)
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
@_request_options
def chat(target: str, token: str | None, system: str, timeout: float, **options: Any) -> None:
    """Chat with a running server: each line of stdin is a user turn, the answer streams back.
    The conversation is kept and sent whole each turn; /exit or end of input ends it. Piped
    input is echoed after "> " so that the output reads as a terminal session would."""
    kw = _request_kw(options)
    turns: list[dict[str, str]] = []
    interactive = sys.stdin.isatty()
    try:
        with Client(target, timeout=timeout, token=token) as client:
            while True:
                if interactive:
                    click.echo("> ", nl=False)
                line = sys.stdin.readline()
                text = line.strip()
                if not line or text == "/exit":
                    return
                if not text:
                    continue
                if not interactive:
                    click.echo(f"> {text}")
                turns.append({"role": "user", "content": text})
                answer = []
                for piece in client.stream(_chat(system, turns), **kw):
                    click.echo(piece.text, nl=False)
                    answer.append(piece.text)
                click.echo()
                turns.append({"role": "assistant", "content": "".join(answer)})
    except TillerClientError as e:
        if _no_template(e):
            raise click.ClickException(
                "the model has no chat template; use tiller generate --raw"
            ) from e
        raise click.ClickException(str(e)) from e


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
