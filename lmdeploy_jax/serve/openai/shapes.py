"""How a generation's text, tokens and logprobs become a choice: chat (message / delta) or text completion."""
from __future__ import annotations

from .logprobs import chat_logprobs, completion_logprobs
from .protocol import ChatChoice, ChatDelta, ChatStreamChoice, CompletionChoice, DeltaToolCall, ToolCall
from .tools import ToolPlan


def _finish(reason: str | None, called: bool) -> str | None:
    """An answer that stopped after tool calls finishes with 'tool_calls' (OpenAI's, LMDeploy's)."""
    return 'tool_calls' if called and reason == 'stop' else reason


class ChatShape:
    """Chat choices; with a ``ToolPlan`` that parses, each answer's tool calls are split from its
    text (whole, or incrementally per streamed choice)."""
    object, chunk_object, id_prefix = 'chat.completion', 'chat.completion.chunk', 'chatcmpl'

    def __init__(self, tokenizer, top_logprobs: int | None, tools: ToolPlan | None = None):
        self.tokenizer, self.top = tokenizer, top_logprobs
        self.tools = tools or ToolPlan(None, None)
        self._parsers: dict[int, object] = {}     # per streamed choice

    def _logprobs(self, token_ids, logprobs):
        return None if self.top is None else chat_logprobs(self.tokenizer, token_ids, logprobs, self.top)

    def choice(self, index, text, token_ids, logprobs, finish_reason, offset=0):
        parser = self.tools.parser()
        calls = []
        if parser is not None:
            text, calls = parser.parse_whole(text)
            calls = self.tools.kept(calls)
        message = ChatDelta(role='assistant', content=text if text or not calls else None,
                            tool_calls=[ToolCall(**c.openai()) for c in calls] or None)
        return ChatChoice(index=index, message=message, logprobs=self._logprobs(token_ids, logprobs),
                          finish_reason=_finish(finish_reason, bool(calls)))

    def delta(self, index, text, token_ids, logprobs, finish_reason, offset=0):
        parser = self._parsers.setdefault(index, self.tools.parser())
        fields, called = {'content': text}, False
        if parser is not None:
            text, calls = parser.feed(text, final=finish_reason is not None)
            calls, called = self.tools.kept(calls), bool(self.tools.kept(parser.calls))
            fields = {'content': text} if text or not calls else {}
            if calls:
                fields['tool_calls'] = [DeltaToolCall(**c.openai(with_index=True)) for c in calls]
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
