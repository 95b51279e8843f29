"""How a generation's text, tokens and logprobs become a choice: chat (message / delta) or text completion."""
from __future__ import annotations

from .logprobs import chat_logprobs, completion_logprobs
from .protocol import ChatChoice, ChatDelta, ChatStreamChoice, CompletionChoice


class ChatShape:
    object, chunk_object, id_prefix = 'chat.completion', 'chat.completion.chunk', 'chatcmpl'

    def __init__(self, tokenizer, top_logprobs: int | None):
        self.tokenizer, self.top = tokenizer, top_logprobs

    def _logprobs(self, token_ids, logprobs):
        return None if self.top is None else chat_logprobs(self.tokenizer, token_ids, logprobs, self.top)

    def choice(self, index, text, token_ids, logprobs, finish_reason, offset=0):
        return ChatChoice(index=index, message=ChatDelta(role='assistant', content=text),
                          logprobs=self._logprobs(token_ids, logprobs), finish_reason=finish_reason)

    def delta(self, index, text, token_ids, logprobs, finish_reason, offset=0):
        return ChatStreamChoice(index=index, delta=ChatDelta(content=text),
                                logprobs=self._logprobs(token_ids, logprobs), finish_reason=finish_reason)

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
