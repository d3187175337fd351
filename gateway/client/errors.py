"""The client's errors, apart from the transport so that catching them imports no httpx.

::

    Exception
     └── CredgateError            .code (the gateway's stable code), .status (HTTP, or None), .message
          ├── RequestFailed        the gateway answered with an error
          │    ├── BadRequest          400
          │    ├── Unauthenticated     401
          │    ├── PermissionDenied    403
          │    ├── NotFound            404
          │    ├── Conflict            409
          │    ├── Gone                410
          │    ├── RateLimited         429  (.retry_after, seconds)
          │    └── Unavailable         503  (.retry_after, seconds)
          └── GatewayUnreachable   no answer at all (refused, timed out, TLS failure)

A message is the gateway's own text (which never holds a secret value) or the client's.
"""

from __future__ import annotations


class CredgateError(Exception):
    """Base of every error the client raises."""

    code: str = "error"
    status: int | None = None

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status


class RequestFailed(CredgateError):
    """The gateway refused the request; ``str()`` is ``"code: message"``."""

    def __init__(self, status: int, code: str, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message, code=code, status=status)
        self.retry_after = retry_after
        self.args = (f"{code}: {message}",)

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class BadRequest(RequestFailed):
    pass


class Unauthenticated(RequestFailed):
    pass


class PermissionDenied(RequestFailed):
    pass


class NotFound(RequestFailed):
    pass


class Conflict(RequestFailed):
    pass


class Gone(RequestFailed):
    pass


class RateLimited(RequestFailed):
    pass


class Unavailable(RequestFailed):
    pass


class GatewayUnreachable(CredgateError):
    code = "gateway_unreachable"


BY_STATUS: dict[int, type[RequestFailed]] = {
    400: BadRequest, 401: Unauthenticated, 403: PermissionDenied, 404: NotFound, 409: Conflict, 410: Gone,
    429: RateLimited, 503: Unavailable,
}


def error_for(status: int, code: str, message: str, *, retry_after: float | None = None) -> RequestFailed:
    """The typed error for a gateway's refusal (RequestFailed itself for another status)."""
    return BY_STATUS.get(status, RequestFailed)(status, code, message, retry_after=retry_after)
