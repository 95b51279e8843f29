"""Prometheus figures for ``/metrics``: HTTP requests, tokens, generations in flight, the engine's
load, and the latencies of generations.

The engine's own figures (running, waiting, KV blocks) are read from ``engine.stats()`` at scrape
time, so they are never stale; each server has its own registry, so several can share a process.

The latency histograms and the KV cache gauge carry LMDeploy's names and buckets (vLLM's names,
``lmdeploy:`` for ``vllm:``), measured per generation as the server sees it (``RequestTimer``):
time to first token, time per output token (each increment's wait over its tokens), and
end-to-end latency, from the generation's submission to its last increment. The queue time (from
a request's arrival at the backend to its first scheduling) is the backend's own figure, taken at
each scrape (``take_queue_times``).
"""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

PREFIX = 'lmdeploy_jax'
LMDEPLOY = 'lmdeploy:'
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0)
KNOWN_ROUTES = ('/v1/chat/completions', '/v1/completions', '/v1/models', '/generate', '/v1/encode',
                '/health', '/metrics')


class _EngineCollector:
    """Every integer of ``engine.stats()`` as a gauge, plus the KV blocks in use and, where the
    engine has a paged KV cache, ``lmdeploy:gpu_cache_usage_perc``: the fraction of its blocks in
    use (1 is all)."""

    def __init__(self, backend):
        self.backend = backend

    def collect(self):
        stats = {k: v for k, v in self.backend.stats().items() if isinstance(v, (int, float))}
        if 'kv_blocks_total' in stats and 'kv_blocks_free' in stats:
            stats['kv_blocks_used'] = stats['kv_blocks_total'] - stats['kv_blocks_free']
            usage = GaugeMetricFamily(f'{LMDEPLOY}gpu_cache_usage_perc',
                                      'KV-cache usage: the fraction of its blocks in use; 1 means 100 percent')
            usage.add_metric([], stats['kv_blocks_used'] / max(stats['kv_blocks_total'], 1))
            yield usage
        for key, value in sorted(stats.items()):
            gauge = GaugeMetricFamily(f'{PREFIX}_engine_{key}', f"the engine's {key.replace('_', ' ')}")
            gauge.add_metric([], value)
            yield gauge


class Metrics:
    def __init__(self, backend):
        self.backend = backend
        self.registry = CollectorRegistry()
        self.http_requests = Counter(f'{PREFIX}_http_requests', 'HTTP requests answered, by route and status',
                                     ['route', 'status'], registry=self.registry)
        self.prompt_tokens = Counter(f'{PREFIX}_prompt_tokens', 'prompt tokens of generations',
                                     registry=self.registry)
        self.generation_tokens = Counter(f'{PREFIX}_generation_tokens', 'tokens generated',
                                         registry=self.registry)
        self.generations = Counter(f'{PREFIX}_generations', 'generations run (n per request)',
                                   registry=self.registry)
        self.running = Gauge(f'{PREFIX}_generations_running', 'generations in flight, as the server sees them',
                             registry=self.registry)
        self.time_to_first_token = Histogram(f'{LMDEPLOY}time_to_first_token_seconds',
                                             'Histogram of time to first token in seconds.', buckets=TTFT_BUCKETS,
                                             registry=self.registry)
        self.time_per_output_token = Histogram(f'{LMDEPLOY}time_per_output_token_seconds',
                                               'Histogram of time per output token in seconds.',
                                               buckets=TPOT_BUCKETS, registry=self.registry)
        self.e2e_request_latency = Histogram(f'{LMDEPLOY}e2e_request_latency_seconds',
                                             'Histogram of e2e request latency in seconds.',
                                             buckets=REQUEST_BUCKETS, registry=self.registry)
        self.request_queue_time = Histogram(f'{LMDEPLOY}request_queue_time_seconds',
                                            'Histogram of time spent in WAITING phase for request.',
                                            buckets=REQUEST_BUCKETS, registry=self.registry)
        self.registry.register(_EngineCollector(backend))

    def timer(self) -> 'RequestTimer':
        """A clock for one generation, started now (at its submission)."""
        return RequestTimer(self)

    def render(self) -> bytes:
        for seconds in self.backend.take_queue_times():
            self.request_queue_time.observe(seconds)
        return generate_latest(self.registry)

    def middleware(self, app):
        """ASGI middleware counting every HTTP answer by route (unknown paths together) and status."""
        async def counted(scope, receive, send):
            if scope['type'] != 'http':
                return await app(scope, receive, send)
            route = scope['path'] if scope['path'] in KNOWN_ROUTES else 'other'

            async def send_counting(message):
                if message['type'] == 'http.response.start':
                    self.http_requests.labels(route, str(message['status'])).inc()
                await send(message)
            await app(scope, receive, send_counting)
        return counted


class RequestTimer:
    """One generation's latencies, observed into ``Metrics``' histograms as its increments come."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self.start = self.last = time.perf_counter()
        self.tokens = 0

    def output(self, new_tokens: int, finished: bool) -> None:
        """An increment of ``new_tokens`` tokens arrived now; ``finished``: it is the last."""
        now = time.perf_counter()
        if new_tokens:
            if self.tokens == 0:
                self.metrics.time_to_first_token.observe(now - self.start)
            else:
                self.metrics.time_per_output_token.observe((now - self.last) / new_tokens)
            self.tokens += new_tokens
            self.last = now
        if finished:
            self.metrics.e2e_request_latency.observe(now - self.start)
