"""No argument silently dropped: LMDeploy's arguments we do not implement, and misspelt keywords,
are refused by name, in the pipeline and on the server (where the 400 names the OpenAI field)."""
from __future__ import annotations

import openai
import pytest
from transformers import AutoTokenizer

from lmdeploy_jax import ChatTemplateConfig, GenerationConfig, pipeline
from lmdeploy_jax.chat_template import HFChatTemplate

from test_chat_template_kwargs import NO_THINKING, model_dir_with_template_arguments
from test_server import running_server

PROMPT = 'The capital of France is'


@pytest.fixture(scope='module')
def pipe():
    """LMDeploy's arguments that change nothing here are taken: trust_remote_code reaches the
    tokenizer (SmolLM2's ships no code), max_log_len has nothing to cut (prompts are not logged)."""
    with pipeline(trust_remote_code=True, max_log_len=0, speculative_config=None, allowed_media_domains=None) as p:
        yield p


@pytest.mark.parametrize('kwargs, kind, words', [
    ({'speculative_config': object()}, ValueError, 'speculative_config'),
    ({'allowed_media_domains': ['example.com']}, ValueError, 'allowed_media_domains'),
    ({'max_log_len': -1}, ValueError, 'max_log_len'),
    ({'trust_remote_code': 'yes'}, ValueError, 'trust_remote_code'),
    ({'adapter_name': 'lora'}, TypeError, 'adapter_name'),
    ({'cache_max_entry_count': 0.5}, TypeError, 'cache_max_entry_count'),
])
def test_pipeline_refuses_what_it_would_drop_before_loading(kwargs, kind, words):
    with pytest.raises(kind, match=words):
        pipeline('/nonexistent/model', **kwargs)


def test_pipeline_takes_lmdeploys_no_op_arguments(pipe):
    assert 'Paris' in pipe(PROMPT, gen_config=GenerationConfig(max_new_tokens=3), do_preprocess=False).text


@pytest.mark.parametrize('field, value', [
    ('logits_processors', [lambda ids, logits: logits]),
    ('return_ppl', True), ('with_cache', True), ('preserve_cache', True),
    ('migration_request', {}), ('return_routed_experts', True), ('repetition_ngram_size', 3),
    ('repetition_ngram_threshold', 2)])
def test_lmdeploys_generation_fields_we_lack_are_refused_unless_default(field, value):
    with pytest.raises(ValueError, match=rf'^{field} must be .*\(.+\)'):
        GenerationConfig(**{field: value})
    config = GenerationConfig()
    setattr(config, field, value)      # changed after construction: the engines check again
    with pytest.raises(ValueError, match=rf'^{field}'):
        config.validate()
    default = getattr(GenerationConfig(), field)
    assert GenerationConfig(**{field: default}) == GenerationConfig()


@pytest.mark.parametrize('name', ['top_kk', 'max_tokens', 'stream', 'seed', 'input_ids'])
def test_an_unknown_keyword_of_a_call_is_refused_by_name(pipe, name):
    config = GenerationConfig(max_new_tokens=2)
    with pytest.raises(TypeError, match=name):
        pipe(PROMPT, gen_config=config, do_preprocess=False, **{name: 1})
    with pytest.raises(TypeError, match=name):
        list(pipe.stream_infer(PROMPT, gen_config=config, do_preprocess=False, **{name: 1}))
    with pytest.raises(TypeError, match=name):
        pipe.chat(PROMPT, gen_config=config, **{name: 1})


TOOL = {'type': 'function', 'function': {'name': 'get_time', 'description': 'The time now.',
                                         'parameters': {'type': 'object', 'properties': {}}}}


def test_tools_reach_the_prompt_or_are_refused(pipe):
    ask = [{'role': 'user', 'content': 'What time is it?'}]
    config = GenerationConfig(max_new_tokens=1)
    with pytest.raises(ValueError, match='does not render tools'):     # SmolLM2's own template
        pipe(ask, gen_config=config, tools=[TOOL])
    own = pipe.chat_template
    pipe.chat_template = ChatTemplateConfig('qwen').chat_template     # ChatML, as SmolLM2's, with tools
    try:
        resp = pipe(ask, gen_config=config, tools=[TOOL])
        [delta, *_] = pipe.stream_infer(ask, gen_config=config, tools=[TOOL])
        expected = pipe.tokenizer.encode(pipe.chat_template.messages2prompt(ask, tools=[TOOL]))
    finally:
        pipe.chat_template = own
    assert '"name": "get_time"' in pipe.tokenizer.decode(expected)
    assert resp.input_token_len == delta.input_token_len == len(expected)
    assert resp.generate_token_len == 1


def test_chat_template_arguments_reach_the_template_or_are_refused(pipe, tmp_path):
    """Every call hands them to the chat template, which refuses what it does not read; one that
    reads them renders them (SmolLM2's reading them, ``test_chat_template_kwargs.py``)."""
    ask = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Why is the sky blue?'}]
    config = GenerationConfig(max_new_tokens=1)      # a short prompt: the engine's smallest prefill on the CPU
    unread = r"\['enable_thinking'\]: the model's chat template never reads"       # SmolLM2's own template
    with pytest.raises(ValueError, match=unread):
        pipe(ask, gen_config=config, enable_thinking=False)
    with pytest.raises(ValueError, match=r"\['reasoning_effort'\]: the model's chat template never reads"):
        pipe.infer(ask, gen_config=config, reasoning_effort='high')
    with pytest.raises(ValueError, match=unread):
        list(pipe.stream_infer(ask, gen_config=config, chat_template_kwargs={'enable_thinking': False}))
    with pytest.raises(ValueError, match=unread):
        pipe.chat(ask[-1]['content'], gen_config=config, chat_template_kwargs={'enable_thinking': False})
    with pytest.raises(ValueError, match='chat_template_kwargs must be a dict'):
        pipe(ask, gen_config=config, chat_template_kwargs='enable_thinking=False')
    with pytest.raises(ValueError, match='need do_preprocess=True'):
        pipe(PROMPT, gen_config=config, do_preprocess=False, chat_template_kwargs={'enable_thinking': False})
    own = pipe.chat_template
    pipe.chat_template = HFChatTemplate(AutoTokenizer.from_pretrained(model_dir_with_template_arguments(tmp_path)))
    try:
        off = pipe.infer(ask, gen_config=config, chat_template_kwargs={'enable_thinking': False})
        expected = pipe.tokenizer.encode(pipe.chat_template.messages2prompt(ask, enable_thinking=False))
        plain = pipe.tokenizer.encode(pipe.chat_template.messages2prompt(ask))
    finally:
        pipe.chat_template = own
    assert pipe.tokenizer.decode(expected).endswith(NO_THINKING) and len(plain) < len(expected)
    assert (off.input_token_len, off.generate_token_len) == (len(expected), 1)


def test_adapter_name_is_refused_unless_none(pipe):
    config = GenerationConfig(max_new_tokens=2)
    with pytest.raises(ValueError, match='adapter_name'):
        pipe(PROMPT, gen_config=config, adapter_name='my-lora')
    assert pipe(PROMPT, gen_config=config, adapter_name=None).generate_token_len == 2


def test_use_tqdm_shows_progress(pipe, capsys):
    pipe([PROMPT] * 2, gen_config=GenerationConfig(max_new_tokens=2), do_preprocess=False, use_tqdm=True)
    assert '2/2' in capsys.readouterr().err
    with pytest.raises(ValueError, match='use_tqdm'):
        pipe(PROMPT, use_tqdm='no')


@pytest.fixture(scope='module')
def served_model(tmp_path_factory):
    """The default model whose chat template also reads ``enable_thinking`` and ``reasoning_effort``
    (``test_chat_template_kwargs.py``): without them it renders as SmolLM2's own."""
    return model_dir_with_template_arguments(tmp_path_factory.mktemp('model'))


@pytest.fixture(scope='module')
def client(served_model):
    with running_server(str(served_model), backend='pytorch') as base:
        client = openai.OpenAI(base_url=f'{base}/v1', api_key='unused', max_retries=0, timeout=120)
        yield client, client.models.list().data[0].id


def refused_chat(client, model: str, **request) -> dict:
    """The error body of the 400 (``openai.BadRequestError``) the server answers a one-word chat
    request with; ``request``: the create call's further keywords (``extra_body=``, ``tools=``)."""
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model, messages=[{'role': 'user', 'content': 'hi'}], max_tokens=2,
                                       **request)
    return info.value.body


@pytest.mark.parametrize('fields, param, words', [
    ({'stop': ['']}, 'stop', 'stop[0] must be a non-empty string'),
    ({'stop': ''}, 'stop', 'stop must be a non-empty string'),
    ({'top_k': 1_000_000}, 'top_k', 'top_k must be an integer in [0, 49152]'),
])
def test_a_400_names_the_request_field(client, fields, param, words):
    error = refused_chat(*client, extra_body=fields)
    assert error['param'] == param and words in error['message'], error


@pytest.mark.parametrize('fields', [
    {'presence_penalty': 0.5}, {'frequency_penalty': -1}, {'logit_bias': {'42': 5}},
    {'functions': [{'name': 'f', 'parameters': {}}]},
    {'modalities': ['text', 'audio']}])
def test_openai_fields_that_would_be_ignored_are_refused(client, fields):
    client, model = client
    [(param, value)] = fields.items()
    error = refused_chat(client, model, extra_body=fields)
    assert error['param'] == param and 'is not supported' in error['message'], error
    with pytest.raises(openai.BadRequestError, match='echo'):
        client.completions.create(model=model, prompt='hi', max_tokens=2, echo=True)
    harmless = {'presence_penalty': 0, 'frequency_penalty': 0, 'logit_bias': {}, 'response_format': {'type': 'text'},
                'functions': None, 'modalities': ['text']}[param]
    resp = client.chat.completions.create(model=model, messages=[{'role': 'user', 'content': 'hi'}], max_tokens=2,
                                          extra_body={param: harmless})
    assert resp.choices[0].finish_reason in ('stop', 'length')


@pytest.mark.parametrize('fields, words', [
    ({'tool_choice': 'auto'}, '--tool-call-parser'),
    ({'tool_choice': 'none'}, 'does not render tools'),    # SmolLM2's own template has no place for them
])
def test_tools_the_server_cannot_serve_are_refused(client, fields, words):
    tool = {'type': 'function', 'function': {'name': 'get_time', 'parameters': {'type': 'object'}}}
    error = refused_chat(*client, tools=[tool], **fields)
    assert error['param'] == 'tools' and words in error['message'], error


@pytest.mark.parametrize('fields, param, words', [
    ({'chat_template_kwargs': {'colour': 'red'}}, 'chat_template_kwargs', "never reads a variable 'colour'"),
    ({'chat_template_kwargs': ['enable_thinking']}, 'chat_template_kwargs', 'valid dictionary'),
    ({'chat_template_kwargs': {'add_generation_prompt': False}}, 'chat_template_kwargs',
     "['add_generation_prompt'] is set by the chat template call"),
    ({'enable_thinking': 'no'}, 'enable_thinking', 'valid boolean'),
    ({'reasoning_effort': 'minimal'}, 'reasoning_effort', "'low', 'medium', 'high' or 'max'"),
    ({'chat_template_kwargs': {'reasoning_effort': 5}}, 'chat_template_kwargs', 'the chat template fails on its'),
])
def test_chat_template_arguments_that_cannot_apply_get_a_400_naming_them(client, fields, param, words):
    error = refused_chat(*client, extra_body=fields)
    assert error['param'] == param and words in error['message'], error


def test_chat_template_arguments_reach_the_served_template(client, served_model):
    """Each request's prompt is the template's render with its arguments: ``enable_thinking`` from
    either field (None is unset), ``reasoning_effort`` over the dict's."""
    client, model = client
    hf = AutoTokenizer.from_pretrained(served_model)
    ask = [{'role': 'user', 'content': 'Why is the sky blue?'}]

    def served(**fields) -> int:
        return client.chat.completions.create(model=model, messages=ask, max_tokens=1,
                                              extra_body=fields).usage.prompt_tokens

    def rendered(**variables) -> int:
        text = hf.apply_chat_template(ask, tokenize=False, add_generation_prompt=True, **variables)
        return len(hf(text)['input_ids'])
    assert served() == served(chat_template_kwargs={'enable_thinking': None}, enable_thinking=None) == rendered()
    assert served(chat_template_kwargs={'enable_thinking': False}) == served(enable_thinking=False) == rendered(
        enable_thinking=False) > rendered()
    assert served(reasoning_effort='high', chat_template_kwargs={'reasoning_effort': 'low'}) == rendered(
        reasoning_effort='high') > rendered()
