"""One ``/metrics``: Tiller's ``tiller_*`` series beside vLLM's own ``vllm:*`` ones, counters
typed as counters, and the served model name as ``model_name`` on both."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, Counter
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ServerProc, start_server, stop_server
from tests.ports import wait_announced
from tiller.client import Client
from tiller.server.metrics import Metrics

# vLLM's stat logger: scheduler state, KV cache, latency histograms, request totals.
VLLM_SERIES = (
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:time_to_first_token_seconds",
    "vllm:inter_token_latency_seconds",
    "vllm:request_success",
)


@dataclass
class Scraped:
    text: str
    types: dict[str, str]  # family name -> type
    samples: list[tuple[str, dict[str, str], float]]


def _parse(text: str) -> Scraped:
    types, samples = {}, []
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        samples.extend((s.name, dict(s.labels), s.value) for s in family.samples)
    return Scraped(text, types, samples)


@dataclass
class MetricsServer:
    srv: ServerProc
    url: str
    model_name: str


@pytest.fixture(scope="module")
def metrics_server(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MetricsServer]:
    work = tmp_path_factory.mktemp("metrics")
    srv = start_server(
        tiny_model, work, "--metrics-port", "0", "--log-db", str(work / "log.sqlite")
    )
    port = wait_announced(srv.proc, srv.logs, "metrics", timeout=30)
    yield MetricsServer(srv, f"http://127.0.0.1:{port}/metrics", str(tiny_model))
    stop_server(srv)
    assert srv.proc.returncode == 0, srv.logs()[-4000:]


def test_one_endpoint_serves_tiller_and_vllm_metrics(metrics_server: MetricsServer) -> None:
    with Client(metrics_server.srv.target) as c:
        c.generate("The metrics of", max_tokens=4, temperature=0.0)
    with urllib.request.urlopen(metrics_server.url, timeout=10) as r:
        got = _parse(r.read().decode())

    assert "# TYPE tiller_requests_total counter" in got.text
    for family, kind in (
        ("tiller_requests", "counter"),
        ("tiller_generated_tokens", "counter"),
        ("tiller_generate_requests_by_steering", "counter"),
        ("tiller_log_written", "counter"),
        ("tiller_log_dropped", "counter"),
        ("tiller_request_duration_seconds", "histogram"),
        ("tiller_in_flight_requests", "gauge"),
        ("tiller_engine_queue_depth", "gauge"),
    ):
        assert got.types.get(family) == kind, (family, got.types.get(family))
    for name in VLLM_SERIES:
        assert name in got.types, f"{name} missing from /metrics"

    model = metrics_server.model_name
    tiller = [s for s in got.samples if s[0].startswith("tiller_")]
    # vLLM's model_name is on its per-engine series (not on e.g. vllm:lora_requests_info).
    vllm = [s for s in got.samples if s[0].startswith(VLLM_SERIES)]
    assert tiller and vllm
    for name, labels, _ in tiller + vllm:
        assert labels.get("model_name") == model, (name, labels)

    def value(name: str, **labels: str) -> float:
        return sum(v for n, lb, v in got.samples if n == name and labels.items() <= lb.items())

    # Both families counted the same generation: the served engine's stats, not a copy.
    assert value("tiller_requests_total", method="Generate", code="OK") == 1
    assert value("vllm:request_success_total") >= 1
    assert value("vllm:generation_tokens_total") >= 1


def test_exposition_includes_the_default_registry() -> None:
    """Without an engine: a series vLLM would put in the default registry is served beside
    Tiller's, and Tiller's counters carry the model name."""
    probe = Counter("vllm:tiller_test_probe", "probe", ["model_name"])
    try:
        probe.labels("m").inc()
        metrics = Metrics("m")
        metrics.observe("/tiller.v1.Tiller/Generate", "OK", 0.01)
        metrics.tokens.inc(3)
        metrics.steering.labels("none").inc()
        got = _parse(generate_latest(metrics.registry).decode())
    finally:
        REGISTRY.unregister(probe)
    assert ("vllm:tiller_test_probe_total", {"model_name": "m"}, 1.0) in got.samples
    assert (
        "tiller_requests_total",
        {"model_name": "m", "method": "Generate", "code": "OK"},
        1.0,
    ) in got.samples
    assert ("tiller_generated_tokens_total", {"model_name": "m"}, 3.0) in got.samples
    assert got.types["tiller_generate_requests_by_steering"] == "counter"
