"""The request id: one per HTTP request, carried in a context variable so that
error bodies, logs and (later) audit events can name the same request."""

from __future__ import annotations

import re
import secrets
from contextvars import ContextVar

_request_id: ContextVar[str | None] = ContextVar("credgate_request_id", default=None)
_VALID = re.compile(r"^[A-Za-z0-9._-]{8,64}$")


def current_request_id() -> str | None:
    return _request_id.get()


def new_request_id(incoming: str | None = None) -> str:
    """Accept a caller's well-formed X-Request-ID, otherwise mint one."""
    if incoming and _VALID.match(incoming):
        return incoming
    return "req_" + secrets.token_hex(8)


def set_request_id(value: str | None):
    return _request_id.set(value)


def reset_request_id(token) -> None:
    _request_id.reset(token)
