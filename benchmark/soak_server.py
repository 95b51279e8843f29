"""The server under soak: started on a free loopback port, its ``/metrics`` when idle, its memory."""
from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import sys
import tempfile
import time

import httpx

START_TIMEOUT_S = 600


def scrape(client: httpx.Client) -> dict[str, float]:
    text = client.get('/metrics').text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r'^(\w+(?:\{[^}]*\})?) (\S+)$', text, re.M)}


def wait_idle(client: httpx.Client, timeout_s: float = 180) -> dict[str, float] | None:
    """/metrics once nothing runs or waits (twice in a row), or None after ``timeout_s``."""
    deadline, calm = time.monotonic() + timeout_s, 0
    while time.monotonic() < deadline:
        m = scrape(client)
        busy = sum(m.get(f'lmdeploy_jax_engine_{k}', 0) for k in ('running', 'waiting'))
        busy += m.get('lmdeploy_jax_generations_running', 0)
        calm = calm + 1 if busy == 0 else 0
        if calm == 2:
            return m
        time.sleep(1)
    return None


ENGINE_COUNTERS = ('prefix_hit_blocks', 'calls', 'chained_calls', 'mixed_steps', 'preemptions')


def engine_counts(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, int]:
    """How much each of the engine's counters (``ENGINE_COUNTERS``, from ``/metrics``) grew from
    ``before`` to ``after``; a counter the server does not export is left out."""
    before, after = before or {}, after or {}
    names = {k: f'lmdeploy_jax_engine_{k}' for k in ENGINE_COUNTERS}
    return {k: int(after[name] - before.get(name, 0)) for k, name in names.items() if name in after}


def kv_used(m: dict[str, float] | None) -> int | None:
    if m is None or 'lmdeploy_jax_engine_kv_blocks_total' not in m:
        return None
    return int(m['lmdeploy_jax_engine_kv_blocks_total'] - m['lmdeploy_jax_engine_kv_blocks_free'])


def rss_mib(pid: int) -> float | None:
    with contextlib.suppress(OSError):
        with open(f'/proc/{pid}/status') as f:
            for line in f:
                if line.startswith('VmRSS:'):
                    return int(line.split()[1]) / 1024
    return None


@contextlib.contextmanager
def started_server(args):
    """``lmdeploy_jax serve api_server`` on a free loopback port; yields (url, pid) once /health answers."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    log = tempfile.NamedTemporaryFile('w+b', prefix='soak_server_', suffix='.log', delete=False)
    command = [sys.executable, '-m', 'lmdeploy_jax.cli.main', 'serve', 'api_server',
               *([args.model] if args.model else []),
               '--server-name', '127.0.0.1', '--server-port', str(port), '--enable-prefix-caching', *args.server_args]
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f'http://127.0.0.1:{port}'
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                sys.exit(f'the server did not start ({log.name}):\n{log.read().decode()[-3000:]}')
            time.sleep(1)
        print(f'server pid {proc.pid} on {url}, log {log.name}', flush=True)
        yield url, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            print('the server did not stop within 60 s of SIGTERM; killed', flush=True)
            proc.kill()


def _healthy(url: str) -> bool:
    with contextlib.suppress(httpx.TransportError):
        return httpx.get(f'{url}/health', timeout=2).status_code == 200
    return False
