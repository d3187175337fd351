"""The one mapping from the error tree (:mod:`gateway.errors`) to HTTP.

Every error body is ``{"error": {"code", "message", ...details, "request_id"}}`` with the
status its class declares; anything else (FastAPI's validation errors, Starlette's
HTTP exceptions, an unexpected exception) is first turned into a tree error here.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.audit import trail as audit
from gateway.errors import (
    BadRequest,
    Conflict,
    CredgateError,
    Forbidden,
    Gone,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    StoreUnavailable,
    TooManyRequests,
    Unauthenticated,
    Unavailable,
    UnsupportedMediaType,
    ValidationFailed,
    field_errors,
)
from gateway.store import as_store_unavailable

log = logging.getLogger("credgate.errors")

class HeadersTooLarge(CredgateError):
    status, code = 431, "headers_too_large"


class ErrorOut(BaseModel):
    """The body of every error response (for the OpenAPI schema)."""

    class Body(BaseModel):
        code: str
        message: str
        request_id: str | None = None

    error: Body


def error_response(exc: CredgateError, headers: dict[str, str] | None = None) -> JSONResponse:
    audit.note(error=exc.code)
    hdrs = dict(headers or {})
    if getattr(exc, "retry_after", None):
        hdrs.setdefault("Retry-After", str(exc.retry_after))
    if isinstance(exc, Unauthenticated):
        hdrs.setdefault("WWW-Authenticate", 'Bearer realm="credgate"')
    return JSONResponse(exc.body(), status_code=exc.status, headers=hdrs)


def _validation_error(exc: RequestValidationError) -> CredgateError:
    """Translate FastAPI's validation error without ever echoing the input.

    pydantic puts the offending input (which may be a secret value) into each
    error; only the location and the message survive here.
    """
    if any(e.get("type") == "json_invalid" for e in exc.errors()):
        return BadRequest("The request body is not valid JSON.", code="invalid_json")
    errors = field_errors(exc.errors())
    if any(err["field"] == "body" and "required" in err["message"].lower() for err in errors):
        return BadRequest("The request needs a JSON body.", code="missing_body", errors=errors)
    first = errors[0] if errors else {"field": "", "message": "invalid"}
    return ValidationFailed(
        f"Invalid value at {first['field'] or 'request'}: {first['message']}", errors=errors
    )


_STATUS_CODES = {cls.status: cls for cls in (BadRequest, Unauthenticated, Forbidden, NotFound, MethodNotAllowed, Conflict,
                                             Gone, PayloadTooLarge, UnsupportedMediaType, ValidationFailed,
                                             TooManyRequests, Unavailable)}


def install_error_handlers(app: FastAPI) -> None:
    """Route every exception the app can raise through one body shape."""

    @app.exception_handler(CredgateError)
    async def _credgate(request: Request, exc: CredgateError) -> JSONResponse:
        if exc.status >= 500 and not isinstance(exc, StoreUnavailable):  # the store logs its own, throttled
            log.error("request failed: %s (%s)", exc.code, exc.message)
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        cls = _STATUS_CODES.get(exc.status_code, CredgateError)
        if exc.status_code == 404:
            err: CredgateError = NotFound("No such route.", code="route_not_found")
        elif exc.status_code == 400:
            # FastAPI raises a bare 400 only when it can't parse the body (e.g. bad UTF-8).
            err = BadRequest("The request body could not be parsed as JSON.", code="invalid_json")
        elif exc.status_code == 405:
            err = MethodNotAllowed(f"Method {request.method} is not allowed here.")
        else:
            err = cls(str(exc.detail) if isinstance(exc.detail, str) else "Request refused.")
        return error_response(err, headers=dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, CredgateError):  # raised in a middleware, outside the handlers above
            return error_response(exc)
        store_down = as_store_unavailable(exc)  # what the store's error hook can't see (a pool wait)
        if store_down is not None:
            return error_response(store_down)
        # The exception's text may quote a vendor response; log only its type.
        log.error("unhandled %s on %s %s", type(exc).__name__, request.method, request.url.path)
        return error_response(CredgateError("The gateway hit an internal error."))
