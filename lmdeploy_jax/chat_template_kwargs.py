"""Arguments a caller gives the chat template: ``chat_template_kwargs``, LMDeploy's ``enable_thinking``
and ``reasoning_effort``.

LMDeploy's and vLLM's contract: the keys become variables of the model's own Jinja template
(``apply_chat_template(messages, ..., **chat_template_kwargs)``), so ``{'enable_thinking': False}``
switches Qwen3's reasoning off. Two request fields fill one variable each, as LMDeploy has them:
``enable_thinking`` unless the dict sets it (the dict wins, with a warning), ``reasoning_effort``
over the dict's. ``None`` for either means unset. Where LMDeploy drops a key without a word (a
builtin template, or a Jinja template that never reads it), this library refuses it with
``TemplateArgumentError``, which names the key.
"""
from __future__ import annotations

import functools
import logging
import re

import jinja2
import jinja2.meta

from .text_checks import require_utf8

logger = logging.getLogger('lmdeploy_jax')

REASONING_EFFORTS = ('low', 'medium', 'high', 'max')      # LMDeploy's
SOURCE_FIELDS = ('enable_thinking', 'reasoning_effort')  # the variables a request field of their own fills
# What the chat template call sets itself: the template's own inputs and apply_chat_template's parameters
RESERVED = frozenset({
    'messages', 'conversation', 'tools', 'documents', 'chat_template', 'add_generation_prompt',
    'continue_final_message', 'tokenize', 'sanitize_control_tokens', 'padding', 'truncation', 'max_length',
    'return_tensors', 'return_dict', 'return_assistant_tokens_mask', 'tokenizer_kwargs', 'sequence_start'})


class TemplateArgumentError(ValueError):
    """A chat template argument the template cannot apply: ``key`` names it (None: the template
    fails on its arguments together), ``reason`` says why."""

    def __init__(self, key: str | None, reason: str):
        super().__init__(f'chat_template_kwargs{"" if key is None else f"[{key!r}]"}: {reason}')
        self.key, self.reason = key, reason


def resolve_template_kwargs(chat_template_kwargs: dict | None, enable_thinking: bool | None = None,
                            reasoning_effort: str | None = None) -> dict:
    """The variables to pass to the chat template: ``chat_template_kwargs`` with LMDeploy's
    ``enable_thinking`` and ``reasoning_effort`` merged in (a fresh dict; empty when none is set).

    Raises ``ValueError`` naming the field: ``chat_template_kwargs`` not a dict or None, a key that
    is not a str or is ``RESERVED`` (the call sets it: ``tools=`` is its own argument), text that is
    not UTF-8; ``enable_thinking`` not True, False or None; ``reasoning_effort`` not one of
    ``REASONING_EFFORTS`` or None.
    """
    if chat_template_kwargs is None:
        chat_template_kwargs = {}
    if not isinstance(chat_template_kwargs, dict):
        raise ValueError('chat_template_kwargs must be a dict of chat template variables or None, got '
                         f'{type(chat_template_kwargs).__name__}')
    for key in chat_template_kwargs:
        if not isinstance(key, str):
            raise ValueError(f'chat_template_kwargs keys must be str (template variable names), got {key!r}')
        if key in RESERVED:
            raise ValueError(f'chat_template_kwargs[{key!r}] is set by the chat template call itself and may not be '
                             f'given here (reserved: {", ".join(sorted(RESERVED))})')
    require_utf8(chat_template_kwargs, 'chat_template_kwargs')
    if enable_thinking is not None and not isinstance(enable_thinking, bool):
        raise ValueError(f'enable_thinking must be True, False or None, got {enable_thinking!r}')
    if reasoning_effort is not None and reasoning_effort not in REASONING_EFFORTS:
        raise ValueError(f'reasoning_effort must be one of {REASONING_EFFORTS} or None, got {reasoning_effort!r}')
    kwargs = {k: v for k, v in chat_template_kwargs.items() if v is not None or k not in SOURCE_FIELDS}
    if reasoning_effort is not None:
        kwargs['reasoning_effort'] = reasoning_effort
    if 'enable_thinking' not in kwargs:
        if enable_thinking is not None:
            kwargs['enable_thinking'] = enable_thinking
    elif enable_thinking is not None:
        logger.warning("chat_template_kwargs['enable_thinking'] is set: it overrides enable_thinking=%s",
                       enable_thinking)
    return kwargs


def source_field(key: str | None, chat_template_kwargs: dict | None, enable_thinking: bool | None,
                 reasoning_effort: str | None) -> str:
    """The field whose value ``resolve_template_kwargs`` of these arguments gave the variable ``key``."""
    if key == 'reasoning_effort' and reasoning_effort is not None:
        return 'reasoning_effort'
    if key == 'enable_thinking' and enable_thinking is not None and (chat_template_kwargs or {}).get(key) is None:
        return 'enable_thinking'
    return 'chat_template_kwargs'


def refuse_all(template_name: str, kwargs: dict) -> None:
    """``TemplateArgumentError`` naming the first key of ``kwargs``, for a template of no variables."""
    if kwargs:
        key = sorted(kwargs)[0]
        raise TemplateArgumentError(key, f'the builtin chat template {template_name!r} has no variables to pass '
                                         f"{key!r} to (LMDeploy ignores it); template arguments reach a model's own "
                                         'Jinja template')


# A {% generation %} block (transformers' extension) only marks the assistant's text; its tags hold no variable.
_GENERATION_TAGS = re.compile(r'\{%-?\s*(?:end)?generation\s*-?%\}')


@functools.lru_cache(maxsize=8)
def template_variables(source: str) -> frozenset[str]:
    """The variables a Jinja chat template reads from its caller (jinja2's undeclared variables)."""
    env = jinja2.Environment(extensions=['jinja2.ext.loopcontrols'])
    return frozenset(jinja2.meta.find_undeclared_variables(env.parse(_GENERATION_TAGS.sub('', source))))


def refuse_unread(source: str, kwargs: dict) -> None:
    """``TemplateArgumentError`` naming the first key of ``kwargs`` that the template ``source`` never
    reads (the template is parsed only when there are keys)."""
    unread = sorted(set(kwargs) - template_variables(source)) if kwargs else []
    if unread:
        key = unread[0]
        raise TemplateArgumentError(key, f"the model's chat template never reads a variable {key!r}, so it "
                                         'would have no effect')
