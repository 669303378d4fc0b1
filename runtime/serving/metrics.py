"""Prometheus metrics of one server: request latencies observed as tokens reach the HTTP
layer, and the engine's own gauges and adapter cache counters read at scrape time."""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from peft_export.runtime.serving.engine import Engine

PREFIX = "peft_export"
TOKEN_RATE_WINDOW_S = 10.0
"""tokens/s is the count of tokens generated over this many seconds, divided by it."""
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServerMetrics:
    def __init__(self, engine: Engine) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            f"{PREFIX}_requests",
            "Requests by endpoint and outcome (ok, client_error, rejected, error, cancelled).",
            ["endpoint", "outcome"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            f"{PREFIX}_prompt_tokens", "Prompt tokens of accepted requests.", registry=self.registry
        )
        self.generated_tokens = Counter(
            f"{PREFIX}_generated_tokens", "Tokens generated.", registry=self.registry
        )
        self.ttft = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "Request arrival to its first token.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.inter_token = Histogram(
            f"{PREFIX}_inter_token_seconds",
            "Time between consecutive tokens of one request.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.e2e = Histogram(
            f"{PREFIX}_request_seconds",
            "Request arrival to its last token.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._recent: collections.deque[float] = collections.deque()
        self._lock = threading.Lock()
        self.registry.register(_EngineCollector(engine, self))

    def token(self, now: float) -> None:
        self.generated_tokens.inc()
        with self._lock:
            self._recent.append(now)

    def tokens_per_second(self) -> float:
        cutoff = time.monotonic() - TOKEN_RATE_WINDOW_S
        with self._lock:
            while self._recent and self._recent[0] < cutoff:
                self._recent.popleft()
            return len(self._recent) / TOKEN_RATE_WINDOW_S

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector(Collector):
    """Gauges and adapter cache counters read from the engine when Prometheus scrapes."""

    def __init__(self, engine: Engine, metrics: ServerMetrics) -> None:
        self.engine = engine
        self.metrics = metrics

    def collect(self) -> Iterator:
        stats = self.engine.stats()
        yield GaugeMetricFamily(
            f"{PREFIX}_queue_depth", "Requests waiting for admission.", value=stats.queue_depth
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_running_rows", "Rows in the running batch.", value=stats.running_rows
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_tokens_per_second",
            f"Tokens generated over the last {TOKEN_RATE_WINDOW_S:g} s, per second.",
            value=self.metrics.tokens_per_second(),
        )
        for event in ("hits", "misses", "evictions"):
            family = CounterMetricFamily(
                f"{PREFIX}_adapter_cache_{event}",
                f"Adapter cache {event} per tier (host: host copies, slots: bank slots, "
                "prompt_host: prompt-side adapters).",
                labels=["tier"],
            )
            for tier, counts in sorted(stats.adapter_cache.items()):
                family.add_metric([tier], counts.get(event, 0))
            yield family
