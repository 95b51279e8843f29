"""Prometheus figures for ``/metrics``: HTTP requests, tokens, generations in flight, and the engine's load.

The engine's own figures (running, waiting, KV blocks) are read from ``engine.stats()`` at scrape
time, so they are never stale; each server has its own registry, so several can share a process.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import GaugeMetricFamily

PREFIX = 'lmdeploy_jax'
KNOWN_ROUTES = ('/v1/chat/completions', '/v1/completions', '/v1/models', '/generate', '/v1/encode',
                '/health', '/metrics')


class _EngineCollector:
    """Every integer of ``engine.stats()`` as a gauge, plus the KV blocks in use."""

    def __init__(self, backend):
        self.backend = backend

    def collect(self):
        stats = {k: v for k, v in self.backend.stats().items() if isinstance(v, (int, float))}
        if 'kv_blocks_total' in stats and 'kv_blocks_free' in stats:
            stats['kv_blocks_used'] = stats['kv_blocks_total'] - stats['kv_blocks_free']
        for key, value in sorted(stats.items()):
            gauge = GaugeMetricFamily(f'{PREFIX}_engine_{key}', f"the engine's {key.replace('_', ' ')}")
            gauge.add_metric([], value)
            yield gauge


class Metrics:
    def __init__(self, backend):
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
        self.registry.register(_EngineCollector(backend))

    def render(self) -> bytes:
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
