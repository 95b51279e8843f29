"""Text that enters the library must be encodable as UTF-8.

A Python ``str`` may hold lone surrogates (``'\\ud800'``, which JSON can carry as an escape) that
no UTF-8 encoder accepts: the tokenizer would fail on them deep inside a request with a
``TypeError``. ``require_utf8`` refuses them where they enter, naming the field.
"""
from __future__ import annotations


def require_utf8(value, field: str) -> None:
    """Raise ``ValueError`` naming ``field`` (and the path inside it, e.g. ``messages[0].content[1].text``)
    if a string in ``value`` cannot be encoded as UTF-8.

    ``value`` is a str, or lists, tuples and dicts of them nested as message lists are (a dict's keys
    and values are both checked); other values (numbers, None) are not text and pass.
    """
    if isinstance(value, str):
        try:
            value.encode('utf-8')
        except UnicodeEncodeError as exc:
            raise ValueError(f'{field} is not valid UTF-8 text: {exc.reason} at character {exc.start} '
                             f'({value[exc.start:exc.end]!a})') from None
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            require_utf8(item, f'{field}[{i}]')
    elif isinstance(value, dict):
        for key, item in value.items():
            require_utf8(key, f'{field} key {key!a}')
            require_utf8(item, f'{field}.{key}' if isinstance(key, str) else f'{field}[{key!r}]')
