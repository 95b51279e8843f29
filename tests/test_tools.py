"""Tool calling: the parsers on crafted answers (whole and streamed token by token), the builtin
Hermes template against Qwen2.5's own Jinja template, and the server end to end with the openai
client (``--chat-template qwen --tool-call-parser qwen`` on the default model, which writes no
calls by itself: the tools must reach its prompt, and its answers must come back well formed)."""
from __future__ import annotations

import json

import openai
import pytest

from lmdeploy_jax.chat_template import ChatTemplateConfig
from lmdeploy_jax.serve.tool_parsers import ToolCallParser, tool_call_format

from test_server import running_server

WEATHER = {'type': 'function', 'function': {
    'name': 'get_weather', 'description': 'The weather in a city now.',
    'parameters': {'type': 'object', 'properties': {'city': {'type': 'string'}, 'unit': {'enum': ['C', 'F']}},
                   'required': ['city']}}}
TIME = {'type': 'function', 'function': {'name': 'get_time', 'parameters': {'type': 'object', 'properties': {}}}}
ASK = [{'role': 'user', 'content': 'What is the weather in Paris and the time?'}]

# (parser, the model's answer, its content, its calls as (name, arguments))
ANSWERS = [
    ('qwen', 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n'
             '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
     'Let me check.', [('get_weather', {'city': 'Paris', 'unit': 'C'}), ('get_time', {})]),
    ('qwen', '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>',
     '', [('get_weather', {'city': 'Zürich'})]),
    ('qwen', 'Paris is sunny. I used <tool_call> tags < tool_call > here.\n', 'Paris is sunny. I used <tool_call> tags'
             ' < tool_call > here.\n', []),
    ('qwen', 'Bad: <tool_call>{"name": get_weather}</tool_call> then', 'Bad: <tool_call>{"name": get_weather}'
             '</tool_call> then', []),
    ('internlm', 'I will look it up.<|action_start|><|plugin|>\n{"name": "get_weather", "parameters": '
                 '{"city": "Paris"}}<|action_end|>', 'I will look it up.', [('get_weather', {'city': 'Paris'})]),
    ('llama3', '{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": {}}',
     '', [('get_weather', {'city': 'Paris'}), ('get_time', {})]),
    ('llama3', '<|python_tag|>{"name": "get_time", "parameters": {}}', '', [('get_time', {})]),
    ('llama3', 'The answer is {"a": 1}.', 'The answer is {"a": 1}.', []),
]


def _split(content, calls):
    return content, [(c.name, json.loads(c.arguments)) for c in calls]


@pytest.fixture(scope='module')
def hf_tokenizer():
    from lmdeploy_jax.checkpoint.source import resolve_model
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(resolve_model(None).hf_dir)


@pytest.mark.parametrize('parser, answer, content, calls', ANSWERS)
def test_parser_splits_whole_and_streamed_answers_alike(parser, answer, content, calls, hf_tokenizer, rng):
    fmt = tool_call_format(parser)
    whole = ToolCallParser(fmt).parse_whole(answer)
    assert _split(*whole) == (content, calls)
    assert [c.index for c in whole[1]] == list(range(len(calls)))
    ids = hf_tokenizer.encode(answer, add_special_tokens=False)
    token_texts = [hf_tokenizer.decode(ids[:k + 1])[len(hf_tokenizer.decode(ids[:k])):] for k in range(len(ids))]
    cuts = sorted(rng.choice(len(answer), size=min(6, len(answer)), replace=False))
    random_pieces = [answer[a:b] for a, b in zip([0, *cuts], [*cuts, len(answer)])]
    for pieces in (token_texts, random_pieces, list(answer)):
        assert ''.join(pieces) == answer
        stream, text, got = ToolCallParser(fmt), '', []
        for i, piece in enumerate(pieces):
            delta, new = stream.feed(piece, final=i == len(pieces) - 1)
            text, got = text + delta, got + new
        assert _split(text, got) == (content, calls), pieces


def test_text_that_may_open_a_call_is_held_back_until_told_apart():
    stream = ToolCallParser(tool_call_format('qwen'))
    assert stream.feed('Sure.\n<tool') == ('Sure.', [])
    assert stream.feed('_call>\n{"name": "get_time", ') == ('', [])
    text, [call] = stream.feed('"arguments": {}}\n</tool_call>')
    assert text == '' and (call.index, call.name, call.arguments) == (0, 'get_time', '{}')
    assert stream.feed(' Done.', final=True) == ('Done.', [])


QWEN25_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}{%- if messages[0]['role'] == 'system' %}"
    "{{- messages[0]['content'] }}{%- else %}{{- 'You are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.' }}{%- endif %}{{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user "
    "query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}"
    "{%- for tool in tools %}{{- \"\\n\" }}{{- tool | tojson }}{%- endfor %}{{- \"\\n</tools>\\n\\nFor each "
    "function call, return a json object with function name and arguments within <tool_call></tool_call> XML "
    "tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": <args-json-object>}\\n"
    "</tool_call><|im_end|>\\n\" }}{%- else %}{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n'"
    " + messages[0]['content'] + '<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by "
    "Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}{%- endif %}{%- endif %}"
    "{%- for message in messages %}{%- if (message.role == \"user\") or (message.role == \"system\" and not "
    "loop.first) or (message.role == \"assistant\" and not message.tool_calls) %}{{- '<|im_start|>' + "
    "message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- elif message.role == \"assistant\" %}"
    "{{- '<|im_start|>' + message.role }}{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}{%- if tool_call.function is defined %}{%- set tool_call = "
    "tool_call.function %}{%- endif %}{{- '\\n<tool_call>\\n{\"name\": \"' }}{{- tool_call.name }}"
    "{{- '\", \"arguments\": ' }}{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}{%- endfor %}"
    "{{- '<|im_end|>\\n' }}{%- elif message.role == \"tool\" %}{%- if (loop.index0 == 0) or "
    "(messages[loop.index0 - 1].role != \"tool\") %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}{%- if loop.last or "
    "(messages[loop.index0 + 1].role != \"tool\") %}{{- '<|im_end|>\\n' }}{%- endif %}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")

CONVERSATION = [
    {'role': 'system', 'content': 'You are a helpful assistant.'}, *ASK,
    {'role': 'assistant', 'content': None, 'tool_calls': [
        {'id': 'call_1', 'type': 'function', 'function': {'name': 'get_weather', 'arguments': '{"city": "Paris"}'}},
        {'id': 'call_2', 'type': 'function', 'function': {'name': 'get_time', 'arguments': '{}'}}]},
    {'role': 'tool', 'tool_call_id': 'call_1', 'content': '{"sky": "clear", "celsius": 21}'},
    {'role': 'tool', 'tool_call_id': 'call_2', 'content': '14:05'},
    {'role': 'assistant', 'content': 'It is clear and 21 C.', 'tool_calls': [
        {'id': 'call_3', 'type': 'function', 'function': {'name': 'get_time', 'arguments': '{}'}}]},
    {'role': 'tool', 'tool_call_id': 'call_3', 'content': '14:06'},
    {'role': 'user', 'content': 'Thanks!'}]


def _qwen25_render(hf_tokenizer, messages, tools):
    """Qwen2.5's own template, rendered by transformers (arguments as objects, as it expects)."""
    decoded = [{**m, 'tool_calls': [{**c, 'function': {**c['function'],
                                                       'arguments': json.loads(c['function']['arguments'])}}
                                    for c in m['tool_calls']]} if m.get('tool_calls') else m for m in messages]
    return hf_tokenizer.apply_chat_template(decoded, tools=tools, chat_template=QWEN25_TEMPLATE, tokenize=False,
                                            add_generation_prompt=True)


@pytest.mark.parametrize('messages, tools', [(CONVERSATION, [WEATHER, TIME]), (CONVERSATION[:2], [WEATHER]),
                                             (CONVERSATION, None)])
def test_builtin_qwen_template_renders_tools_as_qwen25_does(hf_tokenizer, messages, tools):
    qwen = ChatTemplateConfig('qwen').chat_template
    assert qwen.messages2prompt(messages, tools=tools) == _qwen25_render(hf_tokenizer, messages, tools)


def test_templates_that_cannot_render_tools_refuse_them(hf_tokenizer):
    from lmdeploy_jax.chat_template import HFChatTemplate
    with pytest.raises(ValueError, match='does not render tools'):
        HFChatTemplate(hf_tokenizer).messages2prompt(ASK, tools=[WEATHER])     # SmolLM2's ignores tools
    with pytest.raises(ValueError, match="'llama2' does not render tools"):
        ChatTemplateConfig('llama2').chat_template.messages2prompt(CONVERSATION)


# ---- the server -------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def server():
    # tools are the server's business, not the engine's: the reference backend starts in a third of the time
    with running_server('--chat-template', 'qwen', '--tool-call-parser', 'qwen', backend='pytorch') as base:
        client = openai.OpenAI(base_url=f'{base}/v1', api_key='unused', max_retries=0, timeout=300)
        yield client, client.models.list().data[0].id


def _prompt_tokens(hf_tokenizer, messages, tools):
    text = ChatTemplateConfig('qwen').chat_template.messages2prompt(messages, tools=tools)
    return len(hf_tokenizer.encode(text))


def _check_message(message, finish_reason, names):
    assert message.role == 'assistant'
    if message.tool_calls:
        assert finish_reason == 'tool_calls'
        for call in message.tool_calls:
            assert call.function.name in names and isinstance(json.loads(call.function.arguments), dict)
    else:
        assert finish_reason in ('stop', 'length') and message.content


@pytest.mark.parametrize('tool_choice, rendered', [('auto', [WEATHER, TIME]), ('required', [WEATHER, TIME]),
                                                   ('none', [WEATHER, TIME]),
                                                   ({'type': 'function', 'function': {'name': 'get_time'}}, [TIME])])
def test_tools_reach_the_prompt_and_the_answer_is_well_formed(server, hf_tokenizer, tool_choice, rendered):
    client, model = server
    resp = client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER, TIME], tool_choice=tool_choice,
                                          max_tokens=24, temperature=0)
    assert resp.usage.prompt_tokens == _prompt_tokens(hf_tokenizer, ASK, rendered)
    assert resp.usage.prompt_tokens > _prompt_tokens(hf_tokenizer, ASK, None) + 50
    [choice] = resp.choices
    _check_message(choice.message, choice.finish_reason, {'get_weather', 'get_time'})
    if tool_choice == 'none':
        assert choice.message.tool_calls is None


def streamed_answer(chunks) -> tuple[str, list[tuple[str, str]], str | None]:
    """(content, tool calls as (name, arguments) in index order, finish reason) of a streamed chat
    answer of one choice; asserts that only its last chunk carries a finish reason."""
    text, calls, reasons = '', {}, []
    for chunk in chunks:
        for choice in chunk.choices:
            text += choice.delta.content or ''
            for call in choice.delta.tool_calls or []:
                calls[call.index] = (call.function.name, call.function.arguments)
            reasons.append(choice.finish_reason)
    assert not any(reasons[:-1])
    return text, [calls[i] for i in sorted(calls)], reasons[-1]


def test_a_conversation_with_tool_calls_and_results_streams_as_it_answers(server, hf_tokenizer):
    client, model = server
    kwargs = dict(model=model, messages=CONVERSATION, tools=[WEATHER, TIME], max_tokens=16, temperature=0)
    whole = client.chat.completions.create(**kwargs)
    assert whole.usage.prompt_tokens == _prompt_tokens(hf_tokenizer, CONVERSATION, [WEATHER, TIME])
    content, calls, reason = streamed_answer(client.chat.completions.create(**kwargs, stream=True))
    message = whole.choices[0].message
    assert content == (message.content or '')
    assert calls == [(c.function.name, c.function.arguments) for c in message.tool_calls or []]
    assert reason == whole.choices[0].finish_reason


@pytest.mark.parametrize('fields, param, words', [
    ({'tool_choice': {'type': 'function', 'function': {'name': 'get_date'}}}, 'tool_choice', "'get_date'"),
    ({'tools': None, 'tool_choice': 'required'}, 'tool_choice', 'needs tools'),
    ({'tools': [{**WEATHER, 'function': {**WEATHER['function'], 'strict': True}}]}, 'tools.0.function.strict', ''),
    ({'tools': [{'type': 'function', 'function': {'name': 'get weather'}}]}, 'tools.0.function.name', ''),
    ({'messages': [*ASK, {'role': 'tool', 'content': '21 C'}]}, 'messages.1', 'tool_call_id'),
    ({'messages': [*ASK, {'role': 'assistant', 'tool_calls': [
        {'id': 'c', 'type': 'function', 'function': {'name': 'get_time', 'arguments': '{oops'}}]}]},
     'messages.1.tool_calls.0.function.arguments', 'is not JSON'),
])
def test_bad_tool_requests_get_a_400_naming_the_field(server, fields, param, words):
    client, model = server
    body = {'model': model, 'messages': ASK, 'tools': [WEATHER, TIME], 'max_tokens': 2, **fields}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**{k: v for k, v in body.items() if v is not None})
    error = info.value.body
    assert error['param'] == param and words in error['message'], error


@pytest.mark.parametrize('parallel', [True, False])
def test_answers_with_calls_serialize_as_the_openai_client_reads_them(parallel):
    """The response bodies the server sends for an answer with calls (ANSWERS[0]), read back with
    the openai package's own types: whole, and streamed in pieces."""
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    from lmdeploy_jax.serve.openai.protocol import CompletionBody
    from lmdeploy_jax.serve.openai.shapes import ChatShape
    from lmdeploy_jax.serve.openai.tools import ToolPlan
    _, answer, content, calls = ANSWERS[0]
    expected = calls if parallel else calls[:1]
    plan = ToolPlan([WEATHER, TIME], tool_call_format('qwen'), parallel)
    head = dict(id='chatcmpl-1', model='m', created=0)
    whole = ChatShape(None, None, plan).choice(0, answer, [], [], 'stop')
    body = ChatCompletion.model_validate_json(CompletionBody(**head, object='chat.completion',
                                                             choices=[whole]).model_dump_json())
    [choice] = body.choices
    assert choice.finish_reason == 'tool_calls' and choice.message.content == content
    assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == expected
    assert len({c.id for c in choice.message.tool_calls}) == len(expected)

    shape, text, streamed, reasons = ChatShape(None, None, plan), '', {}, []
    pieces = [answer[i:i + 7] for i in range(0, len(answer), 7)]
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        delta = shape.delta(0, piece, [], [], 'stop' if last else None)
        chunk = ChatCompletionChunk.model_validate_json(CompletionBody(
            **head, object='chat.completion.chunk', choices=[delta]).model_dump_json(exclude_unset=True))
        text += chunk.choices[0].delta.content or ''
        for call in chunk.choices[0].delta.tool_calls or []:
            assert call.id.startswith('call_') and call.type == 'function'
            streamed[call.index] = (call.function.name, json.loads(call.function.arguments))
        reasons.append(chunk.choices[0].finish_reason)
    assert text == content and list(streamed.values()) == expected and sorted(streamed) == list(range(len(expected)))
    assert reasons[-1] == 'tool_calls' and not any(reasons[:-1])
