"""The console's session, its CSRF tokens and the headers every console page carries.

The session is a gateway access token (a JWT the gateway signed at sign-in: with an admin
key, ``POST /v1/auth/console/key``; at the identity provider, the code + PKCE callback) kept
in the ``credgate_console`` cookie: HttpOnly (no script reads it), SameSite=Strict (no other
site's page sends it), path ``/console``, ``Secure`` when the gateway's URL is https. The
console presents it as the bearer of its API calls, so the API's own authentication,
revocation (signing out revokes it, revoking the admin key it derives from ends it) and
policy apply to every page and button.

CSRF: every state-changing console request is a POST carrying ``csrf``, a hash of the
session token (it can't be computed without the cookie's value, and is worthless without
the cookie); the sign-in form, before any session, carries the value of a pre-session cookie
(double submit). Requests whose ``Origin`` is another origin, or that the browser marks
``Sec-Fetch-Site: cross-site``/``same-site``, are refused before the token is looked at.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import Forbidden

COOKIE = "credgate_console"
PRE_COOKIE = "credgate_console_pre"  # the sign-in form's double-submit value
KEY_SIGN_IN = "/v1/auth/console/key"  # where the sign-in form posts (the pre cookie's path)
FLASH_COOKIE = "credgate_console_flash"
PATH = "/console"

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
HEADERS = {
    "content-security-policy": CSP,
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
    "permissions-policy": "camera=(), microphone=(), geolocation=()",
}


def csrf_token(session: str) -> str:
    return hashlib.sha256(b"credgate-console-csrf\x00" + session.encode()).hexdigest()


def new_pre_token() -> str:
    return secrets.token_urlsafe(24)


def same_origin(request: Request) -> bool:
    """False when the browser says the request comes from another site or origin."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    origin = request.headers.get("origin")
    if origin is None:  # a client that sends none; the form's token must still match
        return True
    host = request.headers.get("host", "")
    return origin in (f"http://{host}", f"https://{host}")


def check_csrf(request: Request, submitted: str | None, expected: str | None) -> None:
    """403 ``csrf_failed`` unless the request is same-origin and ``submitted`` equals ``expected``."""
    if not same_origin(request):
        raise Forbidden("This request came from another site; the console refused it.", code="csrf_failed")
    if not submitted or not expected or not hmac.compare_digest(submitted.encode(), expected.encode()):
        raise Forbidden("The form's anti-forgery token is missing or stale; reload the page and try again.",
                        code="csrf_failed")


def token_age(token: str) -> float | None:
    """Seconds since the session token was issued (``iat``), read without verifying: the API
    verified it on this same request (``GET /v1/auth/whoami``)."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return time.time() - float(claims["iat"])
    except (IndexError, ValueError, KeyError, TypeError):
        return None


def secure(request: Request) -> bool:
    return request.url.scheme == "https"


def set_session(response: Response, request: Request, token: str, max_age: int) -> None:
    response.set_cookie(COOKIE, token, max_age=max_age, path=PATH, httponly=True, samesite="strict",
                        secure=secure(request))


def clear_session(response: Response, request: Request) -> None:
    response.delete_cookie(COOKIE, path=PATH, httponly=True, samesite="strict", secure=secure(request))


def set_flash(response: Response, request: Request, kind: str, text: str, code: str | None = None) -> None:
    """A result to show on the next page (never a value: results name what was done)."""
    raw = json.dumps({"kind": kind, "text": text[:1000], "code": code}).encode()
    response.set_cookie(FLASH_COOKIE, base64.urlsafe_b64encode(raw).decode(), max_age=60, path=PATH,
                        httponly=True, samesite="strict", secure=secure(request))


def take_flash(request: Request) -> dict[str, Any] | None:
    """The result the previous action left for this page (its cookie is then dropped by
    :func:`drop_flash` on the response showing it)."""
    raw = request.cookies.get(FLASH_COOKIE)
    if not raw:
        return None
    try:
        flash = json.loads(base64.urlsafe_b64decode(raw.encode()))
    except ValueError:
        return None
    if not isinstance(flash, dict) or flash.get("kind") not in ("ok", "error"):
        return None
    return {"kind": flash["kind"], "text": str(flash.get("text", ""))[:1000],
            "code": str(flash["code"])[:64] if flash.get("code") else None}


def drop_flash(request: Request, response: Response) -> None:
    if FLASH_COOKIE in request.cookies:
        response.delete_cookie(FLASH_COOKIE, path=PATH, httponly=True, samesite="strict", secure=secure(request))


class ConsoleHeaders:
    """Adds :data:`HEADERS` and ``Cache-Control: no-store`` to every response under ``/console``
    and to the sign-in routes' (``/v1/auth/console``): no page is framed, runs inline script,
    loads anything from elsewhere or stays in a cache (a revealed value never reaches one)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not (path == PATH or path.startswith(PATH + "/") or path.startswith("/v1/auth/console/")):
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.decode().lower() not in HEADERS
                           and k.decode().lower() not in ("cache-control", "pragma")]
                headers += [(k.encode(), v.encode()) for k, v in HEADERS.items()]
                headers += [(b"cache-control", b"no-store"), (b"pragma", b"no-cache")]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)
