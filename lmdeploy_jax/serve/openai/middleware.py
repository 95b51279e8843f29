"""ASGI middleware in front of every route: API keys, the body read whole (bounded in size and time),
a concurrency limit, and OpenAI-shaped 500s for unexpected failures.

Plain ASGI (not ``BaseHTTPMiddleware``) so streamed responses and client disconnects pass through
untouched: a disconnect must still reach the route that aborts the request.
"""
from __future__ import annotations

import asyncio
import json
import logging

from .errors import error_body

logger = logging.getLogger('lmdeploy_jax')
OPEN_PATHS = frozenset({'/health'})
OWNER_KEY = 'api_key_index'     # the request state's entry for the index of its API key
_CLOSE = (b'connection', b'close')


def usable_api_keys(api_keys: list[str] | None) -> list[str] | None:
    """The keys without surrounding blanks, empty ones dropped; None when none were asked for.

    Raises ValueError when keys were given but all are empty (an unset ``$KEY``): serving without
    keys then would open a server its owner meant to close."""
    if api_keys is None:
        return None
    keys = [key.strip() for key in api_keys if key.strip()]
    if not keys:
        raise ValueError(f'--api-keys: every key given is empty ({api_keys!r}); give at least one non-empty key')
    return keys


async def _send_error(send, status: int, message: str, headers: list | None = None) -> None:
    body = json.dumps(error_body(status, message)).encode()
    await send({'type': 'http.response.start', 'status': status,
                'headers': [(b'content-type', b'application/json'), (b'content-length', str(len(body)).encode()),
                            *(headers or [])]})
    await send({'type': 'http.response.body', 'body': body})


def request_owner(request) -> int:
    """Whose request it is: the index of its API key, 0 without keys (the owner of its /generate sessions)."""
    return request.scope.get('state', {}).get(OWNER_KEY, 0)


class APIKeyMiddleware:
    """``Authorization: Bearer KEY`` on every route but /health, when keys are configured; the
    request's ``state`` gets the index of its key (``request_owner``)."""

    def __init__(self, app, api_keys: list[str]):
        self.app, self.keys = app, {key: index for index, key in enumerate(dict.fromkeys(api_keys))}

    async def __call__(self, scope, receive, send):
        if scope['type'] == 'http' and scope['path'] not in OPEN_PATHS:
            auth = dict(scope['headers']).get(b'authorization', b'').decode('latin-1')
            scheme, _, key = auth.partition(' ')
            owner = self.keys.get(key.strip()) if scheme.lower() == 'bearer' else None
            if owner is None:
                await _send_error(send, 401, 'invalid or missing API key: send "Authorization: Bearer <key>"',
                                  [(b'www-authenticate', b'Bearer')])
                return
            scope.setdefault('state', {})[OWNER_KEY] = owner
        await self.app(scope, receive, send)


class BufferedBodyMiddleware:
    """Read the whole body before the app sees the request: at most ``max_bytes`` (413) within
    ``timeout_s`` of the request's start (408). A client that stalls mid-body is dropped here,
    before it can hold a concurrency slot.

    An oversized body of at most ``DRAIN_FACTOR * max_bytes`` is read to its end and dropped before
    the 413, which then keeps the connection: a server that answers and closes while the client is
    still sending resets the connection, and the client may never read the answer. A larger body,
    and a 408, close the connection at once (its unread rest could not be told from the next
    request). The app receives the body in one message, then the connection's own messages (a
    disconnect)."""

    DRAIN_FACTOR = 4

    def __init__(self, app, max_bytes: int, timeout_s: float):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope, receive, send):
        if scope['type'] != 'http':
            return await self.app(scope, receive, send)
        length = dict(scope['headers']).get(b'content-length')
        too_big = f'the request body is over the limit of {self.max_bytes} bytes'
        drain_limit = self.DRAIN_FACTOR * self.max_bytes
        if length is not None and length.isdigit() and int(length) > drain_limit:
            return await _send_error(send, 413, too_big, [_CLOSE])
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.timeout_s):
                while True:
                    message = await receive()
                    if message['type'] == 'http.disconnect':
                        return
                    chunk = message.get('body', b'')
                    size += len(chunk)
                    if size > drain_limit:
                        return await _send_error(send, 413, too_big, [_CLOSE])
                    if size <= self.max_bytes:
                        chunks.append(chunk)
                    if not message.get('more_body', False):
                        break
        except TimeoutError:
            return await _send_error(send, 408, f'the request body did not arrive within {self.timeout_s:g} s',
                                     [_CLOSE])
        if size > self.max_bytes:
            return await _send_error(send, 413, too_big)
        body = {'type': 'http.request', 'body': b''.join(chunks), 'more_body': False}

        async def replay():
            nonlocal body
            if body is None:
                return await receive()
            message, body = body, None
            return message

        await self.app(scope, replay, send)


class ConcurrencyLimitMiddleware:
    """At most ``limit`` requests are served at once (LMDeploy's --max-concurrent-requests); the rest wait."""

    def __init__(self, app, limit: int):
        self.app, self.semaphore = app, asyncio.Semaphore(limit)

    async def __call__(self, scope, receive, send):
        if scope['type'] != 'http' or scope['path'] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        async with self.semaphore:
            await self.app(scope, receive, send)


class UnexpectedErrorMiddleware:
    """An unexpected exception before the answer has started becomes an OpenAI-shaped 500, and the
    connection stays open for the client's next request (an exception reaching uvicorn closes it).
    Streams report their own failures as events (their answer has started)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope['type'] != 'http':
            return await self.app(scope, receive, send)
        started = False

        async def send_watched(message):
            nonlocal started
            started = started or message['type'] == 'http.response.start'
            await send(message)
        try:
            await self.app(scope, receive, send_watched)
        except Exception as exc:  # noqa: BLE001
            if started:
                raise
            logger.exception('%s %s failed', scope.get('method'), scope['path'])
            await _send_error(send, 500, f'the server failed on this request: {type(exc).__name__}: {exc}')
