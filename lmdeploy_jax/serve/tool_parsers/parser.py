"""Splitting a model's answer into text and OpenAI tool calls, incrementally.

``ToolCallParser.feed`` takes the answer's text deltas as they are generated and returns what
can be told already: text that cannot be (the start of) a tool call, and every call whose
payload is complete. Text that may be the start of an open tag is held back until it is told
apart; a payload is held until its close tag (or the answer's end), then parsed. A payload that
is not a valid call comes back as text, tags included, so nothing the model wrote is lost.
Whitespace between text and a call is dropped (a call's answer often puts newlines around its
tags), so the content of an answer that is only calls is empty. Feeding a whole answer at once
gives the same text and calls as feeding it in any pieces: whole and streamed answers agree.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from .formats import ToolCallFormat

_DECODER = json.JSONDecoder()


@dataclass(frozen=True)
class ToolCall:
    """One call, numbered ``index`` in its answer; ``arguments`` is a JSON object's text (OpenAI's)."""
    index: int
    id: str
    name: str
    arguments: str

    def openai(self, with_index: bool = False) -> dict:
        call = {'id': self.id, 'type': 'function', 'function': {'name': self.name, 'arguments': self.arguments}}
        return {'index': self.index, **call} if with_index else call


def parse_payload(payload: str) -> list[tuple[str, str]] | None:
    """The (name, arguments JSON) of each call in ``payload``: JSON objects with a string ``name``
    and an object ``arguments`` (or ``parameters``, Llama's word), separated by whitespace or
    ``;``. None when the payload is anything else."""
    calls, pos, text = [], 0, payload.strip()
    while pos < len(text):
        try:
            obj, end = _DECODER.raw_decode(text, pos)
        except json.JSONDecodeError:
            return None
        arguments = obj.get('arguments', obj.get('parameters', {})) if isinstance(obj, dict) else None
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                return None
        if not isinstance(obj.get('name') if isinstance(obj, dict) else None, str) or not isinstance(arguments, dict):
            return None
        calls.append((obj['name'], json.dumps(arguments, ensure_ascii=False)))
        pos = end
        while pos < len(text) and (text[pos].isspace() or text[pos] == ';'):
            pos += 1
    return calls or None


def _partial_tag_length(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that begins ``tag`` (it may be completed by what follows)."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ToolCallParser:
    """The incremental split of one answer (see the module docstring)."""

    def __init__(self, fmt: ToolCallFormat):
        self.fmt = fmt
        self.calls: list[ToolCall] = []
        self._pending = ''             # text not told apart yet, or the payload so far
        self._opening: str | None = None   # the open tag of the payload being read; None: reading text
        self._before = ''              # held whitespace before that tag: dropped if the payload is a call
        self._after_call = False       # whitespace after a call is dropped
        self._wrote_text = False       # text other than whitespace was returned already

    def feed(self, delta: str, final: bool = False) -> tuple[str, list[ToolCall]]:
        """The text and the complete calls that ``delta`` (the next piece of the answer) makes
        known; ``final`` at the answer's end, which flushes everything held."""
        self._pending += delta
        text, calls = '', []
        while True:
            if self._opening is None:
                if self._after_call:
                    self._pending = self._pending.lstrip()
                    self._after_call = not self._pending
                start = self._find_opening()
                if start is None:
                    return text + self._release_text(final), calls
                index, opening = start
                before = self._pending[:index]
                text += before.rstrip()
                self._wrote_text |= bool(before.strip())
                self._before = before[len(before.rstrip()):]
                self._opening, self._pending = opening, self._pending[index + len(opening):]
                continue
            close = self.fmt.close_tag
            end = self._pending.find(close) if close else -1
            if end < 0 and not final:
                return text, calls
            payload = self._pending if end < 0 else self._pending[:end]
            self._pending = '' if end < 0 else self._pending[end + len(close):]
            parsed = parse_payload(payload)
            if parsed is None:     # not a call: the model's text, as written
                text += self._before + self._opening + payload + ('' if end < 0 else close)
                self._wrote_text = True
            else:
                calls += [self._call(name, arguments) for name, arguments in parsed]
                self._after_call = True
            self._opening, self._before = None, ''

    def _call(self, name: str, arguments: str) -> ToolCall:
        call = ToolCall(len(self.calls), f'call_{uuid.uuid4().hex[:24]}', name, arguments)
        self.calls.append(call)
        return call

    def _find_opening(self) -> tuple[int, str] | None:
        index = self._pending.find(self.fmt.open_tag)
        if index >= 0:
            return index, self.fmt.open_tag
        if self._may_open_with_json():
            stripped = self._pending.lstrip()
            if stripped.startswith('{'):
                return len(self._pending) - len(stripped), ''
        return None

    def _may_open_with_json(self) -> bool:
        return self.fmt.json_answer_is_call and not self._wrote_text and not self.calls

    def _release_text(self, final: bool) -> str:
        """The text that can no longer begin a call. Held back: a partial open tag, trailing
        whitespace (dropped if a call follows, or at the end after a call), and for a format
        whose answer may be bare JSON, leading whitespace."""
        pending = self._pending
        if final:
            out = pending.rstrip() if self.calls else pending
            self._pending = ''
        else:
            out = pending[:len(pending) - _partial_tag_length(pending, self.fmt.open_tag)].rstrip()
            if self._may_open_with_json() and not pending.strip():
                out = ''
            self._pending = pending[len(out):]
        self._wrote_text |= bool(out.strip())
        return out

    def parse_whole(self, text: str) -> tuple[str, list[ToolCall]]:
        """A whole answer's text and calls (``feed(text, final=True)`` of a fresh parser)."""
        return self.feed(text, final=True)
