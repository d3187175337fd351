"""The console's only way to the gateway: its own REST API, called in-process (an ASGI
transport into the same app, through every middleware) with the session's token as the
bearer. The API authenticates, authorises, validates and audits each call exactly as it does
a CLI's or a pipeline's; the console adds no rule of its own and can't bypass one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx
from starlette.requests import Request

TIMEOUT = 60.0


@dataclass
class ApiError(Exception):
    """The API's refusal as its error body says it (``code``, ``message``), or the transport's."""

    status: int
    code: str
    message: str
    details: list[dict[str, Any]] | None = None
    retry_after: str | None = None  # a fault's Retry-After (503: the store, a backend or a target is away)

    def __str__(self) -> str:
        return f"{self.message} ({self.code})"


class Api:
    def __init__(self, request: Request, token: str | None) -> None:
        self._app = request.scope["app"]
        client = request.scope.get("client") or ("127.0.0.1", 0)
        headers = {"User-Agent": "credgate-console", "Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        # Behind a trusted proxy the API reads the caller's address as the console's request did.
        for name in ("x-forwarded-for", "x-forwarded-proto", "forwarded", "x-request-id"):
            if name in request.headers:
                headers[name] = request.headers[name]
        self._client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self._app, client=(client[0], client[1] or 0)),
            base_url="http://credgate-console.internal", headers=headers, timeout=TIMEOUT,
        )

    async def __aenter__(self) -> Api:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._client.aclose()

    async def call(self, method: str, path: str, *, params: dict[str, Any] | None = None, json: Any = None,
                   content: bytes | None = None, content_type: str | None = None) -> Any:
        params = {k: v for k, v in (params or {}).items() if v not in (None, "")}
        headers = {"Content-Type": content_type} if content_type else None
        resp = await self._client.request(method, path, params=params, json=json, content=content, headers=headers)
        if resp.status_code == 204:
            return None
        try:
            body = resp.json()
        except ValueError:
            body = None
        if resp.status_code >= 400:
            error = body.get("error") if isinstance(body, dict) else None
            if isinstance(error, dict):
                raise ApiError(resp.status_code, str(error.get("code", "error")), str(error.get("message", "")),
                               error.get("errors") if isinstance(error.get("errors"), list) else None,
                               resp.headers.get("retry-after"))
            if isinstance(body, dict) and isinstance(body.get("error"), str):  # OAuth2's shape
                raise ApiError(resp.status_code, body["error"], str(body.get("error_description", "")))
            raise ApiError(resp.status_code, f"http_{resp.status_code}", "The gateway answered with an error.")
        return body

    async def readiness(self) -> dict[str, Any]:
        """``GET /readyz`` as it answers, ready (200) or not (503, with the checks that failed)."""
        try:
            resp = await self._client.get("/readyz")
            body = resp.json()
        except (httpx.HTTPError, ValueError):
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("checks"), dict):
            return {"status": "not_ready", "checks": {}, "error": {"message": "The gateway did not say."}}
        return body

    async def get(self, path: str, **params: Any) -> Any:
        return await self.call("GET", path, params=params)

    async def post(self, path: str, json: Any = None, **params: Any) -> Any:
        return await self.call("POST", path, params=params, json=json if json is not None else {})

    async def put(self, path: str, json: Any) -> Any:
        return await self.call("PUT", path, json=json)

    async def delete(self, path: str, **params: Any) -> Any:
        return await self.call("DELETE", path, params=params)
