"""Start the server: build the pipeline, then serve its app with uvicorn (LMDeploy's ``serve``)."""
from __future__ import annotations

import asyncio

import uvicorn

from ..reasoning_parsers import reasoning_format
from ..tool_parsers import tool_call_format
from .app import create_app
from .limits import ABORTED_REQUESTS_END_S, BODY_TIMEOUT_S, SHUTDOWN_TIMEOUT_S
from .middleware import usable_api_keys

_UVICORN_LEVELS = {'warn': 'warning', 'fatal': 'critical', 'notset': 'trace'}


def serve(model_path: str | None = None, server_name: str = '0.0.0.0', server_port: int = 23333,
          api_keys: list[str] | str | None = None, allow_origins: list[str] | None = None,
          max_concurrent_requests: int | None = None, body_timeout: float = BODY_TIMEOUT_S,
          shutdown_timeout: float = SHUTDOWN_TIMEOUT_S, log_level: str = 'ERROR', tool_call_parser: str | None = None,
          reasoning_parser: str | None = None, **pipeline_kwargs) -> None:
    """Serve ``model_path`` until interrupted. ``pipeline_kwargs`` go to ``pipeline()`` (backend, configs).

    On SIGTERM/SIGINT new connections are refused; running generations get ``shutdown_timeout``
    seconds (vLLM's ``--shutdown-timeout``; 0: none) to finish, then are aborted: their requests
    end as usual with finish_reason 'abort' (a stream with [DONE]) and their KV is freed. Requests
    still running ``ABORTED_REQUESTS_END_S`` later are cancelled, and the engine is closed.
    ``body_timeout``: seconds a request's body may take to arrive (408 after). Raises ValueError,
    before loading anything, when ``api_keys`` were given but all are empty, or when
    ``tool_call_parser`` names no known format (``--tool-call-parser``: how answers become tool calls)
    or ``reasoning_parser`` none (``--reasoning-parser``: how answers mark their reasoning).
    """
    from ...api import pipeline
    if isinstance(api_keys, str):
        api_keys = api_keys.split(',')
    api_keys = usable_api_keys(api_keys)
    if shutdown_timeout < 0 or body_timeout <= 0:
        raise ValueError(f'shutdown_timeout must be >= 0 and body_timeout > 0, got {shutdown_timeout} and '
                         f'{body_timeout}')
    if tool_call_parser is not None:
        tool_call_format(tool_call_parser)
    if reasoning_parser is not None:
        reasoning_format(reasoning_parser)
    engine = pipeline(model_path, log_level=log_level, **pipeline_kwargs)
    app = create_app(engine, api_keys=api_keys, allow_origins=allow_origins,
                     max_concurrent_requests=max_concurrent_requests, body_timeout_s=body_timeout,
                     tool_call_parser=tool_call_parser, reasoning_parser=reasoning_parser)
    name = app.state.server.model_name
    print(f'HINT: serving {name!r}; the API is documented at http://{server_name}:{server_port}/docs', flush=True)
    level = log_level.lower()
    config = uvicorn.Config(app, host=server_name, port=server_port, timeout_keep_alive=5,
                            timeout_graceful_shutdown=shutdown_timeout + ABORTED_REQUESTS_END_S,
                            log_level=_UVICORN_LEVELS.get(level, level))
    _AbortingServer(config, app.state.server.runner.abort_all, shutdown_timeout).run()


class _AbortingServer(uvicorn.Server):
    """A uvicorn server whose shutdown calls ``abort`` ``abort_after_s`` seconds in (uvicorn itself
    only cancels the requests' tasks, at ``timeout_graceful_shutdown``, which cuts streams short)."""

    def __init__(self, config: uvicorn.Config, abort, abort_after_s: float):
        super().__init__(config)
        self.abort, self.abort_after_s = abort, abort_after_s

    async def shutdown(self, sockets=None) -> None:
        timer = asyncio.get_running_loop().call_later(self.abort_after_s, self.abort)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()
