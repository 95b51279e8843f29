"""Reasoning parsers (``--reasoning-parser``): canned answers split exactly, whole and streamed in
awkward pieces (the default model's tokens, random cuts, one character at a time, so tags are
split across deltas), together with tool calls through the chat shape, and a real server whose
answers carry ``reasoning_content`` whole and streamed alike."""
from __future__ import annotations

import functools
import json

import httpx
import openai
import pytest

from lmdeploy_jax.serve.openai.shapes import ChatShape
from lmdeploy_jax.serve.openai.tools import ToolPlan
from lmdeploy_jax.serve.reasoning_parsers import ReasoningParser, reasoning_format
from lmdeploy_jax.serve.tool_parsers import tool_call_format

from test_server import running_server

# (parser, the prompt ends with <think>, the model's answer, its reasoning, its content)
ANSWERS = [
    ('qwen3', False, '<think>\nThe user greets me.\n</think>\n\nHello!', '\nThe user greets me.\n', '\n\nHello!'),
    ('qwen3', False, 'Hello there, <think> is a tag.', '', 'Hello there, <think> is a tag.'),
    ('qwen3', False, ' \n<think>a < b, </thin k> and </think\n</think>done', 'a < b, </thin k> and </think\n', 'done'),
    ('qwen3', False, '<think>still thinking when cut', 'still thinking when cut', ''),
    ('qwen3', False, '<thin', '', '<thin'),
    ('qwen3', True, 'Two and two.</think>It is 4.', 'Two and two.', 'It is 4.'),
    ('deepseek-r1', False, 'Okay, 2+2.\n</think>\n\n4', 'Okay, 2+2.\n', '\n\n4'),
    ('deepseek-r1', False, '<think>x</think>y</think>z', 'x', 'y</think>z'),
    ('deepseek-r1', False, 'no close tag at all', 'no close tag at all', ''),
    ('deepseek-r1', False, 'ends in a partial </thi', 'ends in a partial </thi', ''),
    ('default', False, '\n\n<think>\nHmm.</think>Yes.', '\nHmm.', 'Yes.'),
]


@pytest.fixture(scope='module')
def hf_tokenizer():
    from lmdeploy_jax.checkpoint.source import resolve_model
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(resolve_model(None).hf_dir)


def chunkings(text, hf_tokenizer, rng):
    """The text as the default model's tokens decode one by one, in random pieces, and by character."""
    ids = hf_tokenizer.encode(text, add_special_tokens=False)
    tokens = [hf_tokenizer.decode(ids[:k + 1])[len(hf_tokenizer.decode(ids[:k])):] for k in range(len(ids))]
    cuts = sorted(rng.choice(len(text), size=min(5, len(text)), replace=False))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    for chunks in (tokens, pieces, list(text)):
        assert ''.join(chunks) == text
        yield chunks


@pytest.mark.parametrize('name, opened, answer, reasoning, content', ANSWERS)
def test_parser_splits_whole_and_streamed_answers_alike(name, opened, answer, reasoning, content, hf_tokenizer, rng):
    fmt = reasoning_format(name)
    assert ReasoningParser(fmt, opened).parse_whole(answer) == (reasoning, content)
    for chunks in chunkings(answer, hf_tokenizer, rng):
        parser, got = ReasoningParser(fmt, opened), ('', '')
        for i, chunk in enumerate(chunks):
            r, c = parser.feed(chunk, final=i == len(chunks) - 1)
            got = (got[0] + r, got[1] + c)
        assert got == (reasoning, content), chunks


def test_text_that_may_be_a_tag_is_held_back_until_told_apart():
    parser = ReasoningParser(reasoning_format('qwen3'))
    assert parser.feed('\n<th') == ('', '')
    assert parser.feed('ink>Let me') == ('Let me', '')
    assert parser.feed(' see.</') == (' see.', '')
    assert parser.feed('think') == ('', '')
    assert parser.feed('>\n\nIt') == ('', '\n\nIt')
    assert parser.feed(' is.', final=True) == ('', ' is.')
    plain = ReasoningParser(reasoning_format('qwen3'))
    assert plain.feed('<tx') == ('', '<tx')


def test_prompt_that_ends_with_the_open_tag_opens_the_reasoning():
    fmt = reasoning_format('qwen3')
    assert fmt.prompt_opens_reasoning('<|im_start|>assistant\n<think>\n')
    assert not fmt.prompt_opens_reasoning('<|im_start|>assistant\n<think>\n\n</think>\n\n')
    assert not fmt.prompt_opens_reasoning('<|im_start|>assistant\n')


def test_unknown_names_are_refused_with_the_choices():
    with pytest.raises(ValueError, match="unknown reasoning parser 'qwen9'.*deepseek-r1.*qwen3"):
        reasoning_format('qwen9')


QWEN3_CALL = ('<think>\nThe user wants the weather; I call the tool.\n</think>\n\n<tool_call>\n'
              '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')


@pytest.mark.parametrize('answer, reasoning, content, calls', [
    (QWEN3_CALL, '\nThe user wants the weather; I call the tool.\n', None, [('get_weather', {'city': 'Paris'})]),
    ('<think>A <tool_call> in thought</think>Fine.', 'A <tool_call> in thought', 'Fine.', []),
])
def test_reasoning_then_tool_calls_in_the_chat_shape_whole_and_streamed(answer, reasoning, content, calls,
                                                                         hf_tokenizer, rng):
    def shape():
        return ChatShape(None, None, ToolPlan([], tool_call_format('qwen')),
                         functools.partial(ReasoningParser, reasoning_format('qwen3'), False))
    message = shape().choice(0, answer, [], [], 'stop').message
    got_calls = [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]
    assert (message.reasoning_content, message.content, got_calls) == (reasoning, content, calls)
    for chunks in chunkings(answer, hf_tokenizer, rng):
        streamed, parts = shape(), {'reasoning_content': '', 'content': '', 'tool_calls': []}
        for i, chunk in enumerate(chunks):
            delta = streamed.delta(0, chunk, [], [], 'stop' if i == len(chunks) - 1 else None).delta
            for key, value in delta.model_dump(exclude_unset=True).items():
                parts[key] += value
        assert parts['reasoning_content'] == reasoning and parts['content'] == (content or '')
        assert [(c['function']['name'], json.loads(c['function']['arguments'])) for c in parts['tool_calls']] == calls


# ---- the server -------------------------------------------------------------------------------

def test_serve_refuses_an_unknown_reasoning_parser_before_loading():
    from lmdeploy_jax.serve.openai import serve
    with pytest.raises(ValueError, match="unknown reasoning parser 'r2'"):
        serve('/nonexistent/model', reasoning_parser='r2')


@pytest.fixture(scope='module')
def server():
    # parsing is the server's business, not the engine's: the reference backend starts in a third of the time
    with running_server('--reasoning-parser', 'deepseek-r1', backend='pytorch') as base:
        client = openai.OpenAI(base_url=f'{base}/v1', api_key='unused', max_retries=0, timeout=300)
        yield base, client, client.models.list().data[0].id


def test_server_answers_carry_their_reasoning_whole_and_streamed(server):
    """The default model writes no tags: with deepseek-r1 its whole answer is reasoning, which must
    equal its raw text (``/generate`` does not parse) and come back the same streamed."""
    base, client, model = server
    messages = [{'role': 'user', 'content': 'Why is the sky blue?'}]
    raw = httpx.post(f'{base}/generate', json={'prompt': messages, 'temperature': 0, 'request_output_len': 12},
                     timeout=300).json()['text']
    whole = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
    message = whole.choices[0].message
    assert raw and '</think>' not in raw
    assert (message.reasoning_content, message.content) == (raw, None)
    reasoning, content = '', ''
    for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0,
                                                stream=True):
        delta = chunk.choices[0].delta
        reasoning += getattr(delta, 'reasoning_content', None) or ''
        content += delta.content or ''
    assert (reasoning, content) == (raw, '')


@pytest.mark.parametrize('field, value', [('chat_template_kwargs', {'enable_thinking': False}),
                                          ('enable_thinking', False)])
def test_chat_template_arguments_are_refused_not_dropped(server, field, value):
    _, client, model = server
    with pytest.raises(openai.BadRequestError, match=field) as info:
        client.chat.completions.create(model=model, messages=[{'role': 'user', 'content': 'Hi'}], max_tokens=1,
                                       extra_body={field: value})
    assert info.value.body['param'] == field
