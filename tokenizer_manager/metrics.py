"""Prometheus metrics of the front: token counters and latency histograms per request, and
scheduler gauges read from its internal state at scrape time."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from srt.runtime.messages import InternalState

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
_TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1, 2.5, 5)


class Metrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"srt:{name}", doc, labels, registry=self.registry).labels(model_name)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"srt:{name}", doc, labels, registry=self.registry).labels(model_name)

        def histogram(name: str, doc: str, buckets: tuple) -> Histogram:
            return Histogram(f"srt:{name}", doc, labels, buckets=buckets, registry=self.registry).labels(model_name)

        self.requests = counter("num_requests", "Finished requests")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished requests")
        self.generation_tokens = counter("generation_tokens", "Generated tokens")
        self.cached_tokens = counter("cached_tokens", "Prompt tokens served from the prefix cache")
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token", _LATENCY_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between output tokens", _TOKEN_LATENCY_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Request latency, arrival to finish", _LATENCY_BUCKETS)
        self.running = gauge("num_running_reqs", "Requests being prefilled or decoded")
        self.waiting = gauge("num_queue_reqs", "Requests waiting to be scheduled")
        self.token_usage = gauge("token_usage", "Fraction of KV slots in use (cache excluded)")
        self.cache_hit_rate = gauge("cache_hit_rate", "Fraction of prompt tokens served from the prefix cache")

    def observe_tokens(self, new_tokens: int, since_last_s: float, first: bool) -> None:
        if first:
            self.ttft.observe(since_last_s)
        elif new_tokens:
            for _ in range(new_tokens):
                self.itl.observe(since_last_s / new_tokens)
        self.count_tokens(new_tokens)

    def count_tokens(self, new_tokens: int) -> None:
        self.generation_tokens.inc(new_tokens)

    def observe_finished(self, prompt_tokens: int, cached_tokens: int, e2e_s: float) -> None:
        self.requests.inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.cached_tokens.inc(cached_tokens)
        self.e2e.observe(e2e_s)

    def render(self, state: InternalState) -> bytes:
        self.running.set(state.running_requests)
        self.waiting.set(state.waiting_requests)
        in_use = state.total_kv_slots - state.free_kv_slots - state.evictable_tokens
        self.token_usage.set(in_use / state.total_kv_slots if state.total_kv_slots else 0.0)  # an encoder has no KV cache
        self.cache_hit_rate.set(state.cache_hit_rate)
        return generate_latest(self.registry)
