"""LMDeploy's OpenAI-compatible server on FastAPI: ``create_app(engine)`` and ``serve(model_path, ...)``.

Imported lazily, so the command line can read the server's ``limits`` without loading FastAPI.
"""
__all__ = ['create_app', 'serve']


def __getattr__(name: str):
    if name == 'create_app':
        from .app import create_app
        return create_app
    if name == 'serve':
        from .launch import serve
        return serve
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
