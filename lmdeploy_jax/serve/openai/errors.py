"""OpenAI-shaped errors: every refusal answers ``{"error": {"message", "type", "param", "code"}}``.

OpenAI clients read that body to raise typed exceptions, so FastAPI's own validation and HTTP
errors are reshaped too. A refused request never affects any other.
"""
from __future__ import annotations

from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

_TYPES = {400: 'invalid_request_error', 401: 'authentication_error', 404: 'not_found_error',
          413: 'invalid_request_error', 503: 'service_unavailable'}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {'error': {'message': message, 'type': _TYPES.get(status, 'server_error' if status >= 500
                                                              else 'invalid_request_error'),
                      'param': param, 'code': code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status)


_UNION_TAGS = frozenset({'str', 'int', 'float', 'bool', 'none', 'list', 'dict'})


def _is_field(part) -> bool:
    """Whether a pydantic error location part names a field or an index, not a union member
    (pydantic tags those by type: 'str', 'list[ContentPart]', 'function-after[...]', 'ContentPart')."""
    return isinstance(part, int) or (part.isidentifier() and part not in _UNION_TAGS and not part[:1].isupper())


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None, str | None]:
    """The most specific problem (the deepest location: a union's members each report one), as
    'messages.0.role: Input should be ...', its parameter and its kind."""
    errors = exc.errors()
    first = max(errors, key=lambda e: len(e.get('loc', ())))
    loc = [str(p) for p in first.get('loc', ()) if p != 'body' and _is_field(p)]
    param = '.'.join(loc) or None
    if first.get('type') == 'json_invalid':
        reason = first.get('ctx', {}).get('error', first.get('msg'))
        return f'the body is not valid JSON: {reason}', None, 'json_invalid'
    return (f'{param}: {first.get("msg")}' if param else first.get('msg', 'invalid request')), param, first.get('type')


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return error_response(400, *_validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        return error_response(exc.status_code, message)

    @app.exception_handler(ValueError)
    async def _value_error(request: Request, exc: ValueError):  # GenerationConfig names the bad field
        return error_response(400, str(exc))
