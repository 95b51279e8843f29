"""How each model family writes a tool call in its answer, by ``--tool-call-parser`` name (LMDeploy's).

Every format wraps JSON ``{"name": ..., "arguments" | "parameters": {...}}`` payloads in tags:

- ``qwen`` (Qwen2.5, Qwen3, Hermes): ``<tool_call>{json}</tool_call>``, one call per tag pair;
- ``internlm`` (InternLM2/2.5): ``<|action_start|><|plugin|>{json}<|action_end|>``;
- ``llama3`` (Llama 3.1/3.2 JSON tool calling): ``<|python_tag|>`` then calls to the end of the
  answer, separated by ``;``, or an answer that is JSON from its first character.

Tags that are special tokens reach the text only when special tokens are kept in it
(``keeps_special_tokens``), so the server keeps them for requests with tools, as LMDeploy does.
"""
from __future__ import annotations

from dataclasses import dataclass

from ...named_formats import NamedFormats


@dataclass(frozen=True)
class ToolCallFormat:
    name: str
    open_tag: str
    close_tag: str | None           # None: the calls run to the end of the answer
    keeps_special_tokens: bool      # the tags are special tokens
    json_answer_is_call: bool = False   # an answer starting with '{' is a call without the open tag


_FORMATS = NamedFormats('tool call parser', {
    'qwen': ToolCallFormat('qwen', '<tool_call>', '</tool_call>', keeps_special_tokens=False),
    'internlm': ToolCallFormat('internlm', '<|action_start|><|plugin|>', '<|action_end|>', keeps_special_tokens=True),
    'llama3': ToolCallFormat('llama3', '<|python_tag|>', None, keeps_special_tokens=True, json_answer_is_call=True),
}, aliases={'qwen2d5': 'qwen', 'qwen3': 'qwen', 'hermes': 'qwen', 'internlm2': 'internlm', 'intern-s1': 'internlm'})
TOOL_CALL_PARSER_NAMES = _FORMATS.names
tool_call_format = _FORMATS.get       # the format named ``name`` (or an alias); ValueError listing the names
