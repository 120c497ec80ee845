"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with the matching status.

Every failure a client can cause or see goes through here, so clients written for OpenAI parse them.
Under `/v1/messages` (Anthropic's Messages API) the same errors take Anthropic's shape,
`{"type": "error", "error": {"type", "message"}}` (`anthropic_body`), so Anthropic's clients parse them.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "server_error",
    503: "server_error",
    504: "server_error",
}


class OpenAIError(Exception):
    """Raise anywhere in a request to answer with an OpenAI-shaped error."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.headers = headers
        self.status = status
        self.message = message
        self.type = type or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=headers or self.headers)


def error_body(
    message: str, type: str, param: str | None = None, code: str | int | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}
ANTHROPIC_PREFIX = "/v1/messages"


def anthropic_body(status: int, body: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI-shaped error body (see `normalize_error`) in Anthropic's shape, with its type for `status`."""
    err = body.get("error") if isinstance(body, dict) else None
    message = str(err.get("message") or "") if isinstance(err, dict) else ""
    kind = _ANTHROPIC_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": message or f"HTTP {status}"}}


def shaped(path: str, status: int, body: dict[str, Any]) -> dict[str, Any]:
    """The error body as the API under `path` writes errors (Anthropic's under /v1/messages)."""
    return anthropic_body(status, body) if path.startswith(ANTHROPIC_PREFIX) else body


_OPENAI_TYPES = {
    "invalid_request_error",
    "authentication_error",
    "permission_error",
    "not_found_error",
    "rate_limit_error",
    "server_error",
    "api_error",
    "insufficient_quota",
}


def normalize_error(status: int, body: Any) -> dict[str, Any]:
    """Coerce a backend's error body into OpenAI's shape and type vocabulary, keeping its message."""
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        message = str(err.get("message") or f"backend answered {status}")
        kind = err.get("type")
        if kind not in _OPENAI_TYPES:
            kind = _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        param = err.get("param")
        out = error_body(message, kind, param if isinstance(param, str) else None, err.get("code", status))
        if "context length" in message or "context_length" in message:
            out["error"]["code"] = "context_length_exceeded"
        return out
    if isinstance(err, str):
        return error_body(err, _TYPES.get(status, "server_error"), None, status)
    text = body if isinstance(body, str) else json.dumps(body)[:500]
    return error_body(text or f"backend answered {status}", _TYPES.get(status, "server_error"), None, status)


_TAG_WORDS = {"str", "int", "float", "bool", "dict", "list", "none", "bytes", "constrained-str"}


def _is_union_tag(part: Any) -> bool:
    """A location segment naming a union member (`str`, `list[str]`), not a field."""
    return isinstance(part, str) and ("[" in part or part in _TAG_WORDS)


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None, str]:
    """(message, param, code) for pydantic errors, naming the first offending field.

    A union reports one error per member; the error of the member whose type the input has (a list
    too long, not "should be a valid string") is the one that says what is wrong.
    """
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": "invalid"}
    tag = next((i for i, p in enumerate(first.get("loc", ())) if _is_union_tag(p)), None)
    if tag is not None:  # the members' errors of this one union field
        field = tuple(first["loc"][:tag])
        same = [
            e
            for e in errors
            if tuple(e["loc"][:tag]) == field and len(e["loc"]) > tag and _is_union_tag(e["loc"][tag])
        ]
        first = next((e for e in same if not str(e.get("type", "")).endswith("_type")), first)
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _is_union_tag(p)]
    param = ".".join(loc) or None
    kind = str(first.get("type", ""))
    if kind == "json_invalid":
        return (
            "We could not parse the JSON body of your request: " + str(first.get("msg")),
            None,
            "invalid_json",
        )
    if kind == "missing":
        return f"Missing required parameter: '{param}'.", param, "missing_required_parameter"
    msg = str(first.get("msg", "invalid value"))
    if len(errors) > 1:
        msg += f" (and {len(errors) - 1} more error(s))"
    return f"Invalid value for '{param}': {msg}" if param else msg, param, "invalid_value"


def install_error_handlers(app: FastAPI) -> None:
    """OpenAI-shaped answers for framework errors: bad JSON, wrong fields, unknown routes, crashes."""

    @app.exception_handler(OpenAIError)
    async def _openai(request: Request, exc: OpenAIError) -> JSONResponse:
        return JSONResponse(
            shaped(request.url.path, exc.status, exc.body()), status_code=exc.status, headers=exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param, code = validation_message(list(exc.errors()))
        body = error_body(message, "invalid_request_error", param, code)
        return JSONResponse(shaped(request.url.path, 400, body), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        body = error_body(str(exc.detail), _TYPES.get(status, "invalid_request_error"), None, status)
        return JSONResponse(
            shaped(request.url.path, status, body),
            status_code=status,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        body = error_body("internal error in the gateway", "server_error", None, 500)
        return JSONResponse(shaped(request.url.path, 500, body), status_code=500)
