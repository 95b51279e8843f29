"""Streamed responses whose generator is always closed, so a vanished client's request is aborted."""
from __future__ import annotations

import json

from starlette.responses import StreamingResponse


def sse(data) -> str:
    """One server-sent event: ``data: <json or text>`` and a blank line."""
    return f'data: {data if isinstance(data, str) else json.dumps(data)}\n\n'


class ClosingStreamingResponse(StreamingResponse):
    """Server-sent events by default; ``media_type`` for others (``/generate`` streams JSON lines)."""
    media_type = 'text/event-stream'

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:  # a disconnect may leave the generator suspended: close it, which cancels its engine requests
            await self.body_iterator.aclose()
