"""The soak's bookkeeping and verdict: outcomes by request kind, KV blocks, server memory over time.

Kept apart from the traffic (``soak.py``) so the judgement can be tested without a server.
"""
from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np

OK = 'ok'                       # answered as asked (2xx, well formed, streams ended normally)
EXPECTED_4XX = 'expected_4xx'   # a bad request refused with an OpenAI-shaped 4xx
DISCONNECTED = 'disconnected'   # the client hung up mid-stream on purpose
SERVER_ERROR = 'server_error'   # a 5xx, an error inside a stream, or a stream cut short by the server
UNEXPECTED = 'unexpected'       # a good request refused, a bad one accepted, a malformed or wrong answer
LOST = 'lost'                   # sent, but neither answered nor refused (transport error, timeout)
OUTCOMES = (OK, EXPECTED_4XX, DISCONNECTED, SERVER_ERROR, UNEXPECTED, LOST)
FAILING = (SERVER_ERROR, UNEXPECTED, LOST)
EXAMPLES_KEPT = 5


class Tally:
    """Outcomes counted by request kind, with the first few details of each failing outcome."""

    def __init__(self):
        self.counts: dict[str, Counter] = defaultdict(Counter)
        self.examples: dict[str, list[str]] = defaultdict(list)

    def record(self, kind: str, outcome: str, detail: str = '') -> None:
        if outcome not in OUTCOMES:
            raise ValueError(f'outcome must be one of {OUTCOMES}, got {outcome!r}')
        self.counts[kind][outcome] += 1
        if outcome in FAILING and len(self.examples[outcome]) < EXAMPLES_KEPT:
            self.examples[outcome].append(f'{kind}: {detail}')

    def totals(self) -> dict[str, int]:
        total = Counter()
        for counts in self.counts.values():
            total.update(counts)
        return {outcome: total[outcome] for outcome in OUTCOMES}


def rss_summary(samples: list[tuple[float, float]]) -> dict | None:
    """Server memory from (seconds since start, RSS in MiB) samples: first, last, peak, growth, and
    the growth rate over the second half (MiB per minute, a least-squares slope), which is what
    tells a leak from start-up allocation. None without samples."""
    if not samples:
        return None
    t, rss = np.array(samples, dtype=float).T
    half = t >= t[0] + (t[-1] - t[0]) / 2
    slope = float(np.polyfit(t[half], rss[half], 1)[0] * 60) if half.sum() >= 2 and np.ptp(t[half]) > 0 else 0.0
    return {'samples': len(samples), 'start_mib': round(float(rss[0]), 1), 'end_mib': round(float(rss[-1]), 1),
            'peak_mib': round(float(rss.max()), 1), 'growth_mib': round(float(rss[-1] - rss[0]), 1),
            'second_half_mib_per_min': round(slope, 3)}


def verdict(totals: dict[str, int], kv_leaked: int | None) -> list[str]:
    """Why the soak failed (empty: it passed): leaked KV blocks, lost requests, server errors, unexpected answers."""
    reasons = []
    if kv_leaked is None:
        reasons.append('the KV block gauges could not be read when idle')
    elif kv_leaked != 0:
        reasons.append(f'{kv_leaked} KV blocks leaked')
    for outcome in FAILING:
        if totals.get(outcome):
            reasons.append(f'{outcome.replace("_", " ")}: {totals[outcome]} requests')
    return reasons


def human_summary(report: dict) -> str:
    """A few lines for a person: outcomes by kind, KV blocks, memory, the verdict."""
    lines = [f"soak of {report['minutes']} min against {report['url']}: {sum(report['totals'].values())} requests"]
    width = max(map(len, report['requests']), default=4)
    lines.append(f"{'kind':<{width}}  " + '  '.join(f'{o:>12}' for o in OUTCOMES))
    for kind, counts in sorted(report['requests'].items()):
        lines.append(f'{kind:<{width}}  ' + '  '.join(f'{counts.get(o, 0):>12}' for o in OUTCOMES))
    kv = report['kv_blocks']
    lines.append(f"KV blocks used when idle: {kv['start_used']} before, {kv['end_used']} after "
                 f"(leaked {kv['leaked']}, of {kv['total']})")
    counts = ', '.join(f"{k.replace('_', ' ')} {v}" for k, v in report['engine_counts'].items())
    lines.append(f"engine, over the traffic: {counts or 'no counters'}")
    rss = report['rss']
    lines.append('server RSS: not sampled (no --pid, server not started here)' if rss is None else
                 f"server RSS: {rss['start_mib']} -> {rss['end_mib']} MiB (peak {rss['peak_mib']}, "
                 f"{rss['second_half_mib_per_min']:+} MiB/min over the second half, {rss['samples']} samples)")
    for outcome, examples in report['examples'].items():
        lines += [f'  {outcome}: {e}' for e in examples]
    lines.append('PASSED' if not report['failures'] else 'FAILED: ' + '; '.join(report['failures']))
    return '\n'.join(lines)
