"""LMDeploy 0.12+'s pipeline API beside the older one: ``infer``, ``stream_infer(..., sessions=...)``
with ``stream_response``, ``session()`` with ``abort``, ``close()`` and the context manager, on the
real default model (greedy, so every way of asking gives the same answer)."""
from __future__ import annotations

import time

import pytest

from lmdeploy_jax import GenerationConfig, Response, pipeline

PROMPTS = ['What is the capital of France?', 'Name a colour.']
GREEDY = GenerationConfig(max_new_tokens=5)


@pytest.fixture(scope='module')
def pipe():
    # the API is the AsyncEngine's, the same over either backend: the reference one starts fastest
    with pipeline(backend='pytorch') as p:
        yield p


@pytest.fixture(scope='module')
def whole(pipe):
    return pipe.batch_infer(PROMPTS, gen_config=GREEDY)


@pytest.fixture(scope='module')
def answers(whole):
    return [r.text for r in whole]


def _texts(deltas: list[Response]) -> dict[int, str]:
    texts: dict[int, str] = {}
    for d in deltas:
        texts[d.index] = texts.get(d.index, '') + d.text
    return texts


def test_infer_is_batch_infer(pipe, answers):
    assert [r.text for r in pipe.infer(PROMPTS, gen_config=GREEDY)] == answers
    single = pipe.infer(PROMPTS[1], gen_config=GREEDY)
    assert isinstance(single, Response) and single.text == answers[1] and single.finish_reason == 'length'


def test_stream_infer_runs_each_prompt_in_its_session(pipe, answers):
    sessions = [pipe.session(), pipe.session()]
    pipe.chat('Hello!', session=sessions[0], gen_config=GREEDY)
    assert sessions[0].step > 0
    deltas = list(pipe.stream_infer(PROMPTS, sessions=sessions, gen_config=GREEDY))
    assert len(deltas) > len(PROMPTS)
    assert {(d.index, d.session_id) for d in deltas} == {(i, s.session_id) for i, s in enumerate(sessions)}
    assert _texts(deltas) == dict(enumerate(answers))
    assert sessions[0].step == 0      # the engine holds no history of it now: a chat in it starts afresh
    assert pipe.chat(PROMPTS[1], session=sessions[0], gen_config=GREEDY).response.text == answers[1]
    [one] = {d.session_id for d in pipe.stream_infer(PROMPTS[0], sessions=sessions[0], gen_config=GREEDY)}
    assert one == sessions[0].session_id


def test_stream_infer_without_streaming_gives_each_whole_answer_once(pipe, whole):
    outs = list(pipe.stream_infer(PROMPTS, gen_config=GREEDY, stream_response=False))
    assert sorted((o.index, o.text, o.token_ids, o.generate_token_len, o.finish_reason) for o in outs) == [
        (i, r.text, r.token_ids, r.generate_token_len, r.finish_reason) for i, r in enumerate(whole)]


def test_stream_infer_takes_the_older_positional_gen_config(pipe, answers):
    assert _texts(list(pipe.stream_infer(PROMPTS[1], GREEDY))) == {0: answers[1]}


def test_session_abort_stops_its_request(pipe):
    session = pipe.session()
    long = GenerationConfig(max_new_tokens=200, ignore_eos=True)
    deltas = []
    for delta in pipe.stream_infer(PROMPTS[0], sessions=session, gen_config=long):
        deltas.append(delta)
        if len(deltas) == 2:
            session.abort()
    assert deltas[-1].finish_reason == 'abort' and deltas[-1].generate_token_len < 200


@pytest.mark.parametrize('sessions, config, words', [
    (lambda p: [p.session()], GREEDY, 'sessions has 1 entries for 2 prompts'),
    (lambda p: [s := p.session(), s], GREEDY, 'lists a session twice'),
    (lambda p: [p.session(), p.session()], GREEDY.replace(n=2), 'n > 1 with sessions'),
    (lambda p: [1, 2], GREEDY, 'sessions must be a Session'),
])
def test_bad_sessions_are_refused_before_anything_runs(pipe, sessions, config, words):
    with pytest.raises(ValueError, match=words):
        next(pipe.stream_infer(PROMPTS, sessions=sessions(pipe), gen_config=config))


def test_include_stop_str_in_output_on_the_reference_backend(pipe):
    """The stop token comes back in ``token_ids`` and as its text (LMDeploy's); the JAX engine's
    case is in ``test_metrics.py``, beside its server."""
    plain = pipe.infer(PROMPTS[0], gen_config=GenerationConfig(max_new_tokens=40))
    kept = pipe.infer(PROMPTS[0], gen_config=GenerationConfig(max_new_tokens=40, include_stop_str_in_output=True))
    assert plain.finish_reason == kept.finish_reason == 'stop'
    eos = pipe.tokenizer.eos_token_id
    assert (kept.text, kept.token_ids, kept.generate_token_len) == (
        plain.text + pipe.tokenizer.decode([eos], skip_special_tokens=False), plain.token_ids + [eos],
        plain.generate_token_len + 1)
    cut = plain.text.index('Paris')
    for include, end in ((False, cut), (True, cut + len('Paris'))):
        config = GenerationConfig(max_new_tokens=40, stop_words=['Paris'], include_stop_str_in_output=include)
        assert pipe.infer(PROMPTS[0], gen_config=config).text == plain.text[:end]



def test_bad_words_keep_a_word_out_of_the_answer(pipe):
    config = GenerationConfig(max_new_tokens=8)
    assert 'Paris' in pipe.infer(PROMPTS[0], gen_config=config).text
    avoided = pipe.infer(PROMPTS[0], gen_config=config.replace(bad_words=['Paris'])).text
    assert avoided.startswith('The capital of France is') and 'Paris' not in avoided


def test_the_reference_backend_reports_each_requests_queue_time(pipe):
    """For the server's ``lmdeploy:request_queue_time_seconds`` (the JAX engine's: test_metrics.py)."""
    pipe.engine.take_queue_times()
    start = time.perf_counter()
    pipe.infer(PROMPTS, gen_config=GenerationConfig(max_new_tokens=1))
    took = time.perf_counter() - start
    times = pipe.engine.take_queue_times()
    assert len(times) == len(PROMPTS) and all(0 <= t < took for t in times)
    assert pipe.engine.take_queue_times() == []

def test_close_ends_the_pipeline_and_every_later_call_says_so(pipe):
    """The module's last test: it closes the module's pipeline (the fixture's ``with`` closes it again)."""
    pipe.close()
    for call in (lambda: pipe.infer(PROMPTS[0]), lambda: next(pipe.stream_infer(PROMPTS[0])), pipe.session):
        with pytest.raises(RuntimeError, match='the pipeline is closed'):
            call()
    pipe.close()
