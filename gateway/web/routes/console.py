"""Sign-in for the web console (gateway/console): OAuth2 authorization code with PKCE
(RFC 6749 4.1, RFC 7636) at the identity provider named by
``CREDGATE_LOGIN_ISSUER``, as the public client ``CREDGATE_LOGIN_CLIENT_ID``, or with an
admin key.

The routes are anonymous (public):

=====================================  ==============================================================
``GET /v1/auth/console/login``         302 to the IdP's ``authorization_endpoint`` (from its
                                       discovery document) with ``response_type=code``, ``state``,
                                       ``nonce`` and an S256 ``code_challenge``; sets the login cookie
``GET /v1/auth/console/callback``      ``?code&state``: checks the cookie and ``state``, redeems the
                                       code with the ``code_verifier``, verifies the ``id_token``
                                       through the trusted issuer and its ``nonce``, and answers
                                       ``{access_token, token_type, expires_in, subject, roles}``;
                                       begun with ``?console=true``, it sets the console's session
                                       cookie instead and continues to ``/console``
``POST /v1/auth/console/key``          the console's sign-in form (``key``, ``pre``): an admin key
                                       becomes a console session (an access token of kind
                                       ``admin_key`` deriving from the key: revoking the key ends it)
=====================================  ==============================================================

A console session is never the admin key itself: the cookie holds a gateway token of at most
``CREDGATE_CONSOLE_SESSION_SECONDS`` (gateway/console/session.py). Both sign-ins are audited
fail-closed (gateway/audit/trail.py ``FAIL_CLOSED_PATHS``): no session is handed out unrecorded.

Nothing is kept server-side between the two: the ``code_verifier``, ``state``
and ``nonce`` travel in a cookie (``credgate_login``: HttpOnly, SameSite=Lax,
path ``/v1/auth/console``, 10 minutes, ``Secure`` when the gateway's URL is
https) holding a JWT signed with the gateway's key, ``typ`` ``cg-login+jwt``
and audience ``credgate-console-login``: it is never accepted as a bearer
token, and no bearer token is accepted as a login cookie. The only write is
at the callback: the cookie's ``jti`` is recorded (the ``used_jtis`` table,
until the cookie expires), so a replayed callback is refused even before the
IdP would refuse the spent code.

The access token is minted as the token-exchange grant does
(:mod:`gateway.web.routes.identity`): kind ``workload``, the subject and roles the
trusted issuer maps from the id_token, at most an hour and never past the
id_token's own expiry.

Errors use the project's shape, 400 with ``login_state_invalid`` (no, bad,
expired or foreign cookie; ``state`` mismatch), ``login_state_used``,
``login_denied`` (the IdP answered ``error=...``), ``login_code_missing``,
``login_code_invalid`` (the IdP refused the code), ``login_id_token_invalid``,
``login_nonce_invalid``; 404 ``login_not_configured``; 503 ``idp_unavailable``
or ``idp_bad_response``.
"""

from __future__ import annotations

import hmac
import re
import secrets
import time
from datetime import timedelta
from typing import Annotated, Any

import httpx
from authlib.common.security import generate_token
from authlib.oauth2.rfc6749.parameters import prepare_grant_uri, prepare_token_request
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response

from gateway.console import pages
from gateway.console import session as console_session
from gateway.console.forms import read_form
from gateway.web.deps import RuntimeDep
from gateway.audit import trail as audit
from gateway.identity.principal import GATEWAY
from gateway.errors import BadRequest, CredgateError, NotFound, Unauthenticated, Unavailable
from gateway.identity.issuers import Issuer, check_audience, check_times, utc_from_ts
from gateway.identity.replay import use_once
from gateway.web.routes.identity import MAX_EXCHANGED_TTL
from gateway.runtime import Runtime

router = APIRouter(tags=["identity"])

PREFIX = "/v1/auth/console"
COOKIE = "credgate_login"
COOKIE_TYP = "cg-login+jwt"
COOKIE_AUD = "credgate-console-login"
COOKIE_TTL = 600
IDP_TIMEOUT = 10.0
DISCOVERY_TTL = 300.0
EXCHANGED_CLAIMS = ("subject", "groups", "project", "run", "email")
_ERROR_CODE = re.compile(r"^[a-z_]{1,64}$")

_discovery: dict[str, tuple[dict[str, Any], float]] = {}


def _http() -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=IDP_TIMEOUT, follow_redirects=False, trust_env=False,
                             headers={"Accept": "application/json", "User-Agent": "credgate"})


async def _login_issuer(runtime: Runtime) -> Issuer:
    settings = runtime.settings
    if not settings.login_issuer or not settings.login_client_id:
        raise NotFound("Sign-in is not configured (CREDGATE_LOGIN_ISSUER, CREDGATE_LOGIN_CLIENT_ID).",
                       code="login_not_configured")
    return await runtime.issuers.get(settings.login_issuer)


async def _endpoints(row: Issuer) -> dict[str, Any]:
    """The IdP's discovery document (cached for a few minutes), checked for the fields we use."""
    cached = _discovery.get(row.issuer_url)
    if cached and time.monotonic() - cached[1] < DISCOVERY_TTL:
        return cached[0]
    try:
        async with _http() as http:
            resp = await http.get(f"{row.issuer_url.rstrip('/')}/.well-known/openid-configuration")
        resp.raise_for_status()
        doc = resp.json()
    except (httpx.HTTPError, ValueError):
        raise Unavailable("The identity provider's discovery document can't be fetched.", code="idp_unavailable") from None
    usable = isinstance(doc, dict) and doc.get("issuer") == row.issuer_url and all(
        isinstance(doc.get(k), str) and doc[k].startswith(("https://", "http://"))
        for k in ("authorization_endpoint", "token_endpoint")
    )
    if not usable:
        raise Unavailable("The identity provider's discovery document is not usable.", code="idp_bad_response")
    _discovery[row.issuer_url] = (doc, time.monotonic())
    return doc


def _redirect_uri(runtime: Runtime) -> str:
    return f"{runtime.settings.issuer_url}{PREFIX}/callback"


def _secure(runtime: Runtime) -> bool:
    return runtime.settings.issuer_url.startswith("https://")


@router.get(f"{PREFIX}/login", summary="Console sign-in (anonymous): redirect to the identity provider", status_code=302)
async def console_login(
    runtime: RuntimeDep,
    console: Annotated[bool, Query(description="Sign in to the web console: the callback sets its session "
                                               "cookie and continues to /console.")] = False,
) -> RedirectResponse:
    row = await _login_issuer(runtime)
    doc = await _endpoints(row)
    verifier = generate_token(64)  # 64 characters of [A-Za-z0-9] (RFC 7636 4.1)
    state, nonce = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    now = int(time.time())
    cookie = runtime.tokens.signing.sign(
        {
            "iss": runtime.settings.issuer_url, "aud": COOKIE_AUD, "iat": now, "exp": now + COOKIE_TTL,
            "jti": secrets.token_urlsafe(16), "idp": row.name, "state": state, "nonce": nonce, "cv": verifier,
            **({"to": "console"} if console else {}),
        },
        typ=COOKIE_TYP,
    )
    url = prepare_grant_uri(
        doc["authorization_endpoint"], runtime.settings.login_client_id, "code", redirect_uri=_redirect_uri(runtime),
        scope=runtime.settings.login_scopes, state=state, nonce=nonce,
        code_challenge=create_s256_code_challenge(verifier), code_challenge_method="S256",
    )
    resp = RedirectResponse(url, status_code=302, headers={"Cache-Control": "no-store"})
    resp.set_cookie(COOKIE, cookie, max_age=COOKIE_TTL, path=PREFIX, httponly=True, samesite="lax",
                    secure=_secure(runtime))
    return resp


def _state_invalid(why: str) -> BadRequest:
    return BadRequest(f"{why} Start the sign-in again.", code="login_state_invalid")


async def _login_claims(runtime: Runtime, cookie: str | None, row: Issuer) -> dict[str, Any]:
    if not cookie:
        raise _state_invalid("No sign-in is in progress in this browser (the login cookie is missing or expired).")
    try:
        decoded = await runtime.tokens.signing.verify(cookie)
        claims = dict(decoded.claims)
        if decoded.header.get("typ") != COOKIE_TYP or claims.get("iss") != runtime.settings.issuer_url:
            raise _state_invalid("The login cookie is not one this gateway set.")
        check_audience(claims, [COOKIE_AUD])
        check_times(claims, 0)
    except Unauthenticated:
        raise _state_invalid("The login cookie is not valid or has expired.") from None
    if claims.get("idp") != row.name or not all(isinstance(claims.get(k), str) for k in ("jti", "state", "nonce", "cv")):
        raise _state_invalid("The login cookie is not valid.")
    return claims


async def _consume(runtime: Runtime, claims: dict[str, Any]) -> None:
    """One callback per login cookie, across replicas (the store is shared)."""
    if not await use_once(runtime.store, f"console:{claims['jti']}"[:200], utc_from_ts(int(claims["exp"]) + 60)):
        raise BadRequest("This sign-in was already completed. Start the sign-in again.", code="login_state_used")


async def _redeem(runtime: Runtime, doc: dict[str, Any], code: str, verifier: str) -> str:
    """Redeem the code with its ``code_verifier`` for the IdP's id_token (a public client:
    ``client_id`` in the body, no secret)."""
    body = prepare_token_request(
        "authorization_code", code=code, redirect_uri=_redirect_uri(runtime),
        client_id=runtime.settings.login_client_id or "", code_verifier=verifier,
    )
    try:
        async with _http() as http:
            resp = await http.post(doc["token_endpoint"], content=body,
                                   headers={"Content-Type": "application/x-www-form-urlencoded"})
    except httpx.HTTPError:
        raise Unavailable("The identity provider's token endpoint can't be reached.", code="idp_unavailable") from None
    try:
        answer = resp.json()
    except ValueError:
        answer = None
    if resp.status_code >= 500 or not isinstance(answer, dict):
        raise Unavailable("The identity provider's token endpoint did not answer usefully.", code="idp_bad_response")
    if resp.status_code != 200:
        error = answer.get("error")
        error = error if isinstance(error, str) and _ERROR_CODE.match(error) else f"HTTP {resp.status_code}"
        raise BadRequest(f"The identity provider refused the authorization code ({error}).", code="login_code_invalid")
    id_token = answer.get("id_token")
    if not isinstance(id_token, str) or not id_token:
        raise Unavailable("The identity provider sent no id_token (is 'openid' among the scopes?).",
                          code="idp_bad_response")
    return id_token


@router.get(f"{PREFIX}/callback", summary="Console sign-in (anonymous): the IdP redirects back here")
async def console_callback(
    request: Request,
    runtime: RuntimeDep,
    code: Annotated[str | None, Query(max_length=2048)] = None,
    state: Annotated[str | None, Query(max_length=512)] = None,
    error: Annotated[str | None, Query(max_length=256)] = None,
    iss: Annotated[str | None, Query(max_length=1024)] = None,
) -> Response:
    row = await _login_issuer(runtime)
    claims = await _login_claims(runtime, request.cookies.get(COOKIE), row)
    if claims.get("to") != "console":
        return await _complete(request, runtime, row, claims, code, state, error, iss)
    try:  # a console sign-in that fails goes back to the console's sign-in form, in words
        return await _complete(request, runtime, row, claims, code, state, error, iss)
    except CredgateError as exc:
        if exc.status >= 500:
            raise
        audit.note(decision="deny", error=exc.code)
        # A page, not a redirect: on the identity provider's redirect chain no strict cookie
        # (a flash) would be sent along.
        page = pages.render("error.html", status=exc.status, error=exc, me=None, retry="/console/login")
        page.delete_cookie(COOKIE, path=PREFIX, httponly=True, samesite="lax", secure=_secure(runtime))
        return page


async def _complete(request: Request, runtime: Runtime, row: Issuer, claims: dict[str, Any], code: str | None,
                    state: str | None, error: str | None, iss: str | None) -> Response:
    if not state or not hmac.compare_digest(state.encode(), claims["state"].encode()):
        raise _state_invalid("The state does not match the sign-in started in this browser.")
    if iss is not None and iss != row.issuer_url:  # RFC 9207, when the IdP sends it
        raise BadRequest("The authorization response comes from another issuer.", code="login_issuer_mismatch")
    if error is not None:
        shown = error if _ERROR_CODE.match(error) else "error"
        raise BadRequest(f"The identity provider refused the sign-in ({shown}).", code="login_denied")
    if not code:
        raise BadRequest("The callback carries no authorization code.", code="login_code_missing")
    await _consume(runtime, claims)

    doc = await _endpoints(row)
    id_token = await _redeem(runtime, doc, code, claims["cv"])
    try:
        verified = await runtime.issuers.verify(id_token, row)
        check_audience(verified.claims, [runtime.settings.login_client_id or ""])
    except Unauthenticated as exc:
        raise BadRequest(f"The identity provider's id_token was refused: {exc.message}",
                         code="login_id_token_invalid") from None
    audit.note(issuer=verified.issuer, subject=verified.subject, action="auth:console")
    nonce = verified.claims.get("nonce")
    if not isinstance(nonce, str) or not hmac.compare_digest(nonce.encode(), claims["nonce"].encode()):
        raise BadRequest("The id_token's nonce does not match this sign-in.", code="login_nonce_invalid")

    remaining = int(verified.claims.get("exp", 0)) - int(time.time())
    if remaining <= 0:  # inside the issuer's leeway, but nothing left to hand on
        raise BadRequest("The identity provider's id_token has expired.", code="login_id_token_invalid")
    ttl = min(MAX_EXCHANGED_TTL, timedelta(seconds=remaining))
    to_console = claims.get("to") == "console"
    if to_console:
        ttl = min(ttl, timedelta(seconds=runtime.settings.console_session_seconds))
    access = await runtime.tokens.mint_access(
        kind="workload", name=verified.subject, issuer=verified.issuer, roles=verified.roles,
        claims={k: v for k, v in verified.claims.items() if k in EXCHANGED_CLAIMS}, ttl=ttl, source=verified.source,
    )
    if to_console:
        audit.note(details={"console": True})
        page = pages.continue_page(f"Signed in as {verified.subject}.")
        console_session.set_session(page, request, access, int(ttl.total_seconds()))
        page.delete_cookie(COOKIE, path=PREFIX, httponly=True, samesite="lax", secure=_secure(runtime))
        return page
    resp = JSONResponse(
        {"access_token": access, "token_type": "Bearer", "expires_in": int(ttl.total_seconds()),
         "subject": verified.subject, "roles": sorted(verified.roles)},
        headers={"Cache-Control": "no-store", "Pragma": "no-cache", "Referrer-Policy": "no-referrer"},
    )
    resp.delete_cookie(COOKIE, path=PREFIX, httponly=True, samesite="lax", secure=_secure(runtime))
    return resp


@router.post(console_session.KEY_SIGN_IN, summary="Console sign-in (anonymous) with an admin key: sets the console's session cookie",
             status_code=303, include_in_schema=False)
async def console_key(request: Request, runtime: RuntimeDep) -> Response:
    """The sign-in form of ``/console/login``. Any refusal goes back to that form with the
    reason in words (the key itself is never repeated, logged or kept)."""
    audit.note(action="auth:console", details={"method": "admin_key"})
    form = await read_form(request)
    back = RedirectResponse("/console/login", status_code=303)
    try:
        console_session.check_csrf(request, form.one("pre"), request.cookies.get(console_session.PRE_COOKIE))
        key = form.one("key") or ""
        if not key.startswith("cgt_"):
            raise Unauthenticated("That is not an admin key (they begin with cgt_).", code="invalid_token")
        principal = await runtime.authenticator.authenticate(key)
        if principal.kind != "admin_key":
            raise Unauthenticated("That is not an admin key.", code="invalid_token")
    except CredgateError as exc:
        audit.note(decision="deny", details={"error": exc.code})
        text = "That admin key is not valid (or was revoked)." if exc.code == "invalid_token" else exc.message
        console_session.set_flash(back, request, "error", text, exc.code)
        back.status_code = 303
        return back
    ttl = runtime.settings.console_session_seconds
    access = await runtime.tokens.mint_access(
        kind="admin_key", name=principal.name, issuer=GATEWAY, roles=principal.roles, claims={},
        ttl=timedelta(seconds=ttl), source=principal.source,
    )
    audit.note(issuer=principal.issuer, subject=principal.subject, decision="allow")
    done = RedirectResponse("/console", status_code=303)
    console_session.set_session(done, request, access, ttl)
    done.delete_cookie(console_session.PRE_COOKIE, path=console_session.KEY_SIGN_IN, httponly=True, samesite="strict",
                       secure=console_session.secure(request))
    return done
