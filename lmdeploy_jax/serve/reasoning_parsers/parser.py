"""Splitting a model's answer into reasoning and content, incrementally.

``ReasoningParser.feed`` takes the answer's text deltas as they are generated and returns the
reasoning and the content they make known. Text that may still be (the start of) a tag is held
back until it is told apart: at the answer's start, whitespace and a partial open tag; inside
the reasoning, a partial close tag. Tags never reach either part. Feeding a whole answer at once
gives the same split as feeding it in any pieces, so whole and streamed answers agree.
"""
from __future__ import annotations

from ..tool_parsers.parser import _partial_tag_length
from .formats import ReasoningFormat

_START, _REASONING, _CONTENT = 'start', 'reasoning', 'content'


class ReasoningParser:
    """The split of one answer in ``fmt``; ``prompt_opened``: the prompt ended with the open tag,
    so the answer starts inside the reasoning whatever the format."""

    def __init__(self, fmt: ReasoningFormat, prompt_opened: bool = False):
        self.fmt = fmt
        self._in_reasoning_first = fmt.starts_in_reasoning or prompt_opened
        self._mode = _START
        self._pending = ''

    def feed(self, delta: str, final: bool = False) -> tuple[str, str]:
        """``(reasoning, content)`` that ``delta`` (the next piece of the answer) makes known;
        ``final`` at the answer's end, which releases everything held."""
        self._pending += delta
        reasoning = content = ''
        if self._mode == _START:
            self._leave_start(final)
        if self._mode == _REASONING:
            close = self._pending.find(self.fmt.close_tag)
            if close >= 0:
                reasoning = self._pending[:close]
                self._pending = self._pending[close + len(self.fmt.close_tag):]
                self._mode = _CONTENT
            else:
                cut = len(self._pending) - (0 if final else _partial_tag_length(self._pending, self.fmt.close_tag))
                reasoning, self._pending = self._pending[:cut], self._pending[cut:]
        if self._mode == _CONTENT:
            content, self._pending = self._pending, ''
        return reasoning, content

    def _leave_start(self, final: bool) -> None:
        """Decide, once the answer's start is known, whether it opens with the tag."""
        head = self._pending.lstrip()
        if head.startswith(self.fmt.open_tag):
            self._pending, self._mode = head[len(self.fmt.open_tag):], _REASONING
        elif final or not self.fmt.open_tag.startswith(head):
            self._mode = _REASONING if self._in_reasoning_first else _CONTENT

    def parse_whole(self, text: str) -> tuple[str, str]:
        """A whole answer's ``(reasoning, content)`` (``feed(text, final=True)`` of a fresh parser)."""
        return self.feed(text, final=True)
