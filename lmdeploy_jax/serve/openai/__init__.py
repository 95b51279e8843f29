"""LMDeploy's OpenAI-compatible server on FastAPI: ``create_app(engine)`` and ``serve(model_path, ...)``."""
from .app import create_app
from .launch import serve

__all__ = ['create_app', 'serve']
