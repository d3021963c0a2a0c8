"""OpenAI-style error objects and the handlers that turn every failure into one."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class APIError(Exception):
    """An error answered to the client as `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, message: str, status: int = 400, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = (
            message, status, type, param, code)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


class FieldError(ValueError):
    """Raised by a request schema's check (serve/schemas.py) that fails: `field` names the
    offending field relative to the object checked ("" for the object itself), so that the 400
    names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class QueueFullError(APIError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"the server is busy: {limit} requests are already waiting; retry later",
                         429, type="rate_limit_error", code="queue_full")


def error_response(err: APIError) -> JSONResponse:
    headers = {"Retry-After": "1"} if err.status == 429 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


# pydantic's names for the members of a union, which appear in an error's location
_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _loc_to_param(loc: tuple[Any, ...]) -> str | None:
    """('body', 'messages', 0, 'role') -> 'messages[0].role'."""
    parts = [p for p in loc if p != "body"]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif "[" in str(p) or "-" in str(p) or p in _UNION_TAGS:  # union members, e.g.
            continue  # 'list[int]', 'function-after[...]'
        else:
            out += f".{p}" if out else str(p)
    return out or None


def _join(param: str | None, field: str) -> str | None:
    """A field named relative to the object at `param`: ('messages[0]', 'content') ->
    'messages[0].content'."""
    if not field:
        return param
    if not param:
        return field
    return param + (field if field.startswith("[") else f".{field}")


# errors about the body as a whole: not JSON, or JSON that is not an object
_BODY_ERRORS = {"missing", "model_attributes_type", "model_type", "dict_type"}


def validation_error(exc: RequestValidationError) -> APIError:
    """The first pydantic error as a one-line message naming the offending field and the reason
    (`param: reason`, the field also in `param`); a check across fields (schemas.FieldError)
    names its field itself."""
    errors = exc.errors()
    if not errors:
        return APIError("invalid request")
    first = errors[0]
    kind = first.get("type")
    if kind == "json_invalid":
        return APIError(f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}"
                        .rstrip(": "), code="invalid_json")
    param = _loc_to_param(tuple(first.get("loc", ())))
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, FieldError):
        param, msg = _join(param, cause.field), str(cause)
    elif param is None and kind in _BODY_ERRORS:
        return APIError("the request body must be a JSON object (Content-Type: application/json)",
                        code="invalid_body")
    else:
        msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if kind == "missing":
        msg = "a required field is missing"
    return APIError(f"{param}: {msg}" if param else msg, param=param,
                    code="missing_field" if kind == "missing" else "invalid_value")


def install_handlers(app: FastAPI) -> None:
    """Answer every error, including FastAPI's own, in the OpenAI shape."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:  # FastAPI's: a body it could not decode (not UTF-8)
            return error_response(APIError(f"the request body is not valid JSON in UTF-8 "
                                           f"({exc.detail})", code="invalid_json"))
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(APIError(str(exc.detail), exc.status_code, type=kind))

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        return error_response(APIError(f"internal error: {type(exc).__name__}: {exc}", 500,
                                       type="server_error"))
