"""The FastAPI application around one AsyncEngine: routes, error shapes, and the middleware stack."""
from __future__ import annotations

import os
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware

from ..reasoning_parsers import ReasoningFormat, reasoning_format
from ..tool_parsers import ToolCallFormat, tool_call_format
from .errors import install_error_handlers
from .generation import ClientDisconnected, Runner
from .limits import BODY_TIMEOUT_S, MAX_BODY_BYTES
from .metrics import Metrics
from .middleware import (APIKeyMiddleware, BufferedBodyMiddleware, ConcurrencyLimitMiddleware,
                         UnexpectedErrorMiddleware, usable_api_keys)
from .routes_native import router as native_router
from .routes_openai import router as openai_router


@dataclass
class ServerState:
    engine: object                 # the AsyncEngine
    metrics: Metrics
    runner: Runner
    model_name: str
    created: int = field(default_factory=lambda: int(time.time()))
    open_sessions: set[int] = field(default_factory=set)   # engine ids of /generate sessions kept by interactive mode
    tool_call_format: ToolCallFormat | None = None         # --tool-call-parser's; None: tools are refused
    reasoning_format: ReasoningFormat | None = None        # --reasoning-parser's; None: answers are all content


def served_model_name(engine) -> str:
    """The model id clients see: the name given (``--model-name``) or hub id as it is; for a model
    on this machine its directory's or GGUF file's name, never its path."""
    name, given = engine.model_name, engine.source.given
    path = os.path.expanduser(given)
    if name != given or not os.path.exists(path):
        return name
    return os.path.basename(os.path.normpath(path)).removesuffix('.gguf')


def create_app(engine, api_keys: list[str] | None = None, allow_origins: list[str] | None = None,
               max_concurrent_requests: int | None = None, max_body_bytes: int = MAX_BODY_BYTES,
               body_timeout_s: float = BODY_TIMEOUT_S, close_engine: bool = True,
               tool_call_parser: str | None = None, reasoning_parser: str | None = None) -> FastAPI:
    """An app serving ``engine``; it closes the engine when the server shuts down unless told not to.

    ``tool_call_parser`` names how the model writes tool calls (``tool_parsers.formats``; an
    unknown name is a ValueError); without it, requests with tools are refused. ``reasoning_parser``
    names how the model marks its reasoning (``reasoning_parsers.formats``; an unknown name is a
    ValueError); with it, chat answers carry their reasoning apart, as ``reasoning_content``.

    Empty ``api_keys`` are dropped (ValueError when none remain); ``max_body_bytes`` and
    ``body_timeout_s`` bound each request's body (413, 408), which is read in full before the
    request takes one of the ``max_concurrent_requests`` slots."""
    api_keys = usable_api_keys(api_keys)
    metrics = Metrics(engine.engine)
    fmt = None if tool_call_parser is None else tool_call_format(tool_call_parser)
    thinking = None if reasoning_parser is None else reasoning_format(reasoning_parser)
    state = ServerState(engine, metrics, Runner(engine, metrics), served_model_name(engine), tool_call_format=fmt,
                        reasoning_format=thinking)

    @asynccontextmanager
    async def lifespan(app):
        yield
        if close_engine:
            engine.close()

    app = FastAPI(title='lmdeploy_jax OpenAI-compatible server', lifespan=lifespan)
    app.state.server = state
    install_error_handlers(app)

    @app.exception_handler(ClientDisconnected)
    async def _gone(request: Request, exc: ClientDisconnected):
        return Response(status_code=499)   # nginx's "client closed request"; no one reads it

    app.include_router(openai_router)
    app.include_router(native_router)
    # the last added runs first: count; answer CORS preflights (they carry no key) and mark every
    # answer for the browser; authenticate; read the body; take a concurrency slot; shape failures
    app.add_middleware(UnexpectedErrorMiddleware)
    if max_concurrent_requests:
        app.add_middleware(ConcurrencyLimitMiddleware, limit=max_concurrent_requests)
    app.add_middleware(BufferedBodyMiddleware, max_bytes=max_body_bytes, timeout_s=body_timeout_s)
    if api_keys:
        app.add_middleware(APIKeyMiddleware, api_keys=api_keys)
    if allow_origins:
        app.add_middleware(CORSMiddleware, allow_origins=allow_origins, allow_credentials=True,
                           allow_methods=['*'], allow_headers=['*'])
    app.add_middleware(metrics.middleware)
    return app
