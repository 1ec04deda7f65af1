"""``tiller serve`` options for security, limits and observability, and the configs they build.

Kept apart from ``cli.py`` so that the serve command only gains one decorator and one call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from .auth import TokenFileError, load_tokens
from .config import (
    HttpConfig,
    Limits,
    ObservabilityConfig,
    SecurityConfig,
    TlsConfig,
    choices,
)
from .formats.sections import field_default

_KEYS = (
    "tokens",
    "tls_cert",
    "tls_key",
    "tls_client_ca",
    "admin_host",
    "admin_port",
    "adapter_roots",
    "max_prompt_tokens",
    "max_request_seconds",
    "metrics_host",
    "metrics_port",
    "log_format",
    "log_level",
    "http_host",
    "http_port",
    "http_port_file",
)
_FILE = click.Path(path_type=Path, exists=True, dir_okay=False)


def edge_options(f: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option(
            "--tokens",
            type=_FILE,
            default=None,
            help="Bearer tokens with roles (TOML/JSON; see tiller.server.auth). "
            "Unset: no authentication.",
        ),
        click.option("--tls-cert", type=_FILE, default=None, help="PEM server certificate."),
        click.option("--tls-key", type=_FILE, default=None, help="PEM private key."),
        click.option(
            "--tls-client-ca",
            type=_FILE,
            default=None,
            help="PEM CA: require client certificates signed by it (mTLS).",
        ),
        click.option(
            "--admin-host", default=field_default(SecurityConfig, "admin_host"), show_default=True
        ),
        click.option(
            "--admin-port",
            type=int,
            default=field_default(SecurityConfig, "admin_port"),
            help="Serve TillerAdmin only on this port (0 = any free), not on the main one.",
        ),
        click.option(
            "--adapter-root",
            "adapter_roots",
            multiple=True,
            type=click.Path(path_type=Path, file_okay=False),
            help="LoadAdapter may only load version directories inside these (repeatable).",
        ),
        click.option(
            "--max-prompt-tokens", type=int, default=field_default(Limits, "max_prompt_tokens")
        ),
        click.option(
            "--max-request-seconds",
            type=float,
            default=field_default(Limits, "max_request_s") or 0.0,
            show_default=True,
            help="Server-side cap on one RPC's duration (DEADLINE_EXCEEDED); 0 = none.",
        ),
        click.option(
            "--metrics-host",
            default=field_default(ObservabilityConfig, "metrics_host"),
            show_default=True,
        ),
        click.option(
            "--metrics-port",
            type=int,
            default=field_default(ObservabilityConfig, "metrics_port"),
            help="Prometheus /metrics on this port (0 = any free). Unset: no metrics.",
        ),
        click.option(
            "--log-format",
            type=click.Choice(choices(ObservabilityConfig, "log_format")),
            default=field_default(ObservabilityConfig, "log_format"),
            show_default=True,
        ),
        click.option(
            "--log-level",
            type=click.Choice(choices(ObservabilityConfig, "log_level"), case_sensitive=False),
            default=field_default(ObservabilityConfig, "log_level"),
            show_default=True,
        ),
        click.option("--http-host", default=field_default(HttpConfig, "host"), show_default=True),
        click.option(
            "--http-port",
            type=int,
            default=None,
            help="Serve the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
            "/v1/models, /v1/feedback) on this port too (0 = any free). Unset: gRPC only.",
        ),
        click.option(
            "--http-port-file",
            type=click.Path(path_type=Path),
            default=None,
            help="Write the bound HTTP port here once serving.",
        ),
    ]
    for opt in reversed(options):
        f = opt(f)
    return f


@dataclass(frozen=True)
class EdgeConfigs:
    security: SecurityConfig
    observability: ObservabilityConfig
    max_prompt_tokens: int | None
    max_request_s: float | None
    http: HttpConfig | None = None


def edge_configs(kw: dict[str, Any]) -> EdgeConfigs:
    """Pop this module's options from ``kw`` and build their configs (``click`` errors)."""
    e = {k: kw.pop(k) for k in _KEYS}
    if (e["tls_cert"] is None) != (e["tls_key"] is None):
        raise click.UsageError("--tls-cert and --tls-key go together")
    if e["tls_client_ca"] is not None and e["tls_cert"] is None:
        raise click.UsageError("--tls-client-ca needs --tls-cert and --tls-key")
    try:
        tokens = load_tokens(e["tokens"]) if e["tokens"] is not None else None
    except TokenFileError as err:
        raise click.BadParameter(str(err), param_hint="--tokens") from None
    tls = None
    if e["tls_cert"] is not None:
        tls = TlsConfig(cert=e["tls_cert"], key=e["tls_key"], client_ca=e["tls_client_ca"])
    if e["max_prompt_tokens"] is not None and e["max_prompt_tokens"] <= 0:
        raise click.BadParameter("must be > 0", param_hint="--max-prompt-tokens")
    seconds = e["max_request_seconds"]
    return EdgeConfigs(
        security=SecurityConfig(
            tokens=tokens,
            tls=tls,
            admin_host=e["admin_host"],
            admin_port=e["admin_port"],
            adapter_roots=tuple(e["adapter_roots"]),
        ),
        observability=ObservabilityConfig(
            metrics_host=e["metrics_host"],
            metrics_port=e["metrics_port"],
            log_format=e["log_format"],
            log_level=e["log_level"].upper(),
        ),
        max_prompt_tokens=e["max_prompt_tokens"],
        max_request_s=seconds if seconds and seconds > 0 else None,
        http=None
        if e["http_port"] is None
        else HttpConfig(e["http_host"], e["http_port"], e["http_port_file"]),
    )
