"""ASGI middleware in front of every route: API keys, a body size limit, a concurrency limit.

Plain ASGI (not ``BaseHTTPMiddleware``) so streamed responses and client disconnects pass through
untouched: a disconnect must still reach the route that aborts the request.
"""
from __future__ import annotations

import asyncio
import json

from fastapi import HTTPException

from .errors import error_body

OPEN_PATHS = frozenset({'/health'})


async def _send_error(send, status: int, message: str, headers: list | None = None) -> None:
    body = json.dumps(error_body(status, message)).encode()
    await send({'type': 'http.response.start', 'status': status,
                'headers': [(b'content-type', b'application/json'), (b'content-length', str(len(body)).encode()),
                            *(headers or [])]})
    await send({'type': 'http.response.body', 'body': body})


class APIKeyMiddleware:
    """``Authorization: Bearer KEY`` on every route but /health, when keys are configured."""

    def __init__(self, app, api_keys: list[str]):
        self.app, self.keys = app, frozenset(api_keys)

    async def __call__(self, scope, receive, send):
        if scope['type'] == 'http' and scope['path'] not in OPEN_PATHS:
            auth = dict(scope['headers']).get(b'authorization', b'').decode('latin-1')
            scheme, _, key = auth.partition(' ')
            if scheme.lower() != 'bearer' or key.strip() not in self.keys:
                await _send_error(send, 401, 'invalid or missing API key: send "Authorization: Bearer <key>"',
                                  [(b'www-authenticate', b'Bearer')])
                return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Refuse a body over ``max_bytes`` with 413, by its Content-Length or, when chunked, as it arrives."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope['type'] != 'http':
            return await self.app(scope, receive, send)
        length = dict(scope['headers']).get(b'content-length')
        too_big = f'the request body is over the limit of {self.max_bytes} bytes'
        if length is not None and int(length) > self.max_bytes:
            return await _send_error(send, 413, too_big)
        seen = 0

        async def counting_receive():
            nonlocal seen
            message = await receive()
            if message['type'] == 'http.request':
                seen += len(message.get('body', b''))
                if seen > self.max_bytes:  # the app's error handlers answer it
                    raise HTTPException(413, too_big)
            return message

        await self.app(scope, counting_receive, send)


class ConcurrencyLimitMiddleware:
    """At most ``limit`` requests are served at once (LMDeploy's --max-concurrent-requests); the rest wait."""

    def __init__(self, app, limit: int):
        self.app, self.semaphore = app, asyncio.Semaphore(limit)

    async def __call__(self, scope, receive, send):
        if scope['type'] != 'http' or scope['path'] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        async with self.semaphore:
            await self.app(scope, receive, send)
