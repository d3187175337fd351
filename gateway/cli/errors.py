"""The CLI's own errors (the gateway's come as :class:`gateway.client.errors.RequestFailed`)."""

from __future__ import annotations

from gateway.client.errors import RequestFailed


class UsageProblem(Exception):
    """Bad input detected by the CLI itself: exit 2."""


class LoginFailed(RequestFailed):
    """The sign-in was refused or could not finish: exit 1, one line."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(0, code, message)
