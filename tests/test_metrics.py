"""``/metrics`` after real requests on a real server (the JAX engine, the default model): the
latency histograms (LMDeploy's names and buckets: first token, per output token, end to end,
queue) count every generation, their buckets are cumulative and sane, and the KV cache gauge
reads the engine's blocks in use."""
from __future__ import annotations

import math

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lmdeploy_jax.serve.openai.metrics import REQUEST_BUCKETS, TPOT_BUCKETS, TTFT_BUCKETS

from test_server import ENGINE_FLAGS, running_server

HISTOGRAMS = {'lmdeploy:time_to_first_token_seconds': TTFT_BUCKETS,
              'lmdeploy:time_per_output_token_seconds': TPOT_BUCKETS,
              'lmdeploy:e2e_request_latency_seconds': REQUEST_BUCKETS,
              'lmdeploy:request_queue_time_seconds': REQUEST_BUCKETS}
ASK = [{'role': 'user', 'content': 'Tell me about the sea.'}]


@pytest.fixture(scope='module')
def server():
    with running_server(*ENGINE_FLAGS) as base:
        client = openai.OpenAI(base_url=f'{base}/v1', api_key='unused', max_retries=0, timeout=300)
        yield base, client, client.models.list().data[0].id


def scrape(base: str) -> dict[str, dict]:
    """Each family's samples as {sample name + sorted labels: value}."""
    text = httpx.get(f'{base}/metrics').text
    return {family.name: {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}
            for family in text_string_to_metric_families(text)}


def histogram(metrics: dict, name: str) -> tuple[list[tuple[float, float]], float, float]:
    """(cumulative (upper bound, count) pairs in order, count, sum) of a histogram."""
    samples = metrics[name]
    buckets = sorted((float(dict(labels)['le']), v) for (sample, labels), v in samples.items()
                     if sample.endswith('_bucket'))
    return buckets, samples[(f'{name}_count', ())], samples[(f'{name}_sum', ())]


def test_latency_histograms_count_generations_with_sane_buckets(server):
    base, client, model = server
    before = scrape(base)
    whole = client.chat.completions.create(model=model, messages=ASK, max_tokens=6, temperature=0)
    chunks = [c for c in client.chat.completions.create(model=model, messages=ASK, max_tokens=6, temperature=0,
                                                        stream=True, stream_options={'include_usage': True})]
    text = client.completions.create(model=model, prompt='The sea is', max_tokens=4, temperature=0)
    after = scrape(base)
    tokens = [whole.usage.completion_tokens, chunks[-1].usage.completion_tokens, text.usage.completion_tokens]
    assert all(t > 1 for t in tokens)
    for name, bounds in HISTOGRAMS.items():
        buckets, count, total = histogram(after, name)
        old_buckets, old_count, old_total = histogram(before, name)
        assert [b for b, _ in buckets] == [*bounds, math.inf]
        counts = [c for _, c in buckets]
        assert counts == sorted(counts) and counts[-1] == count, (name, buckets)
        assert total > old_total
        if name == 'lmdeploy:time_per_output_token_seconds':
            # one per increment after a generation's first; the engine's steps may bring several tokens
            assert 1 <= count - old_count <= sum(tokens) - 3
        else:
            assert count - old_count == 3, name
    ttft = histogram(after, 'lmdeploy:time_to_first_token_seconds')[2] - histogram(
        before, 'lmdeploy:time_to_first_token_seconds')[2]
    e2e = histogram(after, 'lmdeploy:e2e_request_latency_seconds')[2] - histogram(
        before, 'lmdeploy:e2e_request_latency_seconds')[2]
    queued = histogram(after, 'lmdeploy:request_queue_time_seconds')[2] - histogram(
        before, 'lmdeploy:request_queue_time_seconds')[2]
    assert 0 < ttft < e2e and 0 < queued < ttft


def test_kv_cache_usage_is_the_fraction_of_blocks_in_use(server):
    base, client, model = server
    idle = scrape(base)
    assert idle['lmdeploy:gpu_cache_usage_perc'][('lmdeploy:gpu_cache_usage_perc', ())] == 0.0
    stream = client.completions.create(model=model, prompt='Once upon a time', max_tokens=200, temperature=0,
                                       stream=True, extra_body={'ignore_eos': True})
    next(iter(stream))
    busy = scrape(base)
    stream.close()
    used = busy['lmdeploy_jax_engine_kv_blocks_used'][('lmdeploy_jax_engine_kv_blocks_used', ())]
    total = busy['lmdeploy_jax_engine_kv_blocks_total'][('lmdeploy_jax_engine_kv_blocks_total', ())]
    usage = busy['lmdeploy:gpu_cache_usage_perc'][('lmdeploy:gpu_cache_usage_perc', ())]
    assert used >= 1 and usage == used / total and 0 < usage < 1


# ---- include_stop_str_in_output on the JAX engine, with this module's server ----------------------

FRANCE = [{'role': 'user', 'content': 'What is the capital of France?'}]


def _chat(client, model, stream=False, **fields):
    kwargs = dict(model=model, messages=FRANCE, max_tokens=12, temperature=0, extra_body=fields)
    if not stream:
        resp = client.chat.completions.create(**kwargs)
        return resp.choices[0].message.content, resp.choices[0].finish_reason, resp.usage.completion_tokens
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={'include_usage': True}))
    text = ''.join(c.choices[0].delta.content or '' for c in chunks if c.choices)
    return text, [c.choices[0].finish_reason for c in chunks if c.choices][-1], chunks[-1].usage.completion_tokens


def test_include_stop_str_in_output_keeps_the_stop_token(server):
    """The stop token the engine reports (the stop-word case is host-side: test_pipeline_api.py)."""
    _, client, model = server
    plain, reason, tokens = _chat(client, model)
    assert reason == 'stop' and 'Paris' in plain
    kept = (plain + '<|im_end|>', 'stop', tokens + 1)
    assert _chat(client, model, include_stop_str_in_output=True) == kept
    assert _chat(client, model, True, include_stop_str_in_output=True) == kept
