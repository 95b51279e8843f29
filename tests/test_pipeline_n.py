"""The pipeline's ``GenerationConfig(n=k)``: k independent answers per prompt, on the real default model."""
from __future__ import annotations

import pytest

from lmdeploy_jax import GenerationConfig, Response
from test_engine_helpers import default_model_pipeline

PROMPT = 'Write a short poem about the sea.'


@pytest.fixture(scope='module')
def pipe():
    with default_model_pipeline() as p:
        yield p


def sampled(seed=None, n=4, max_new_tokens=8):
    return GenerationConfig(n=n, do_sample=True, temperature=1.0, top_k=0, max_new_tokens=max_new_tokens,
                            random_seed=seed)


def test_n_answers_per_prompt_sampled_independently(pipe, rng):
    seed = int(rng.integers(0, 2**62))
    answers = pipe(PROMPT, gen_config=sampled(seed))
    assert isinstance(answers, list) and len(answers) == 4 and all(isinstance(a, Response) for a in answers)
    assert [a.index for a in answers] == [0, 1, 2, 3]
    assert len({tuple(a.token_ids) for a in answers}) > 1, 'the n answers are the same sample'
    # answer j is the one-answer request seeded seed + j
    assert pipe(PROMPT, gen_config=sampled(seed + 3, n=1)).token_ids == answers[3].token_ids


def test_n_per_prompt_of_a_batch_its_stream_and_greedy_n(pipe, rng):
    seed = int(rng.integers(0, 2**62))
    configs = [sampled(seed, n=2), GenerationConfig(n=2, max_new_tokens=8)]
    first, second = pipe([PROMPT, PROMPT], gen_config=configs)
    assert [a.index for a in first] == [0, 1] and [a.index for a in second] == [2, 3]
    assert first[0].token_ids != first[1].token_ids
    assert second[0].token_ids == second[1].token_ids, 'greedy answers differ'
    texts: dict[int, str] = {}
    for delta in pipe.stream_infer([PROMPT, PROMPT], gen_config=configs):
        texts[delta.index] = texts.get(delta.index, '') + delta.text
    assert texts == {a.index: a.text for a in [*first, *second]}


@pytest.mark.parametrize('n', [0, 65, 2.0, True])
def test_n_out_of_range_is_refused(n):
    with pytest.raises(ValueError, match='n must be'):
        GenerationConfig(n=n)


def test_one_answer_calls_refuse_n(pipe):
    with pytest.raises(ValueError, match='n=2: chat'):
        pipe.chat(PROMPT, gen_config=GenerationConfig(n=2))
