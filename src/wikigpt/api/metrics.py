"""Prometheus metrics and the access log (one line per request, never prompt text)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .engine_client import CompletionStream, EngineClient

log = logging.getLogger("wikigpt.api")


class Metrics:
    """Metrics in a registry of their own (one per app, so tests can run several)."""

    def __init__(self, client: EngineClient) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("wikigpt_http_requests", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("wikigpt_http_request_duration_seconds", "Time to the last byte", ["route"],
                                 buckets=(.01, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120), registry=r)
        self.ttft = Histogram("wikigpt_time_to_first_token_seconds", "Time from request to first text",
                              buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10), registry=r)
        self.generated = Counter("wikigpt_generated_tokens", "Tokens generated", registry=r)
        self.prompt = Counter("wikigpt_prompt_tokens", "Prompt tokens processed", registry=r)
        self.prompt_cached = Counter("wikigpt_prompt_tokens_cached",
                                     "Prompt tokens whose keys and values the prefix cache held", registry=r)
        self.prompt_computed = Counter("wikigpt_prompt_tokens_computed",
                                       "Prompt tokens computed (not found in the prefix cache)", registry=r)
        self.step_batch = Histogram("wikigpt_batch_size", "Sequences per decoding step",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        Gauge("wikigpt_queue_depth", "Requests waiting for a batch slot",
              registry=r).set_function(lambda: client.stats()["queue_depth"])
        Gauge("wikigpt_running_sequences", "Sequences in the decoding batch (upstream: in flight)",
              registry=r).set_function(lambda: client.stats()["running"])
        if "upstream" in client.info():  # the upstream client reports each forwarded completion
            self.upstream = Histogram(
                "wikigpt_upstream_request_duration_seconds",
                "Forwarded completions: time from sending to the upstream's last byte, by outcome",
                ["outcome"], buckets=(.01, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120), registry=r)
        client.observe(self)

    def on_step(self, rows: int, prefill_tokens: int, seconds: float) -> None:
        self.step_batch.observe(rows)

    def on_upstream(self, seconds: float, outcome: str) -> None:
        self.upstream.labels(outcome).observe(seconds)

    def finished(self, streams: Sequence[CompletionStream], started: float) -> None:
        firsts = [s.first_token_at for s in streams if s.first_token_at is not None]
        if firsts:
            self.ttft.observe(min(firsts) - started)
        self.generated.inc(sum(s.completion_tokens for s in streams))
        prompt, cached = sum(s.prompt_tokens for s in streams), sum(s.cached_tokens for s in streams)
        self.prompt.inc(prompt)
        self.prompt_cached.inc(cached)
        self.prompt_computed.inc(prompt - cached)


class AccessLog:
    """ASGI middleware: one log line and the request metrics per HTTP request."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            seconds = time.perf_counter() - started
            self.metrics.requests.labels(route, scope["method"], str(status[0])).inc()
            self.metrics.latency.labels(route).observe(seconds)
            client = scope.get("client") or ("-", 0)
            log.info("%s %s %s %d %.3fs", client[0], scope["method"], scope["path"], status[0], seconds)
