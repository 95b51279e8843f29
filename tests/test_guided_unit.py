"""Guided decoding's pieces without a model: the device mask against a numpy reference on fresh
random logits, the host unpacking, xgrammar's masks through ``Guide``, and ``response_format``'s
forms (LMDeploy's) with a refusal naming the field for anything else."""
from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from lmdeploy_jax.engine.sampler import apply_bitmask
from lmdeploy_jax.guided import allowed_tokens, bitmask_words
from lmdeploy_jax.messages import GenerationConfig, response_format_grammar


def reference_mask(logits: np.ndarray, bitmask: np.ndarray) -> np.ndarray:
    """Token by token: token t is allowed iff bit t % 32 of word t // 32 is set."""
    out = logits.copy()
    for row in range(logits.shape[0]):
        for token in range(logits.shape[1]):
            word = int(bitmask[row, token // 32]) & 0xFFFFFFFF
            if not (word >> (token % 32)) & 1:
                out[row, token] = -np.inf
    return out


@pytest.mark.parametrize('vocab', [32, 97, 1000])
def test_device_mask_matches_the_reference(rng, vocab):
    rows = 5
    logits = rng.standard_normal((rows, vocab)).astype(np.float32) * 4
    bitmask = rng.integers(-2 ** 31, 2 ** 31, (rows, bitmask_words(vocab)), dtype=np.int64).astype(np.int32)
    bitmask[0] = -1                                  # an unguided row: everything allowed
    bitmask[1] = 0
    bitmask[1, -1] = np.uint32(1 << ((vocab - 1) % 32)).view(np.int32)   # one allowed token, the last one
    expected = reference_mask(logits, bitmask)
    got = np.asarray(apply_bitmask(jnp.asarray(logits), jnp.asarray(bitmask)))
    np.testing.assert_array_equal(got, expected)
    assert np.array_equal(got[0], logits[0]) and np.flatnonzero(np.isfinite(got[1])).tolist() == [vocab - 1]
    for row in range(rows):
        np.testing.assert_array_equal(allowed_tokens(bitmask[row], vocab), np.isfinite(expected[row]))


def test_a_guide_masks_what_the_grammar_forbids_and_finishes_on_its_stop_token():
    from lmdeploy_jax.checkpoint.source import resolve_model
    from lmdeploy_jax.engine_api import EngineRequest
    from lmdeploy_jax.guided import GrammarCache, Guide
    from transformers import AutoTokenizer
    source = resolve_model(None)
    tokenizer = AutoTokenizer.from_pretrained(source.hf_dir)
    vocab = source.config_dict()['vocab_size']
    guide = Guide(GrammarCache(source.hf_dir, vocab, capacity=1))
    fmt = {'type': 'regex_schema', 'regex_schema': '(yes|no)!'}
    guided = EngineRequest(1, [1], GenerationConfig(response_format=fmt, stop_token_ids=[2]))
    free = EngineRequest(2, [1], GenerationConfig())
    assert guide.start(guided) is None and guide.start(free) is None
    mask = guide.bitmask([free, guided], 3)
    assert mask.shape == (3, bitmask_words(vocab)) and (mask[0] == -1).all() and (mask[2] == -1).all()
    allowed = {tokenizer.decode([t]) for t in np.flatnonzero(allowed_tokens(mask[1], vocab))}
    assert allowed and all('yes'.startswith(t) or 'no'.startswith(t) or t.startswith(('yes', 'no'))
                           for t in allowed), allowed
    for token in tokenizer.encode('no!'):
        assert guide.accept(guided, token) == 'ok'
    assert np.flatnonzero(allowed_tokens(guide.bitmask([guided], 1)[0], vocab)).tolist() == [2]
    assert guide.accept(guided, 2) == 'terminated'
    assert guide.bitmask([free], 1) is None
    guide.stop(guided)
    assert not guide.is_guided(guided)
    # a second grammar evicts the first from a cache of one; the same grammar again is a hit
    other = EngineRequest(3, [1], GenerationConfig(response_format={'type': 'json_object'}))
    assert guide.start(other) is None and guide.start(other) is None and guide.grammars.compiles == 2
    bad = EngineRequest(4, [1], GenerationConfig(response_format={'type': 'regex_schema', 'regex_schema': '(['}))
    assert guide.start(bad).startswith('response_format: xgrammar cannot compile the regex')


SCHEMA = {'type': 'object', 'properties': {'b': {'type': 'integer'}, 'a': {'type': 'string'}}}


@pytest.mark.parametrize('fmt, grammar', [
    ({'type': 'text'}, None),
    ({'type': 'json_object'}, ('json', json.dumps({'type': 'object'}))),
    ({'type': 'json_schema', 'json_schema': {'name': 'x', 'schema': SCHEMA}}, ('json', json.dumps(SCHEMA))),
    ({'type': 'json_schema', 'json_schema': {'name': 'x', 'schema': json.dumps(SCHEMA)}}, ('json', json.dumps(SCHEMA))),
    ({'type': 'regex_schema', 'regex_schema': '[a-z]+'}, ('regex', '[a-z]+'))])
def test_lmdeploys_response_formats_are_taken(fmt, grammar):
    assert response_format_grammar(fmt) == grammar
    assert GenerationConfig(response_format=fmt).response_format == fmt


@pytest.mark.parametrize('fmt, words', [
    ('json', 'response_format must be a dict whose type is one of'),
    ({'type': 'grammar', 'grammar': 'root ::= "a"'}, 'response_format must be a dict whose type'),
    ({'type': 'json_schema'}, r"response_format\['json_schema'\] must be a dict with a 'schema'"),
    ({'type': 'json_schema', 'json_schema': {'name': 'x', 'schema': '{no'}}, 'is not valid JSON'),
    ({'type': 'json_schema', 'json_schema': {'name': 'x', 'schema': [1]}}, 'must be a JSON schema'),
    ({'type': 'regex_schema', 'regex_schema': ''}, r"response_format\['regex_schema'\] must be a non-empty regex")])
def test_other_response_formats_are_refused_by_name(fmt, words):
    with pytest.raises(ValueError, match=words):
        GenerationConfig(response_format=fmt)
