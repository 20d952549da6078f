"""One error shape per API family, chosen by path.

/v1/... speaks OpenAI's shape, which its clients parse into typed exceptions:
    {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}
everything else (A1111's /sdapi/v1/..., the UI's /api/...) uses FastAPI's and A1111's:
    {"error": "<HTTP reason>", "detail": "<one line>"}
"""
from __future__ import annotations

from http import HTTPStatus

from fastapi.responses import JSONResponse

OPENAI_PREFIX = "/v1/"

_OPENAI_TYPES = {401: "invalid_request_error", 404: "invalid_request_error", 429: "rate_limit_error",
                 500: "server_error", 503: "server_error"}


def is_openai_path(path: str) -> bool:
    return path.startswith(OPENAI_PREFIX)


def error_response(path: str, status: int, message: str, *, code: str | None = None, param: str | None = None,
                   headers: dict[str, str] | None = None, errors: list | None = None) -> JSONResponse:
    """The error for `path` in its API's shape; `message` is one line for the caller."""
    if is_openai_path(path):
        body = {"error": {"message": message, "type": _OPENAI_TYPES.get(status, "invalid_request_error"),
                          "param": param, "code": code}}
    else:
        body = {"error": HTTPStatus(status).phrase, "detail": message}
        if code:
            body["code"] = code
        if errors is not None:
            body["errors"] = errors
    return JSONResponse(body, status_code=status, headers=headers)


def responder(path: str, status: int, message: str) -> JSONResponse:
    """The plain form that the ASGI middlewares call."""
    return error_response(path, status, message)
