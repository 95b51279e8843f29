"""Chat messages as the chat templates take them: a str prompt or OpenAI-style messages normalized
to ``[{'role', 'content': str}]`` (content parts joined, tool calls and tool results kept)."""
from __future__ import annotations

from .tool_messages import tool_calls_with_objects

ROLES = ('system', 'user', 'assistant')


def _text(content) -> str:
    """Message content as text: a string, None (an assistant turn holding tool calls only), or
    OpenAI content parts whose text parts are joined."""
    if content is None:
        return ''
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        return ''.join(p.get('text', '') for p in content if p.get('type', 'text') == 'text')
    raise ValueError(f'message content must be a string or a list of content parts, got {type(content).__name__}')


def normalize_messages(messages, roles=ROLES) -> list[dict]:
    """Messages as ``[{'role', 'content': str}]``; a string is one user turn. An assistant message
    keeps its ``tool_calls`` (``tool_calls_with_objects``), a tool message its ``tool_call_id`` and ``name``.
    Bad input -> ValueError."""
    if isinstance(messages, str):
        return [{'role': 'user', 'content': messages}]
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f'messages must be a string or a non-empty list of messages, got {messages!r}')
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or 'role' not in m:
            raise ValueError(f'message {i} must be a dict with "role" and "content", got {m!r}')
        if m['role'] not in roles:
            raise ValueError(f'message {i} has role {m["role"]!r}; allowed roles: {", ".join(roles)}')
        message = {'role': m['role'], 'content': _text(m.get('content'))}
        if m['role'] == 'assistant' and m.get('tool_calls'):
            message['tool_calls'] = tool_calls_with_objects(m['tool_calls'], i)
        if m['role'] == 'tool':
            message.update({k: m[k] for k in ('tool_call_id', 'name') if m.get(k) is not None})
        out.append(message)
    return out
