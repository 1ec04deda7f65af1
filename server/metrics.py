"""Prometheus metrics: what the RPC edge observes, live state read at scrape time, and vLLM's.

Counters and histograms are fed by ``edge.Edge`` (one call per RPC, one per streamed chunk);
live values (queue depths, adapter versions, log writes, annotator backlog, learner iterations)
are read from the service, the adapter table and the generation log only when Prometheus
scrapes, so they cost nothing on the request path; totals that only grow are counters. Every
``tiller_*`` series carries ``model_name`` (the served model name, the label vLLM uses).

Tiller's metrics live in their own registry; ``serve_http`` serves them together with the
process's default registry, where vLLM's stat logger registers its ``vllm:*`` metrics (KV-cache
use, queue, TTFT, ITL) in the process that runs ``AsyncLLM`` whether or not the engine core runs
in a subprocess; with ``PROMETHEUS_MULTIPROC_DIR`` set, vLLM's multiprocess files instead, as
``vllm serve`` does. Thread-safety: observation methods are called on the event loop; the
collectors run on the HTTP thread and only read.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from .formats import logstore

log = logging.getLogger("tiller.metrics")
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class _StatusLike(Protocol):
    @property
    def in_flight(self) -> int: ...
    @property
    def engine_unfinished(self) -> int: ...
    @property
    def log_queue_depth(self) -> int: ...
    @property
    def log_written(self) -> int: ...
    @property
    def log_lost(self) -> int: ...


def steering_kind(request: Any) -> str:
    """How a GenerateRequest is steered: ``mix``, ``attributes``, ``feedback`` or ``none``."""
    if len(getattr(request, "feedback_mix", ())):
        return "mix"
    if len(getattr(request, "attributes", ())):
        return "attributes"
    return "feedback" if getattr(request, "feedback", "") else "none"


def completion_tokens(message: Any) -> int:
    """Tokens carried by a GenerateResponse (its usage) or a GenerateChunk (its token ids)."""
    ids = getattr(message, "token_ids", None)
    if ids is not None:
        return len(ids)
    usage = getattr(message, "usage", None)
    return int(getattr(usage, "completion_tokens", 0))


class _WithModel:
    """A labelled metric whose first label, ``model_name``, is filled in: ``labels(*rest)``."""

    def __init__(self, metric: Counter | Histogram, model_name: str) -> None:
        self._metric = metric
        self._model = model_name

    def labels(self, *values: str) -> Any:
        return self._metric.labels(self._model, *values)


class Metrics:
    """Tiller's metrics for one served model; ``model_name`` labels every series."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        r, m = self.registry, "model_name"
        self._requests = Counter(
            "tiller_requests", "RPCs by method and final status code", [m, "method", "code"],
            registry=r,
        )  # fmt: skip
        self._latency = Histogram(
            "tiller_request_duration_seconds", "RPC duration (unary: to the response; stream: "
            "to the last chunk)", [m, "method"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.first_chunk = Histogram(
            "tiller_stream_first_chunk_seconds", "GenerateStream: RPC start to the first chunk "
            "with tokens", [m], buckets=_LATENCY_BUCKETS, registry=r,
        ).labels(model_name)  # fmt: skip
        self.tokens = Counter(
            "tiller_generated_tokens", "Completion tokens sent (rate() = tokens/s)", [m],
            registry=r,
        ).labels(model_name)  # fmt: skip
        self.steering = _WithModel(
            Counter(
                "tiller_generate_requests_by_steering",
                "Accepted generate RPCs by steering: none, feedback, mix, attributes",
                [m, "kind"],
                registry=r,
            ),
            model_name,
        )
        r.register(_VllmMetrics())

    def observe(self, method: str, code: str, seconds: float) -> None:
        name = method.rsplit("/", 1)[-1]
        self._requests.labels(self.model_name, name, code).inc()
        self._latency.labels(self.model_name, name).observe(seconds)

    def bind(
        self,
        status: Callable[[], _StatusLike],
        active_versions: Callable[[], list[tuple[str, int]]],
        log_db: Path | None,
    ) -> None:
        """Register the scrape-time collector over live server state."""
        self.registry.register(_LiveState(status, active_versions, log_db, self.model_name))


class _VllmMetrics(Collector):
    """vLLM's ``vllm:*`` metrics (and the process collectors beside them), as ``vllm serve``
    finds them: its multiprocess files when ``PROMETHEUS_MULTIPROC_DIR`` is set, else the
    default registry."""

    def __init__(self) -> None:
        path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        self._source: Collector | CollectorRegistry = (
            MultiProcessCollector(None, path) if path else REGISTRY
        )

    def describe(self) -> list[Metric]:
        return []  # names unknown until vLLM registers them; none is a tiller_* name

    def collect(self) -> Iterator[Metric]:
        return iter(self._source.collect())


class _LiveState(Collector):
    def __init__(
        self,
        status: Callable[[], _StatusLike],
        active_versions: Callable[[], list[tuple[str, int]]],
        log_db: Path | None,
        model_name: str,
    ) -> None:
        self._status = status
        self._active = active_versions
        self._db = log_db
        self._model = model_name

    def collect(self) -> Iterator[Metric]:
        s, m = self._status(), [self._model]
        for name, doc, value in (
            ("tiller_in_flight_requests", "Generate RPCs being served", s.in_flight),
            ("tiller_engine_queue_depth", "Requests the engine holds (running + waiting)",
             s.engine_unfinished),
            ("tiller_log_queue_depth", "Generation-log writes waiting for the writer",
             s.log_queue_depth),
        ):  # fmt: skip
            gauge = GaugeMetricFamily(name, doc, labels=["model_name"])
            gauge.add_metric(m, value)
            yield gauge
        for name, doc, value in (
            ("tiller_log_written", "Generation-log writes committed", s.log_written),
            ("tiller_log_dropped", "Generation-log writes lost: queue full, disk full, locked",
             s.log_lost),
        ):  # fmt: skip
            counter = CounterMetricFamily(name, doc, labels=["model_name"])
            counter.add_metric(m, value)
            yield counter
        versions = GaugeMetricFamily(
            "tiller_adapter_active_version",
            "Active version per adapter",
            labels=["model_name", "adapter"],
        )
        for adapter, version in self._active():
            versions.add_metric([*m, adapter], version)
        yield versions
        if self._db is not None:
            yield from self._from_log(self._db)

    def _from_log(self, db: Path) -> Iterator[Metric]:
        backlog = GaugeMetricFamily(
            "tiller_annotator_backlog",
            "Logged generations an annotator provider has not reached yet",
            labels=["model_name", "provider"],
        )
        iterations = CounterMetricFamily(
            "tiller_learner_iterations",
            "Learner iterations recorded, by adapter and outcome",
            labels=["model_name", "adapter", "status"],
        )
        try:
            # Read-only, short: the writer (WAL) is never blocked by this reader.
            conn = logstore.open_readonly(db, timeout_s=0.5)
            try:
                for provider, behind in logstore.annotator_backlogs(conn).items():
                    backlog.add_metric([self._model, provider], behind)
                for (adapter, status), n in logstore.iteration_counts(conn).items():
                    iterations.add_metric([self._model, adapter, status], n)
            finally:
                conn.close()
        except sqlite3.Error as e:
            log.warning("metrics: generation log %s unreadable: %s", db, e)
        yield backlog
        yield iterations


def serve_http(metrics: Metrics, host: str, port: int) -> int:
    """Serve ``/metrics`` (Tiller's and vLLM's) on a daemon thread; returns the bound port
    (``port=0``: any free)."""
    server, _thread = start_http_server(port, addr=host, registry=metrics.registry)
    return int(server.server_address[1])
