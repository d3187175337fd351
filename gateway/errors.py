"""The one error tree of credgate. Pure: no web framework here. Each class declares the
HTTP status it stands for (``status``) and builds its body; turning it into a response
(FastAPI's handlers, headers, logging) is :mod:`gateway.web.errors`, the one place.

Every failure a caller can see is a :class:`CredgateError`. Each raise site gives a
stable snake_case ``code`` and a human ``message``; keyword ``details`` (key names,
a resource, never a value) travel with it into the error body. Messages are written
by credgate, never copied from a vendor error or from user input, so they never
carry a secret value.

    CredgateError                     internal_error          (HTTP 500)
    ├── BadRequest                    invalid_json, ...       (400)
    │   └── ResourceNotSupported      resource_not_supported  (400)
    ├── Unauthenticated               missing_token, ...      (401)
    ├── Forbidden                     permission_denied, ...  (403)
    ├── NotFound                      secret_not_found, ...   (404)
    ├── MethodNotAllowed              method_not_allowed      (405)
    ├── Conflict                      backend_in_use, ...     (409)
    │   └── NotRenewable              not_renewable           (409: a connector's renew can't extend it)
    ├── Gone                          wrap_token_used, ...    (410)
    ├── PayloadTooLarge               body_too_large, ...     (413)
    ├── UnsupportedMediaType          unsupported_media_type  (415)
    ├── ValidationFailed              validation_failed       (422; carries field paths)
    ├── TooManyRequests               rate_limited            (429)
    ├── Unavailable                   not_ready, ...          (503)
    │   └── StoreUnavailable          store_unavailable       (503, Retry-After 2: the store is away)
    ├── TargetError                   target_error            (502: a backend or target failed)
    │   ├── TargetUnreachable         target_unreachable, backend_unavailable (503: it did not answer)
    │   └── ResourceRejected          target_rejected_resource (409: it refused this resource)
    └── ConfigurationError            configuration_error     (not HTTP: refuses to start; CLI exit 2)

Plugins (``backends/``, ``connectors/``) raise only these; :mod:`connectors.base` and
:mod:`backends.base` re-export the ones they document.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, ValidationError

from gateway.requestid import current_request_id


class CredgateError(Exception):
    status: int = 500
    code: str = "internal_error"
    retry_after: int | None = None  # seconds: sent as Retry-After (every 503 has one)

    def __init__(self, message: str, *, code: str | None = None, retry_after: int | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if retry_after is not None:
            self.retry_after = retry_after
        self.details = details

    def body(self) -> dict[str, Any]:
        """The error body: ``{"error": {"code", "message", ...details, "request_id"}}``."""
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        err.update(self.details)
        err["request_id"] = current_request_id()
        return {"error": err}


class BadRequest(CredgateError):
    status = 400
    code = "bad_request"


class ResourceNotSupported(BadRequest):
    code = "resource_not_supported"


class Unauthenticated(CredgateError):
    status = 401
    code = "unauthenticated"


class Forbidden(CredgateError):
    status = 403
    code = "permission_denied"


class NotFound(CredgateError):
    status = 404
    code = "not_found"


class MethodNotAllowed(CredgateError):
    status = 405
    code = "method_not_allowed"


class Conflict(CredgateError):
    status = 409
    code = "conflict"


class NotRenewable(Conflict):
    """A connector's ``renew`` can't extend this credential (its type is not renewable, or
    the target can't move its expiry): the caller must issue a new one."""

    code = "not_renewable"


class Gone(CredgateError):
    status = 410
    code = "gone"


class PayloadTooLarge(CredgateError):
    status = 413
    code = "body_too_large"


class UnsupportedMediaType(CredgateError):
    status = 415
    code = "unsupported_media_type"


class ValidationFailed(CredgateError):
    status = 422
    code = "validation_failed"


class TooManyRequests(CredgateError):
    status = 429
    code = "rate_limited"


class Unavailable(CredgateError):
    status = 503
    code = "unavailable"
    retry_after = 5


class StoreUnavailable(Unavailable):
    """The gateway's own store did not answer in time, dropped the connection, or can't
    write (stopped, failing over, a read-only or full disk). The request's transaction
    was rolled back: nothing it meant to write was written."""

    code = "store_unavailable"
    retry_after = 2


class TargetError(CredgateError):
    """A backend or target refused or failed (a sanitised vendor error: its class and code)."""

    status = 502
    code = "target_error"


class TargetUnreachable(TargetError):
    """The backend or target did not answer (connection refused, timeout, too many connections)."""

    status = 503
    code = "target_unreachable"
    retry_after = 5


class ResourceRejected(TargetError):
    """The target refused *this resource*: it does not exist there (a schema, a database, a
    table), or the connector's login may not grant on it. The caller asked for something the
    target can't give, so it is a 409 ``target_rejected_resource`` naming the resource (and a
    ``reason``: ``not_found`` or ``not_grantable``), not a 502. Raise it only when nothing was
    left at the target; the gateway still revokes the planned names before answering."""

    status = 409
    code = "target_rejected_resource"

    def __init__(self, message: str, *, resource: str, reason: str, code: str | None = None, **details: Any) -> None:
        super().__init__(message, code=code, resource=resource, reason=reason, **details)
        self.resource = resource
        self.reason = reason


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
