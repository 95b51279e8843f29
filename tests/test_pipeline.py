"""The pipeline API end to end on the real default model (SmolLM2-135M-Instruct), per backend."""
from __future__ import annotations

import asyncio
import json
import os

import pytest

from lmdeploy_jax import GenerationConfig, PytorchEngineConfig, Response, pipeline
from test_engine_helpers import default_model_pipeline

FRANCE = 'What is the capital of France?'
CJK_EMOJI = 'Write the Chinese word for cat and a cat emoji.'


@pytest.fixture(scope='module', params=['turbomind', 'pytorch'])
def pipe(request):
    """The turbomind one at the server tests' session length (``default_model_pipeline``)."""
    with default_model_pipeline() if request.param == 'turbomind' else pipeline(backend='pytorch') as p:
        yield p


def test_answers_paris_with_counts(pipe):
    [resp] = pipe([FRANCE])
    assert isinstance(resp, Response)
    assert 'Paris' in resp.text
    assert resp.finish_reason == 'stop'
    assert resp.generate_token_len == len(resp.token_ids) > 0
    prompt_ids = pipe.tokenizer.encode(pipe.chat_template.messages2prompt(FRANCE))
    assert resp.input_token_len == len(prompt_ids)
    assert pipe.tokenizer.decode(resp.token_ids) == resp.text


def test_single_prompt_gives_single_response(pipe):
    resp = pipe(FRANCE, gen_config=GenerationConfig(max_new_tokens=4))
    assert isinstance(resp, Response) and resp.finish_reason == 'length' and resp.generate_token_len == 4


def test_batch_equals_solo_runs(pipe):
    prompts = [f'Count from 1 to {n}.' if n % 2 else 'Say hi. ' * n for n in range(1, 9)]
    config = GenerationConfig(max_new_tokens=12)
    together = pipe(prompts, gen_config=config)
    assert [r.index for r in together] == list(range(8))
    for prompt, resp in zip(prompts, together):
        assert pipe(prompt, gen_config=config).token_ids == resp.token_ids
        assert resp.finish_reason in ('stop', 'length') and resp.generate_token_len > 0


@pytest.mark.parametrize('prompt', [FRANCE, CJK_EMOJI])
def test_stream_deltas_add_up(pipe, prompt):
    whole = pipe(prompt).text
    deltas = list(pipe.stream_infer(prompt))
    assert ''.join(d.text for d in deltas) == whole
    assert all('\ufffd' not in d.text for d in deltas)
    assert deltas[-1].finish_reason == 'stop'
    if prompt == CJK_EMOJI:
        assert '猫' in whole and any(ord(c) > 0xFFFF for c in whole)


def test_stream_infer_tags_index(pipe):
    deltas = list(pipe.stream_infer([FRANCE, 'Hello!'], gen_config=GenerationConfig(max_new_tokens=8)))
    assert {d.index for d in deltas} == {0, 1}
    assert sum(d.finish_reason is not None for d in deltas) == 2


def test_chat_remembers_previous_turn(pipe):
    config = GenerationConfig(max_new_tokens=24)
    session = pipe.chat('The secret word is banana.', gen_config=config)
    first_step = session.step
    assert first_step > 0 and session.response.text
    session = pipe.chat('What is the secret word?', session=session, gen_config=config)
    assert 'banana' in session.response.text
    assert session.step > first_step and len(session.history) == 2
    session.close()
    assert session.step == 0
    forgotten = pipe.chat('What is the secret word?', session=session, gen_config=config)
    assert 'banana' not in forgotten.response.text


def test_seeded_sampling(pipe):
    def sample(seed):
        return pipe('Tell me a short story.', gen_config=GenerationConfig(
            max_new_tokens=16, do_sample=True, temperature=1.0, top_k=0, random_seed=seed)).token_ids
    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_stop_words_end_text_before_them(pipe):
    resp = pipe(FRANCE, gen_config=GenerationConfig(stop_words=['Paris']))
    assert resp.finish_reason == 'stop'
    assert 'Paris' not in resp.text and resp.text.startswith('The capital of France is')
    multi_token = pipe(FRANCE, gen_config=GenerationConfig(stop_words=['France is']))
    assert multi_token.text == 'The capital of ' and multi_token.finish_reason == 'stop'


def test_legacy_keyword_arguments(pipe):
    resp = pipe(FRANCE, request_output_len=3)
    assert resp.generate_token_len == 3 and resp.finish_reason == 'length'


def test_ignore_eos_runs_to_max_new_tokens(pipe):
    resp = pipe(FRANCE, gen_config=GenerationConfig(max_new_tokens=24, ignore_eos=True))
    assert resp.generate_token_len == 24 and resp.finish_reason == 'length'


def test_stop_session_aborts_running_request(pipe):
    async def run():
        outs = []
        async for out in pipe.generate(FRANCE, 4242, GenerationConfig(max_new_tokens=200, ignore_eos=True)):
            outs.append(out)
            if len(outs) == 2:
                pipe.stop_session(4242)
        return outs
    outs = asyncio.run(run())
    assert outs[-1].finish_reason == 'abort'
    assert outs[-1].generate_token_len < 200


def test_interactive_generate_keeps_history(pipe):
    async def turn(prompt, start):
        text = ''
        async for out in pipe.generate(prompt, 777, GenerationConfig(max_new_tokens=40),
                                       sequence_start=start, sequence_end=False):
            text += out.response
        return out, text
    first, _ = asyncio.run(turn('The secret word is banana.', True))
    second, text = asyncio.run(turn('What is the secret word?', False))
    assert second.history_token_len == first.input_token_len + first.generate_token_len + 1
    assert 'banana' in text
    pipe.end_session(777)


def test_get_ppl_matches_transformers(pipe):
    import torch
    from transformers import AutoModelForCausalLM
    ids = [pipe.tokenizer.encode('The capital of France is Paris.'), pipe.tokenizer.encode('Hello world, how are you?')]
    model = AutoModelForCausalLM.from_pretrained(pipe.source.hf_dir, dtype=torch.float32)
    expected = []
    for seq in ids:
        with torch.no_grad():
            logits = model(torch.tensor([seq])).logits[0, :-1].float()
        expected.append(torch.nn.functional.cross_entropy(logits, torch.tensor(seq[1:])).item())
    assert pipe.get_ppl(ids) == pytest.approx(expected, rel=1e-4)
    assert pipe.get_ppl(ids[0]) == pytest.approx(expected[:1], rel=1e-4)


@pytest.fixture(scope='module')
def reference_model():
    """transformers' float32 model of the default checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM

    from lmdeploy_jax.checkpoint.source import resolve_model
    return AutoModelForCausalLM.from_pretrained(resolve_model(None).hf_dir, dtype=torch.float32).eval()


def test_output_logits_and_last_hidden_state_equal_transformers(pipe, reference_model):
    """LMDeploy's rows: 'all' is every position of the prompt and the answer but the last,
    'generation' the rows that predict the answer's tokens (an EOS that ended it is not one of them).
    A streamed answer carries them on its last response."""
    import numpy as np
    import torch
    configs = [GenerationConfig(max_new_tokens=3, output_logits='all', output_last_hidden_state='generation'),
               GenerationConfig(output_logits='generation')]
    responses = pipe([CJK_EMOJI, FRANCE], gen_config=configs)
    assert [r.finish_reason for r in responses] == ['length', 'stop']
    for prompt, resp, config in zip([CJK_EMOJI, FRANCE], responses, configs):
        prompt_ids = pipe.tokenizer.encode(pipe.chat_template.messages2prompt(prompt))
        assert resp.input_token_len == len(prompt_ids)
        with torch.no_grad():
            out = reference_model(torch.tensor([prompt_ids + resp.token_ids]), output_hidden_states=True)
        every_position_but_last = {'logits': out.logits[0, :-1].numpy(),
                                   'last_hidden_state': out.hidden_states[-1][0, :-1].numpy()}
        for name, kind in (('logits', config.output_logits), ('last_hidden_state', config.output_last_hidden_state)):
            got = getattr(resp, name)
            if kind is None:
                assert got is None
                continue
            want = every_position_but_last[name][0 if kind == 'all' else len(prompt_ids) - 1:]
            assert isinstance(got, np.ndarray) and got.dtype == np.float32 and got.shape == want.shape
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
        assert resp.logits[-len(resp.token_ids):].argmax(-1).tolist() == resp.token_ids    # greedy
    deltas = list(pipe.stream_infer(CJK_EMOJI, gen_config=configs[0]))
    assert [d.logits is None for d in deltas] == [True] * (len(deltas) - 1) + [False]
    whole = deltas[0]
    for delta in deltas[1:]:
        whole = whole.extend(delta)         # LMDeploy's way to add up a stream: it keeps the arrays
    assert whole.token_ids == responses[0].token_ids
    np.testing.assert_allclose(whole.logits, responses[0].logits, rtol=1e-5)
    np.testing.assert_allclose(whole.last_hidden_state, responses[0].last_hidden_state, rtol=1e-5)


def test_output_logits_refuses_bad_kinds_and_later_session_turns(pipe):
    for name in ('output_logits', 'output_last_hidden_state'):
        with pytest.raises(ValueError, match=rf"^{name} must be None or one of \('all', 'generation'\)"):
            GenerationConfig(**{name: 'some'})
    session = pipe.session()
    pipe.chat(FRANCE, session=session, gen_config=GenerationConfig(max_new_tokens=1))
    with pytest.raises(ValueError, match='output_logits and output_last_hidden_state need a request that starts'):
        pipe.chat('And of Italy?', session=session, gen_config=GenerationConfig(max_new_tokens=1,
                                                                                 output_logits='all'))
    pipe.end_session(session.session_id)


def test_bad_requests_get_clear_errors_and_engine_keeps_serving(pipe):
    with pytest.raises(ValueError, match='non-empty'):
        pipe([])
    with pytest.raises(ValueError, match='prompt 1 is empty'):
        pipe(['hi', ''])
    with pytest.raises(ValueError, match='max_new_tokens'):
        GenerationConfig(max_new_tokens=-1)
    with pytest.raises(ValueError, match='top_p'):
        GenerationConfig(top_p=1.5)
    too_long = pipe('word ' * (pipe.session_len + 10))
    assert too_long.finish_reason == 'error' and f'session_len={pipe.session_len}' in too_long.text
    assert 'Paris' in pipe(FRANCE).text


def test_prompt_over_session_len_with_small_session():
    with pipeline(backend='pytorch', backend_config=PytorchEngineConfig(session_len=32)) as p:
        assert p.session_len == 32
        over = p('Tell me everything about the history of France, in great detail please.')
        assert over.finish_reason == 'error' and 'session_len=32' in over.text
        near = p('Hi', gen_config=GenerationConfig(max_new_tokens=100, ignore_eos=True))
        assert near.finish_reason == 'length' and near.input_token_len + near.generate_token_len == 32


def test_bad_construction_arguments(tmp_path):
    with pytest.raises(ValueError, match='backend'):
        pipeline(backend='tensorrt')
    with pytest.raises(FileNotFoundError, match='does not exist'):
        pipeline(str(tmp_path / 'no-such-model'))
    bogus = tmp_path / 'bogus'
    bogus.mkdir()
    (bogus / 'config.json').write_text(json.dumps({'architectures': ['FooForCausalLM'], 'model_type': 'foo'}))
    with pytest.raises(ValueError, match='FooForCausalLM'):
        pipeline(str(bogus))


def test_unavailable_hub_id_names_it(monkeypatch, tmp_path):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('HF_HUB_CACHE', str(tmp_path))
    with pytest.raises(FileNotFoundError, match='no-such-org/no-such-model'):
        pipeline('no-such-org/no-such-model')


def test_unsupported_gguf_architecture(tmp_path):
    import gguf
    import numpy as np
    path = os.path.join(tmp_path, 'odd.gguf')
    writer = gguf.GGUFWriter(path, 'oddarch')
    writer.add_tensor('token_embd.weight', np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match='oddarch'):
        pipeline(path)
