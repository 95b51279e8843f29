"""The FastAPI application around one AsyncEngine: routes, error shapes, and the middleware stack."""
from __future__ import annotations

import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware

from .errors import install_error_handlers
from .generation import ClientDisconnected, Runner
from .metrics import Metrics
from .middleware import APIKeyMiddleware, BodyLimitMiddleware, ConcurrencyLimitMiddleware
from .routes_native import router as native_router
from .routes_openai import router as openai_router

DEFAULT_MAX_BODY_BYTES = 8 << 20


@dataclass
class ServerState:
    engine: object                 # the AsyncEngine
    metrics: Metrics
    runner: Runner
    model_name: str
    created: int = field(default_factory=lambda: int(time.time()))
    open_sessions: set[int] = field(default_factory=set)   # /generate sessions kept by interactive mode


def create_app(engine, api_keys: list[str] | None = None, allow_origins: list[str] | None = None,
               max_concurrent_requests: int | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               close_engine: bool = True) -> FastAPI:
    """An app serving ``engine``; it closes the engine when the server shuts down unless told not to."""
    metrics = Metrics(engine.engine)
    state = ServerState(engine, metrics, Runner(engine, metrics), engine.model_name)

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
    # the last added runs first: count, then authenticate, then bound the body and the concurrency
    if max_concurrent_requests:
        app.add_middleware(ConcurrencyLimitMiddleware, limit=max_concurrent_requests)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    if allow_origins:
        app.add_middleware(CORSMiddleware, allow_origins=allow_origins, allow_credentials=True,
                           allow_methods=['*'], allow_headers=['*'])
    if api_keys:
        app.add_middleware(APIKeyMiddleware, api_keys=api_keys)
    app.add_middleware(metrics.middleware)
    return app
