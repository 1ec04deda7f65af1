"""Prometheus metrics: what the RPC edge observes, plus live state read at scrape time.

Counters and histograms are fed by ``edge.Edge`` (one call per RPC, one per streamed chunk);
gauges (queue depths, adapter versions, annotator backlog, learner iterations) are read from
the service, the adapter table and the generation log only when Prometheus scrapes, so they
cost nothing on the request path. Metrics live in their own registry (not the process-global
one), served over HTTP by ``serve_http``. Thread-safety: observation methods are called on the
event loop; the collector runs on the HTTP thread and only reads.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
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


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "tiller_requests", "RPCs by method and final status code", ["method", "code"],
            registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "tiller_request_duration_seconds", "RPC duration (unary: to the response; stream: "
            "to the last chunk)", ["method"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.first_chunk = Histogram(
            "tiller_stream_first_chunk_seconds", "GenerateStream: RPC start to the first chunk "
            "with tokens", buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.tokens = Counter(
            "tiller_generated_tokens", "Completion tokens sent (rate() = tokens/s)", registry=r
        )
        self.steering = Counter(
            "tiller_generate_requests_by_steering",
            "Accepted generate RPCs by steering: none, feedback, mix, attributes",
            ["kind"],
            registry=r,
        )

    def observe(self, method: str, code: str, seconds: float) -> None:
        name = method.rsplit("/", 1)[-1]
        self.requests.labels(name, code).inc()
        self.latency.labels(name).observe(seconds)

    def bind(
        self,
        status: Callable[[], _StatusLike],
        active_versions: Callable[[], list[tuple[str, int]]],
        log_db: Path | None,
    ) -> None:
        """Register the scrape-time collector over live server state."""
        self.registry.register(_LiveState(status, active_versions, log_db))


class _LiveState(Collector):
    def __init__(
        self,
        status: Callable[[], _StatusLike],
        active_versions: Callable[[], list[tuple[str, int]]],
        log_db: Path | None,
    ) -> None:
        self._status = status
        self._active = active_versions
        self._db = log_db

    def collect(self) -> Iterator[Metric]:
        s = self._status()
        for name, doc, value in (
            ("tiller_in_flight_requests", "Generate RPCs being served", s.in_flight),
            ("tiller_engine_queue_depth", "Requests the engine holds (running + waiting)",
             s.engine_unfinished),
            ("tiller_log_queue_depth", "Generation-log writes waiting for the writer",
             s.log_queue_depth),
            ("tiller_log_written", "Generation-log writes committed (counter)", s.log_written),
            ("tiller_log_dropped", "Generation-log writes lost: queue full, disk full, locked "
             "(counter)", s.log_lost),
        ):  # fmt: skip
            yield GaugeMetricFamily(name, doc, value=value)
        versions = GaugeMetricFamily(
            "tiller_adapter_active_version", "Active version per adapter", labels=["adapter"]
        )
        for adapter, version in self._active():
            versions.add_metric([adapter], version)
        yield versions
        if self._db is not None:
            yield from self._from_log(self._db)

    def _from_log(self, db: Path) -> Iterator[Metric]:
        backlog = GaugeMetricFamily(
            "tiller_annotator_backlog",
            "Logged generations an annotator provider has not reached yet",
            labels=["provider"],
        )
        iterations = GaugeMetricFamily(
            "tiller_learner_iterations",
            "Learner iterations recorded, by adapter and outcome",
            labels=["adapter", "status"],
        )
        try:
            # Read-only, short: the writer (WAL) is never blocked by this reader.
            conn = logstore.open_readonly(db, timeout_s=0.5)
            try:
                for provider, behind in logstore.annotator_backlogs(conn).items():
                    backlog.add_metric([provider], behind)
                for (adapter, status), n in logstore.iteration_counts(conn).items():
                    iterations.add_metric([adapter, status], n)
            finally:
                conn.close()
        except sqlite3.Error as e:
            log.warning("metrics: generation log %s unreadable: %s", db, e)
        yield backlog
        yield iterations


def serve_http(metrics: Metrics, host: str, port: int) -> int:
    """Serve ``/metrics`` on a daemon thread; returns the bound port (``port=0``: any free)."""
    server, _thread = start_http_server(port, addr=host, registry=metrics.registry)
    return int(server.server_address[1])
