"""Prometheus metrics of one server: requests, tokens, queue depth, time to first token, speed,
and the shields' checks and flags."""

from __future__ import annotations

import threading
import time

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE  # noqa: F401 (re-exported)
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """All counters live in a registry of their own, so several apps can share a process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("llamaherd_requests", "HTTP API requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("llamaherd_prompt_tokens", "Prompt tokens processed",
                                     registry=r)
        self.prompt_tokens_cached = Counter(
            "llamaherd_prompt_tokens_cached",
            "Prompt tokens whose keys and values were reused from the cache (not prefilled)",
            registry=r)
        self.generation_tokens = Counter("llamaherd_generation_tokens", "Tokens generated",
                                         registry=r)
        self.queue_depth = Gauge("llamaherd_queue_depth", "Requests waiting for a cache row",
                                 registry=r)
        self.running = Gauge("llamaherd_running_sequences", "Sequences in the running batch",
                             registry=r)
        self.ttft = Histogram("llamaherd_time_to_first_token_seconds",
                              "From arrival to the first generated token", registry=r,
                              buckets=_LATENCY_BUCKETS)
        self.request_tps = Histogram("llamaherd_request_tokens_per_second",
                                     "Output tokens per second of each finished request",
                                     registry=r, buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500))
        self.throughput = Gauge("llamaherd_generation_tokens_per_second",
                                "Aggregate output tokens per second over the last few seconds",
                                registry=r)
        # stage: input, output (a chat or text completion), moderation, run_shield (the APIs)
        self.shield_checks = Counter("llamaherd_shield_checks",
                                     "Texts or conversations judged by a shield, by stage",
                                     ["shield", "stage"], registry=r)
        # category: a Llama Guard code (S1-S14, "unspecified" when the guard named none) or the
        # Prompt Guard label (injection, jailbreak)
        self.shield_flagged = Counter("llamaherd_shield_flagged",
                                      "Checks a shield flagged, by stage and category",
                                      ["shield", "stage", "category"], registry=r)
        self._window: list[tuple[float, int]] = []
        self._lock = threading.Lock()

    def report(self, running: int, waiting: int, tokens: int, cached: int = 0) -> None:
        """The scheduler's report after a step or a change of its queue: `tokens` generated and
        `cached` prompt tokens reused since the last report."""
        now = time.perf_counter()
        self.running.set(running)
        self.queue_depth.set(waiting)
        self.generation_tokens.inc(tokens)
        self.prompt_tokens_cached.inc(cached)
        with self._lock:
            self._window.append((now, tokens))
            while self._window and self._window[0][0] < now - 5.0:
                self._window.pop(0)
            span = now - self._window[0][0] if len(self._window) > 1 else 0.0
            total = sum(n for _, n in self._window[1:])
        self.throughput.set(total / span if span > 0 else 0.0)

    def finished(self, submitted: float, first_token: float | None, output_tokens: int) -> None:
        """Record one finished request's latency and speed."""
        if first_token is None:
            return
        self.ttft.observe(first_token - submitted)
        elapsed = time.perf_counter() - first_token
        if output_tokens > 1 and elapsed > 0:
            self.request_tps.observe((output_tokens - 1) / elapsed)

    def render(self) -> bytes:
        return generate_latest(self.registry)
