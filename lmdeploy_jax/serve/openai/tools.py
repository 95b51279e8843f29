"""A chat request's tools: which reach the prompt, and how its answers are split into tool calls.

LMDeploy's rules, with its refusals as 400s naming the field:

- ``tools`` with ``tool_choice`` other than ``none`` need a server started with
  ``--tool-call-parser``; answers are then split into text and OpenAI ``tool_calls``, and an answer
  that stopped with calls finishes with ``tool_calls``.
- ``tool_choice``: ``auto`` (the default with tools) renders every tool; ``none`` renders them too
  but leaves the answer as text; a named function renders that function alone; ``required``
  renders every tool. ``tool_choice`` without ``tools`` is refused.
- ``required`` and a named function are enforced by guided decoding: the answer is constrained to
  one call, the JSON ``{"name": ..., "arguments": {...}}`` whose name is the named function (or
  one of the tools) and whose arguments follow that function's ``parameters`` schema
  (``forced_call_format``); it is read back as the call, whatever ``--tool-call-parser`` the
  model's own calls use. Such a request cannot carry a ``response_format`` of its own.
- ``parallel_tool_calls: false`` keeps the first call of an answer only.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..tool_parsers import ToolCall, ToolCallFormat, ToolCallParser, parse_payload
from .errors import APIError
from .protocol import ChatCompletionRequest, NamedToolChoice


@dataclass(frozen=True)
class ToolPlan:
    """What a request's tools do: ``rendered`` go to the chat template (OpenAI's tool dicts, or None);
    ``fmt`` splits the answers (None: they stay text)."""
    rendered: list[dict] | None
    fmt: ToolCallFormat | None
    parallel: bool = True
    response_format: dict | None = None      # the guided decoding that enforces the call, if any

    def parser(self) -> ToolCallParser | None:
        """A parser for one answer, or None when answers stay text."""
        if self.response_format is not None:
            return ForcedCallParser()
        return None if self.fmt is None else ToolCallParser(self.fmt)

    def kept(self, calls: list[ToolCall]) -> list[ToolCall]:
        """The calls an answer reports: the first alone unless parallel calls are allowed."""
        return calls if self.parallel else [c for c in calls if c.index == 0]

    def skip_special_tokens(self, requested: bool) -> bool:
        """Special tokens stay in the text when the format's tags are special tokens."""
        return requested and not (self.fmt is not None and self.fmt.keeps_special_tokens)


class ForcedCallParser(ToolCallParser):
    """The answer of an enforced call (``forced_call_format``): all of it is the call's JSON, read
    when the answer ends; an answer that is not a call (cut short by max_tokens) stays text."""

    def __init__(self):
        super().__init__(fmt=None)

    def feed(self, delta: str, final: bool = False) -> tuple[str, list[ToolCall]]:
        self._pending += delta
        if not final:
            return '', []
        parsed = parse_payload(self._pending)
        if parsed is None:
            return self._pending, []
        return '', [self._call(name, arguments) for name, arguments in parsed]


def plan_tools(body: ChatCompletionRequest, fmt: ToolCallFormat | None) -> ToolPlan:
    """The plan for ``body`` on a server whose ``--tool-call-parser`` is ``fmt`` (None: not given)."""
    choice, tools = body.tool_choice, body.tools or []
    if not tools:
        if choice not in (None, 'none'):
            raise APIError(400, f'tool_choice {_describe(choice)} needs tools', 'tool_choice')
        return ToolPlan(None, None)
    rendered = [t.model_dump(exclude_none=True) for t in tools]
    if isinstance(choice, NamedToolChoice):
        rendered = [t for t in rendered if t['function']['name'] == choice.function.name]
        if not rendered:
            raise APIError(400, f'tool_choice names the function {choice.function.name!r}, which is not in tools',
                           'tool_choice')
    if choice == 'none':
        return ToolPlan(rendered, None)
    if choice == 'required' or isinstance(choice, NamedToolChoice):
        if body.response_format not in (None, {'type': 'text'}):
            raise APIError(400, f'tool_choice {_describe(choice)} decides the answer\'s format: it cannot be '
                                'combined with a response_format', 'response_format')
        return ToolPlan(rendered, None, body.parallel_tool_calls, forced_call_format(rendered))
    if fmt is None:
        raise APIError(400, 'tools need a server started with --tool-call-parser (qwen, internlm or llama3) to '
                            'turn answers into tool calls', 'tools')
    return ToolPlan(rendered, fmt, body.parallel_tool_calls)


def forced_call_format(tools: list[dict]) -> dict:
    """The ``response_format`` of an answer that is one call of one of ``tools`` (OpenAI tool
    dicts): ``{"name": <its name>, "arguments": <an object following its parameters>}``."""
    def call(function: dict) -> dict:
        return {'type': 'object', 'properties': {'name': {'enum': [function['name']]},
                                                 'arguments': function.get('parameters') or {'type': 'object'}},
                'required': ['name', 'arguments'], 'additionalProperties': False}
    calls = [call(tool['function']) for tool in tools]
    schema = calls[0] if len(calls) == 1 else {'anyOf': calls}
    return {'type': 'json_schema', 'json_schema': {'name': 'tool_call', 'schema': schema}}


def _describe(choice) -> str:
    return repr(choice) if isinstance(choice, str) else f'function {choice.function.name!r}'
