"""Start the server: build the pipeline, then serve its app with uvicorn (LMDeploy's ``serve``)."""
from __future__ import annotations

_UVICORN_LEVELS = {'warn': 'warning', 'fatal': 'critical', 'notset': 'trace'}


def serve(model_path: str | None = None, server_name: str = '0.0.0.0', server_port: int = 23333,
          api_keys: list[str] | str | None = None, allow_origins: list[str] | None = None,
          max_concurrent_requests: int | None = None, log_level: str = 'ERROR', **pipeline_kwargs) -> None:
    """Serve ``model_path`` until interrupted. ``pipeline_kwargs`` go to ``pipeline()`` (backend, configs)."""
    import uvicorn

    from ...api import pipeline
    from .app import create_app
    if isinstance(api_keys, str):
        api_keys = api_keys.split(',')
    engine = pipeline(model_path, log_level=log_level, **pipeline_kwargs)
    app = create_app(engine, api_keys=api_keys, allow_origins=allow_origins,
                     max_concurrent_requests=max_concurrent_requests)
    print(f'HINT: serving {engine.model_name!r}; the API is documented at http://{server_name}:{server_port}/docs',
          flush=True)
    level = log_level.lower()
    uvicorn.run(app, host=server_name, port=server_port, timeout_keep_alive=5,
                log_level=_UVICORN_LEVELS.get(level, level))
