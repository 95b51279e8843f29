"""The soak's verdict (``benchmark/soak_report.py``): outcome tallies, the memory trend, and what fails it."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmark'))
from soak_report import (EXAMPLES_KEPT, EXPECTED_4XX, LOST, OK, OUTCOMES, SERVER_ERROR, Tally,  # noqa: E402
                         human_summary, rss_summary, verdict)


def test_the_tally_counts_by_kind_and_keeps_a_few_failures(rng):
    tally, expected = Tally(), {}
    for _ in range(200):
        kind, outcome = str(rng.choice(['chat', 'cancel', 'bad_request'])), str(rng.choice(OUTCOMES))
        tally.record(kind, outcome, 'why')
        expected[outcome] = expected.get(outcome, 0) + 1
    assert tally.totals() == {o: expected.get(o, 0) for o in OUTCOMES}
    assert all(len(examples) <= EXAMPLES_KEPT for examples in tally.examples.values())
    assert set(tally.examples) <= {SERVER_ERROR, LOST, 'unexpected'}
    with pytest.raises(ValueError, match='outcome'):
        tally.record('chat', 'fine')


def test_the_memory_trend_is_the_second_halfs_slope(rng):
    """Start-up growth in the first half does not count; a steady leak in the second half does."""
    t = np.sort(rng.uniform(0, 1800, 120))
    rate = rng.uniform(0.5, 5.0)                           # MiB per minute
    mid = (t[0] + t[-1]) / 2
    rss = 2000 + np.where(t < mid, t * 0.5, mid * 0.5 + (t - mid) / 60 * rate)
    summary = rss_summary(list(zip(t.tolist(), rss.tolist())))
    assert summary['second_half_mib_per_min'] == pytest.approx(rate, abs=1e-3)
    assert summary['growth_mib'] == pytest.approx(rss[-1] - rss[0], abs=0.1)
    assert summary['peak_mib'] == pytest.approx(rss.max(), abs=0.1) and summary['samples'] == 120
    assert rss_summary([]) is None


def test_the_verdict_fails_on_leaks_lost_requests_and_server_errors():
    clean = {o: 0 for o in OUTCOMES} | {OK: 50, EXPECTED_4XX: 9}
    assert verdict(clean, kv_leaked=0) == []
    assert verdict(clean, kv_leaked=3) == ['3 KV blocks leaked']
    assert verdict(clean, kv_leaked=None) == ['the KV block gauges could not be read when idle']
    assert verdict(clean | {LOST: 2, SERVER_ERROR: 1}, kv_leaked=0) == ['server error: 1 requests', 'lost: 2 requests']


def test_the_summary_shows_every_kind_and_the_verdict():
    tally = Tally()
    tally.record('chat', OK)
    tally.record('bad_request', EXPECTED_4XX)
    tally.record('cancel', LOST, 'ReadTimeout')
    report = {'minutes': 1, 'url': 'http://127.0.0.1:1', 'requests': {k: dict(c) for k, c in tally.counts.items()},
              'totals': tally.totals(), 'examples': dict(tally.examples), 'rss': None,
              'engine_counts': {'prefix_hit_blocks': 4, 'mixed_steps': 2},
              'kv_blocks': {'start_used': 0, 'end_used': 0, 'leaked': 0, 'total': 128},
              'failures': verdict(tally.totals(), 0)}
    text = human_summary(report)
    assert all(kind in text for kind in ('chat', 'bad_request', 'cancel'))
    assert 'engine, over the traffic: prefix hit blocks 4, mixed steps 2' in text
    assert 'lost: cancel: ReadTimeout' in text and text.endswith('FAILED: lost: 1 requests')
