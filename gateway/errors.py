"""The one error hierarchy of credgate, and the one place that maps it to HTTP.

Every failure a caller can see is a :class:`CredgateError`. Each subclass fixes
an HTTP status; each raise site gives a stable snake_case ``code`` and a human
``message``. Messages are written by credgate, never copied from a vendor
error or from user input, so they never carry a secret value.

    CredgateError                     500 internal_error
    ├── BadRequest                    400 (invalid_json, invalid_path, ...)
    ├── Unauthenticated               401 (missing_token, invalid_token)
    ├── Forbidden                     403 (permission_denied, ...)
    ├── NotFound                      404 (backend_not_found, secret_not_found, ...)
    ├── MethodNotAllowed              405
    ├── Conflict                      409 (backend_in_use, ...)
    ├── Gone                          410
    ├── PayloadTooLarge               413 (body_too_large)
    ├── UnsupportedMediaType          415 (unsupported_media_type)
    ├── ValidationFailed              422 (validation_failed; carries field paths)
    ├── Unavailable                   503 (not_ready, backend_unavailable, ...)
    └── ConfigurationError            (not HTTP: refuses to start; CLI exit 2)

Every error body is ``{"error": {"code", "message", "request_id", ...}}``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.requestid import current_request_id

log = logging.getLogger("credgate.errors")


class CredgateError(Exception):
    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, code: str | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.details = details

    def body(self) -> dict[str, Any]:
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        err.update(self.details)
        err["request_id"] = current_request_id()
        return {"error": err}


class BadRequest(CredgateError):
    status, code = 400, "bad_request"


class Unauthenticated(CredgateError):
    status, code = 401, "unauthenticated"


class Forbidden(CredgateError):
    status, code = 403, "permission_denied"


class NotFound(CredgateError):
    status, code = 404, "not_found"


class MethodNotAllowed(CredgateError):
    status, code = 405, "method_not_allowed"


class Conflict(CredgateError):
    status, code = 409, "conflict"


class Gone(CredgateError):
    status, code = 410, "gone"


class PayloadTooLarge(CredgateError):
    status, code = 413, "body_too_large"


class UnsupportedMediaType(CredgateError):
    status, code = 415, "unsupported_media_type"


class ValidationFailed(CredgateError):
    status, code = 422, "validation_failed"


class Unavailable(CredgateError):
    status, code = 503, "unavailable"


class ErrorOut(BaseModel):
    """The body of every error response (for the OpenAPI schema)."""

    class Body(BaseModel):
        code: str
        message: str
        request_id: str | None = None

    error: Body


class ConfigurationError(CredgateError):
    """The gateway can't start (or a CLI command can't run) with this configuration."""

    code = "configuration_error"


FIELD_PART_MAX = 40  # longest part of a field path an error body repeats whole
FIELD_PARTS_MAX = 12  # deepest field path an error body repeats whole
FIELD_ERRORS_MAX = 20  # most field errors one error body lists


def field_path(loc: Iterable[Any], prefix: str = "") -> str:
    """A validation error's location as the dotted path an error body (or a CLI
    line) may carry. A location can hold a caller's own dict keys and field
    names, of any length: a part longer than 40 characters is cut to its first
    16 and ``...``, unprintable characters become ``?``, and a path deeper than
    12 parts keeps its first 11. The one function every error path goes through."""
    parts = [str(p) for p in loc]
    if len(parts) > FIELD_PARTS_MAX:
        parts = parts[: FIELD_PARTS_MAX - 1] + ["..."]
    out = []
    for part in parts:
        if len(part) > FIELD_PART_MAX:
            part = part[:16] + "..."
        out.append("".join(c if c.isprintable() else "?" for c in part))
    return prefix + ".".join(out)


def field_errors(errors: Iterable[Mapping[str, Any]], prefix: str = "") -> list[dict[str, str]]:
    """pydantic's errors as ``[{"field", "message"}]``: bounded paths (:func:`field_path`),
    pydantic's message (it describes the constraint, never the input), at most 20."""
    out = []
    for e in errors:
        if len(out) == FIELD_ERRORS_MAX:
            break
        out.append({"field": field_path(e.get("loc", ()), prefix), "message": str(e.get("msg", "invalid value"))})
    return out


def validate_model(model: type[BaseModel], data: Any, what: str, prefix: str = "") -> Any:
    """``data`` as ``model``, or 422 naming the fields at fault (pydantic's
    messages describe the constraint, never the input)."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = field_errors(exc.errors(), prefix)
        raise ValidationFailed(f"Invalid {what} at {errors[0]['field']}: {errors[0]['message']}", errors=errors) from None


def error_response(exc: CredgateError, headers: dict[str, str] | None = None) -> JSONResponse:
    from gateway import audit

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


_STATUS_CODES = {
    400: BadRequest,
    401: Unauthenticated,
    403: Forbidden,
    404: NotFound,
    405: MethodNotAllowed,
    409: Conflict,
    410: Gone,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
    422: ValidationFailed,
    503: Unavailable,
}


def install_error_handlers(app: FastAPI) -> None:
    """Route every exception the app can raise through one body shape."""

    @app.exception_handler(CredgateError)
    async def _credgate(request: Request, exc: CredgateError) -> JSONResponse:
        if exc.status >= 500:
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
        # The exception's text may quote a vendor response; log only its type.
        log.error("unhandled %s on %s %s", type(exc).__name__, request.method, request.url.path)
        return error_response(CredgateError("The gateway hit an internal error."))
