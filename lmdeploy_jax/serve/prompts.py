"""What a pipeline call takes as prompts, and the token ids one request's prompt becomes.

``check_prompts`` normalizes a call's ``prompts`` argument; ``prompt_ids`` renders one prompt (a
str or an OpenAI message list) with the chat template and tokenizes it, or checks the token ids
given in its place. Both raise ``ValueError`` naming the field or the fault, before anything is
queued; text must encode as UTF-8.
"""
from __future__ import annotations

from ..engine_api import token_ids_error
from ..text_checks import require_utf8
from ..tokenizer import Tokenizer


def check_prompts(prompts) -> tuple[list, bool]:
    """``(prompts as a list, whether one prompt was given)``: a str or a message list is one prompt,
    a list of them many. Reject what cannot be a prompt (or text that is not UTF-8), naming it."""
    single = isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], dict))
    items = [prompts] if single else prompts
    if not isinstance(items, list) or not items:
        raise ValueError('prompts must be a non-empty str, a list of str or a list of message lists; got '
                         f'{prompts!r}')
    for i, p in enumerate(items):
        if isinstance(p, str) and not p.strip():
            raise ValueError(f'prompt {i} is empty')
        if isinstance(p, list) and not p:
            raise ValueError(f'prompt {i} is an empty message list')
        if not isinstance(p, (str, list)):
            raise ValueError(f'prompt {i} must be a str or a message list, got {type(p).__name__}')
        require_utf8(p, f'prompts[{i}]')
    return items, single


def prompt_ids(messages, *, chat_template, tokenizer: Tokenizer, vocab_size: int, sequence_start: bool,
               do_preprocess: bool, input_ids: list[int] | None, tools: list[dict] | None,
               template_kwargs: dict) -> list[int]:
    """The token ids of one request's prompt, never empty.

    ``input_ids``, when given, are the prompt (checked against ``vocab_size``; template arguments
    are refused with them). Else ``messages`` are rendered by ``chat_template.messages2prompt`` with
    ``tools`` and ``template_kwargs`` when ``do_preprocess``, or taken as the text itself (a str,
    without tools or template arguments) when not, and tokenized with a BOS on ``sequence_start``."""
    if input_ids is not None:
        if template_kwargs:
            raise ValueError('chat_template_kwargs, enable_thinking and reasoning_effort need messages, not '
                             'input_ids: the chat template renders messages')
        error = token_ids_error(input_ids, vocab_size)
        if error is not None:
            raise ValueError(error)
        ids = list(input_ids)
    else:
        require_utf8(messages, 'messages')
        if do_preprocess:
            prompt = chat_template.messages2prompt(messages, sequence_start, tools=tools, **template_kwargs)
        elif tools or template_kwargs:
            given = 'tools' if tools else 'chat_template_kwargs, enable_thinking and reasoning_effort'
            raise ValueError(f'{given} need do_preprocess=True: the chat template renders them')
        elif isinstance(messages, str):
            prompt = messages
        else:
            raise ValueError('do_preprocess=False needs a str prompt')
        ids = tokenizer.encode(prompt, add_bos=sequence_start)
    if not ids:
        raise ValueError('the prompt encodes to no tokens')
    return ids
