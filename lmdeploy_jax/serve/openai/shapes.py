"""How a generation's text, tokens and logprobs become a choice: chat (message / delta) or text completion."""
from __future__ import annotations

from ..reasoning_parsers import ReasoningParser
from .logprobs import chat_logprobs, completion_logprobs
from .protocol import ChatChoice, ChatDelta, ChatStreamChoice, CompletionChoice, DeltaToolCall, ToolCall
from .tools import ToolPlan


def _finish(reason: str | None, called: bool) -> str | None:
    """An answer that stopped after tool calls finishes with 'tool_calls' (OpenAI's, LMDeploy's)."""
    return 'tool_calls' if called and reason == 'stop' else reason


class ChatShape:
    """Chat choices; with a ``ToolPlan`` that parses, each answer's tool calls are split from its
    text (whole, or incrementally per streamed choice). With ``reasoning`` (a fresh
    ``ReasoningParser`` per call), each answer's reasoning is split off first, as
    ``reasoning_content``; tool calls are looked for in the content that follows it."""
    object, chunk_object, id_prefix = 'chat.completion', 'chat.completion.chunk', 'chatcmpl'

    def __init__(self, tokenizer, top_logprobs: int | None, tools: ToolPlan | None = None, reasoning=None):
        self.tokenizer, self.top = tokenizer, top_logprobs
        self.tools = tools or ToolPlan(None, None)
        self.reasoning = reasoning
        self._parsers: dict[int, object] = {}     # per streamed choice
        self._reasoners: dict[int, ReasoningParser | None] = {}

    def _logprobs(self, token_ids, logprobs):
        return None if self.top is None else chat_logprobs(self.tokenizer, token_ids, logprobs, self.top)

    def choice(self, index, text, token_ids, logprobs, finish_reason, offset=0):
        parser = self.tools.parser()
        calls, reasoning = [], ''
        if self.reasoning is not None:
            reasoning, text = self.reasoning().parse_whole(text)
        if parser is not None:
            text, calls = parser.parse_whole(text)
            calls = self.tools.kept(calls)
        message = ChatDelta(role='assistant', content=text if text or not (calls or reasoning) else None,
                            reasoning_content=reasoning or None,
                            tool_calls=[ToolCall(**c.openai()) for c in calls] or None)
        return ChatChoice(index=index, message=message, logprobs=self._logprobs(token_ids, logprobs),
                          finish_reason=_finish(finish_reason, bool(calls)))

    def delta(self, index, text, token_ids, logprobs, finish_reason, offset=0):
        parser = self._parsers.setdefault(index, self.tools.parser())
        reasoner = self._reasoners.setdefault(index, self.reasoning and self.reasoning())
        final, fields, called, reasoning, calls = finish_reason is not None, {}, False, '', []
        if reasoner is not None:
            reasoning, text = reasoner.feed(text, final)
            if reasoning:
                fields['reasoning_content'] = reasoning
        if parser is not None:
            text, calls = parser.feed(text, final)
            calls, called = self.tools.kept(calls), bool(self.tools.kept(parser.calls))
            if calls:
                fields['tool_calls'] = [DeltaToolCall(**c.openai(with_index=True)) for c in calls]
        if text or not (calls or reasoning):
            fields['content'] = text
        return ChatStreamChoice(index=index, delta=ChatDelta(**fields), logprobs=self._logprobs(token_ids, logprobs),
                                finish_reason=_finish(finish_reason, called))

    def opening(self, index):
        """The first chunk of each streamed choice names the role, as OpenAI's do."""
        return ChatStreamChoice(index=index, delta=ChatDelta(role='assistant', content=''), finish_reason=None)


class CompletionShape:
    object, chunk_object, id_prefix = 'text_completion', 'text_completion', 'cmpl'

    def __init__(self, tokenizer, logprobs: int | None):
        self.tokenizer, self.top = tokenizer, logprobs

    def choice(self, index, text, token_ids, logprobs, finish_reason, offset=0):
        lp = None if self.top is None else completion_logprobs(self.tokenizer, token_ids, logprobs, self.top, offset)
        return CompletionChoice(index=index, text=text, logprobs=lp, finish_reason=finish_reason)

    delta = choice

    def opening(self, index):
        return None
