"""Chat template arguments (``chat_template_kwargs``, LMDeploy's ``enable_thinking`` and
``reasoning_effort``) reach the model's Jinja template through transformers' ``apply_chat_template``,
and one that cannot apply is refused by name.

The template under test is the default model's (SmolLM2's ChatML) reading ``enable_thinking``
as Qwen3's does (its switch, verbatim, after the generation prompt: an empty ``<think></think>``
when it is false) and ``reasoning_effort`` in a first system turn (``Reasoning: high``, as
gpt-oss's states it). No model is loaded.
"""
from __future__ import annotations

import inspect
import pathlib
import random
from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer

from lmdeploy_jax.chat_template import ChatTemplateConfig, HFChatTemplate
from lmdeploy_jax.chat_template_kwargs import (RESERVED, TemplateArgumentError, resolve_template_kwargs, source_field,
                                               template_variables)
from lmdeploy_jax.checkpoint.source import resolve_model
from lmdeploy_jax.serve.openai.routes_openai import _reasoning_parsers
from lmdeploy_jax.serve.reasoning_parsers.formats import reasoning_format

# Qwen3's switch, verbatim, which follows its generation prompt; and a system turn stating the reasoning effort
THINKING_SWITCH = ("{%- if enable_thinking is defined and enable_thinking is false %}"
                   "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}")
EFFORT_TURN = ("{%- if reasoning_effort is defined %}"
               "{{- '<|im_start|>system\\nReasoning: ' + reasoning_effort + '<|im_end|>\\n' }}{%- endif %}")
NO_THINKING = '<think>\n\n</think>\n\n'


def template_with_arguments(template: str) -> str:
    """SmolLM2's chat template ``template`` reading ``enable_thinking`` (``THINKING_SWITCH`` after its
    generation prompt) and ``reasoning_effort`` (``EFFORT_TURN`` first); without either it renders as before."""
    prompt = "{{ '<|im_start|>assistant\n' }}"
    assert template.count(prompt) == 1, template
    return EFFORT_TURN + template.replace(prompt, prompt + THINKING_SWITCH)


def model_dir_with_template_arguments(root: pathlib.Path) -> pathlib.Path:
    """The default model (links to its files) under ``root``, its chat template ``template_with_arguments``'s."""
    source = pathlib.Path(resolve_model(None).hf_dir)
    for path in source.iterdir():
        if path.name != 'chat_template.jinja':
            (root / path.name).symlink_to(path)
    (root / 'chat_template.jinja').write_text(template_with_arguments((source / 'chat_template.jinja').read_text()))
    return root


@pytest.fixture(scope='module')
def hf(tmp_path_factory):
    return AutoTokenizer.from_pretrained(model_dir_with_template_arguments(tmp_path_factory.mktemp('model')))


def _conversation(seed: int) -> list[dict]:
    rng = random.Random(seed)
    words = ['Paris', 'river', '你好', 'naïve', '42', 'quantum', 'café']
    text = lambda: ' '.join(rng.choice(words) for _ in range(rng.randrange(2, 7)))  # noqa: E731
    return [{'role': 'user', 'content': text()}, {'role': 'assistant', 'content': text()},
            {'role': 'user', 'content': text()}]


@pytest.mark.parametrize('seed', [0, 1])
def test_enable_thinking_changes_the_prompt_as_the_template_says(hf, seed):
    template, messages = HFChatTemplate(hf), _conversation(seed)
    default = template.messages2prompt(messages)
    assert default == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert default.endswith('<|im_start|>assistant\n')
    off = template.messages2prompt(messages, **resolve_template_kwargs({'enable_thinking': False}, None))
    assert off == default + NO_THINKING
    assert off == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    # LMDeploy's top-level field fills the variable; the dict's own value wins over it
    assert template.messages2prompt(messages, **resolve_template_kwargs(None, False)) == off
    assert template.messages2prompt(messages, **resolve_template_kwargs({'enable_thinking': True}, False)) == default
    assert template.messages2prompt(messages, **resolve_template_kwargs({'enable_thinking': None}, False)) == off
    # an interactive session's next turn is rendered with the variables too
    assert template.messages2prompt(messages[-1:], sequence_start=False, enable_thinking=False).endswith(
        '<|im_start|>assistant\n' + NO_THINKING)


def test_reasoning_effort_fills_its_variable_over_the_dicts(hf):
    template, messages = HFChatTemplate(hf), _conversation(3)
    high = template.messages2prompt(messages, **resolve_template_kwargs({'reasoning_effort': 'low'}, None, 'high'))
    assert high == '<|im_start|>system\nReasoning: high<|im_end|>\n' + template.messages2prompt(messages)
    assert high == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, reasoning_effort='high')
    assert resolve_template_kwargs({'reasoning_effort': None, 'enable_thinking': None, 'x': None}) == {'x': None}


@pytest.mark.parametrize('key, kwargs, thinking, effort, field', [
    ('enable_thinking', None, False, None, 'enable_thinking'),
    ('enable_thinking', {'enable_thinking': True}, False, None, 'chat_template_kwargs'),
    ('enable_thinking', {'enable_thinking': None}, False, None, 'enable_thinking'),
    ('reasoning_effort', {'reasoning_effort': 'low'}, None, 'high', 'reasoning_effort'),
    ('reasoning_effort', {'reasoning_effort': 'low'}, None, None, 'chat_template_kwargs'),
    ('colour', {'colour': 'red'}, True, 'low', 'chat_template_kwargs'),
])
def test_a_variable_is_traced_to_the_field_that_gave_it(key, kwargs, thinking, effort, field):
    assert key in resolve_template_kwargs(kwargs, thinking, effort)
    assert source_field(key, kwargs, thinking, effort) == field


def test_a_variable_no_template_reads_is_refused_by_name(hf):
    messages = _conversation(2)
    with pytest.raises(TemplateArgumentError, match=r"chat_template_kwargs\['colour'\].*never reads") as info:
        HFChatTemplate(hf).messages2prompt(messages, enable_thinking=False, colour='red')
    assert info.value.key == 'colour'
    with pytest.raises(TemplateArgumentError, match=r'^chat_template_kwargs: the chat template fails on its arguments'):
        HFChatTemplate(hf).messages2prompt(messages, reasoning_effort=5)      # 'Reasoning: ' + 5
    qwen = ChatTemplateConfig('qwen').chat_template
    with pytest.raises(TemplateArgumentError, match=r"\['enable_thinking'\].*builtin chat template 'qwen'"):
        qwen.messages2prompt(messages, enable_thinking=False)
    assert qwen.messages2prompt(messages, **resolve_template_kwargs({}, None)) == qwen.messages2prompt(messages)


@pytest.mark.parametrize('kwargs, thinking, effort, words', [
    (['enable_thinking'], None, None, 'chat_template_kwargs must be a dict'),
    ({1: True}, None, None, 'keys must be str'),
    ({'tools': []}, None, None, r"chat_template_kwargs\['tools'\] is set by the chat template call"),
    ({'add_generation_prompt': False}, None, None, r"\['add_generation_prompt'\]"),
    ({'messages': []}, None, None, r"\['messages'\]"),
    ({'note': '\ud800'}, None, None, 'chat_template_kwargs.note is not valid UTF-8'),
    (None, 'no', None, 'enable_thinking must be True, False or None'),
    (None, 0, None, 'enable_thinking must be True, False or None'),
    (None, None, 'minimal', "reasoning_effort must be one of .*'max'.* got 'minimal'"),
])
def test_bad_arguments_are_refused_naming_the_field(kwargs, thinking, effort, words):
    with pytest.raises(ValueError, match=words):
        resolve_template_kwargs(kwargs, thinking, effort)


def test_the_variables_of_templates_using_transformers_tags_are_found():
    """transformers renders with ``{% generation %}`` blocks and loop controls; their templates parse too."""
    source = ("{%- for m in messages %}{%- if loop.index > max_turns %}{%- break %}{%- endif %}"
              "{%- if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}{%- endif %}"
              '{%- endfor %}{%- set greeting = "hi" %}{{ greeting }}')
    assert template_variables(source) == {'messages', 'max_turns'}


def test_every_apply_chat_template_parameter_is_reserved(hf):
    named = set(inspect.signature(hf.apply_chat_template).parameters) - {'kwargs'}
    assert named - RESERVED == set()


def test_thinking_switched_off_leaves_the_answer_all_content(hf):
    """LMDeploy's rule: with ``enable_thinking`` false no reasoning is split out, even by a parser
    (deepseek-r1) that reads an answer without tags as reasoning."""
    server = SimpleNamespace(reasoning_format=reasoning_format('deepseek-r1'), engine=SimpleNamespace(tokenizer=hf))
    ids = hf.encode('<|im_start|>assistant\n')
    assert _reasoning_parsers(server, ids, {'enable_thinking': False}) is None
    for kwargs in ({}, {'enable_thinking': True}):
        assert _reasoning_parsers(server, ids, kwargs)().parse_whole('Because.') == ('Because.', '')
