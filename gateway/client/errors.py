"""The client's errors, apart from the transport so that catching them imports no httpx.

::

    Exception
     ├── RequestFailed        the gateway answered with an error: its stable code and message
     └── GatewayUnreachable   no answer at all (refused, timed out, TLS failure)
"""

from __future__ import annotations


class RequestFailed(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class GatewayUnreachable(Exception):
    pass
