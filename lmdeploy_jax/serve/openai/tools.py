"""A chat request's tools: which reach the prompt, and how its answers are split into tool calls.

LMDeploy's rules, with its refusals as 400s naming the field:

- ``tools`` with ``tool_choice`` other than ``none`` need a server started with
  ``--tool-call-parser``; answers are then split into text and OpenAI ``tool_calls``, and an answer
  that stopped with calls finishes with ``tool_calls``.
- ``tool_choice``: ``auto`` (the default with tools) renders every tool; ``none`` renders them too
  but leaves the answer as text; a named function renders that function alone; ``required``
  renders every tool. Neither ``required`` nor a named function is enforced: without guided
  decoding the model may still answer in text, which comes back as ``content`` with no
  ``tool_calls`` (LMDeploy's behaviour). ``tool_choice`` without ``tools`` is refused.
- ``parallel_tool_calls: false`` keeps the first call of an answer only.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..tool_parsers import ToolCall, ToolCallFormat, ToolCallParser
from .errors import APIError
from .protocol import ChatCompletionRequest, NamedToolChoice


@dataclass(frozen=True)
class ToolPlan:
    """What a request's tools do: ``rendered`` go to the chat template (OpenAI's tool dicts, or None);
    ``fmt`` splits the answers (None: they stay text)."""
    rendered: list[dict] | None
    fmt: ToolCallFormat | None
    parallel: bool = True

    def parser(self) -> ToolCallParser | None:
        """A parser for one answer, or None when answers stay text."""
        return None if self.fmt is None else ToolCallParser(self.fmt)

    def kept(self, calls: list[ToolCall]) -> list[ToolCall]:
        """The calls an answer reports: the first alone unless parallel calls are allowed."""
        return calls if self.parallel else [c for c in calls if c.index == 0]

    def skip_special_tokens(self, requested: bool) -> bool:
        """Special tokens stay in the text when the format's tags are special tokens."""
        return requested and not (self.fmt is not None and self.fmt.keeps_special_tokens)


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
    if fmt is None:
        raise APIError(400, 'tools need a server started with --tool-call-parser (qwen, internlm or llama3) to '
                            'turn answers into tool calls', 'tools')
    return ToolPlan(rendered, fmt, body.parallel_tool_calls)


def _describe(choice) -> str:
    return repr(choice) if isinstance(choice, str) else f'function {choice.function.name!r}'
