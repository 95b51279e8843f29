"""Stop strings matched on the generated text, whatever their token length.

The engine stops on single stop *tokens*; a stop *string* can span tokens, so it is found in the
detokenized text. While streaming, the tail that could still become a stop string is held back,
so a stop string never reaches the user, even in part; with ``include`` (LMDeploy's
``include_stop_str_in_output``) the text ends with the stop string instead.
"""
from __future__ import annotations


class StopStringMatcher:
    def __init__(self, stop_strings: list[str] | None, include: bool = False):
        self._stops = [s for s in (stop_strings or []) if s]
        self._include = include
        self._text = ''
        self._released = 0   # characters of _text already handed out

    def feed(self, delta: str) -> tuple[str, bool]:
        """Add new text; return (text safe to release now, whether a stop string was found)."""
        self._text += delta
        found = self._first_stop()
        if found is not None:
            cut = found[0] + (len(found[1]) if self._include else 0)
            out = self._text[self._released:cut]
            self._text = self._text[:cut]
            self._released = cut
            return out, True
        safe_end = len(self._text) - self._held_back()
        out = self._text[self._released:safe_end] if safe_end > self._released else ''
        self._released = max(self._released, safe_end)
        return out, False

    def flush(self) -> str:
        """The held-back tail, once generation ended without a stop string."""
        out = self._text[self._released:]
        self._released = len(self._text)
        return out

    def _first_stop(self) -> tuple[int, str] | None:
        """(where, which) of the earliest stop string in the text, the longest of those starting there."""
        start = max(0, self._released - max((len(s) for s in self._stops), default=0))
        found = [(i, -len(s), s) for s in self._stops if (i := self._text.find(s, start)) >= 0]
        if not found:
            return None
        where, _, which = min(found)
        return where, which

    def _held_back(self) -> int:
        """Length of the longest text suffix that is a proper prefix of some stop string."""
        best = 0
        for s in self._stops:
            for k in range(min(len(s) - 1, len(self._text)), best, -1):
                if self._text.endswith(s[:k]):
                    best = k
                    break
        return best
