"""``--api-keys``: every route but /health wants ``Authorization: Bearer KEY``; a wrong or missing key is a 401."""
from __future__ import annotations

import httpx
import openai
import pytest

from test_server import running_server

KEYS = ('key-one', 'key-two')


@pytest.fixture(scope='module')
def base():
    # keys are the server's business, not the engine's: the reference backend starts in a third of the time
    with running_server('--api-keys', *KEYS, '--max-concurrent-requests', '4', backend='pytorch') as url:
        yield url


@pytest.mark.parametrize('key', [None, 'wrong-key'])
def test_a_missing_or_wrong_key_gets_401(base, key):
    headers = {} if key is None else {'Authorization': f'Bearer {key}'}
    for path in ('/v1/models', '/metrics'):
        r = httpx.get(f'{base}{path}', headers=headers)
        assert r.status_code == 401 and r.json()['error']['type'] == 'authentication_error'
    r = httpx.post(f'{base}/v1/completions', headers=headers, json={'model': 'm', 'prompt': 'hi'})
    assert r.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f'{base}/v1', api_key=key or 'none', max_retries=0).models.list()


def test_health_needs_no_key(base):
    assert httpx.get(f'{base}/health').status_code == 200


@pytest.mark.parametrize('key', KEYS)
def test_a_right_key_is_served(base, key):
    client = openai.OpenAI(base_url=f'{base}/v1', api_key=key, max_retries=0, timeout=120)
    [model] = client.models.list().data
    resp = client.completions.create(model=model.id, prompt='The capital of France is', max_tokens=2, temperature=0)
    assert 'Paris' in resp.choices[0].text
