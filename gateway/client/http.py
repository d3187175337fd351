"""A small HTTP client for the gateway's API, used by the CLI (and by scripts).

Configured from ``CREDGATE_ADDR`` (default ``http://127.0.0.1:8765``) and
``CREDGATE_TOKEN``. A refused request raises :class:`RequestFailed` carrying
the gateway's stable error code and message.
"""

from __future__ import annotations

import os
from typing import Any

import httpx

from gateway.client.errors import GatewayUnreachable, RequestFailed, error_for
from gateway.client.urls import DEFAULT_ADDR, seg

__all__ = ["DEFAULT_ADDR", "Client", "GatewayUnreachable", "RequestFailed", "failure", "seg"]


def retry_after(resp: httpx.Response) -> float | None:
    """The response's Retry-After in seconds (delta form), or None."""
    value = resp.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def failure(resp: httpx.Response) -> RequestFailed:
    """The typed error for a gateway's error response (its stable code and message)."""
    try:
        err = resp.json()["error"]
        if isinstance(err, str):  # the OAuth2 token endpoint's shape
            return error_for(resp.status_code, err, str(resp.json().get("error_description", err)),
                             retry_after=retry_after(resp))
        return error_for(resp.status_code, err["code"], err["message"], retry_after=retry_after(resp))
    except (ValueError, KeyError, TypeError):
        return error_for(resp.status_code, "http_error", f"HTTP {resp.status_code}", retry_after=retry_after(resp))

class Client:
    def __init__(self, addr: str | None = None, token: str | None = None, *, timeout: float = 30.0, verify: Any = True):
        self.addr = (addr or os.environ.get("CREDGATE_ADDR") or DEFAULT_ADDR).rstrip("/")
        self.token = token if token is not None else os.environ.get("CREDGATE_TOKEN")
        headers = {"User-Agent": "credgate-client"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        self._http = httpx.Client(base_url=self.addr, headers=headers, timeout=timeout, verify=verify)

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        content: bytes | None = None,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        params = {k: (str(v).lower() if isinstance(v, bool) else v) for k, v in (params or {}).items() if v is not None}
        try:
            resp = self._http.request(method, path, json=json, content=content, params=params, headers=headers)
        except httpx.TransportError as exc:
            raise GatewayUnreachable(
                f"can't reach the gateway at {self.addr} ({type(exc).__name__}); is `credgate serve` running? "
                "Set CREDGATE_ADDR to its address."
            ) from None
        if resp.status_code >= 400:
            raise failure(resp)
        if resp.status_code == 204 or not resp.content:
            return None
        return resp.json()

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
