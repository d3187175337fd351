"""``credgate login``, ``logout`` and ``whoami``: signing an admin in through the identity
provider the gateway names (OAuth2 device flow, RFC 8628), and the profile that keeps the
gateway token (``$CREDGATE_PROFILE``, default ``~/.config/credgate/profile.json``, mode 0600).
Without ``--token`` and ``CREDGATE_TOKEN``, client commands use that token, but only towards
the gateway it was issued by.
"""

from __future__ import annotations

import os
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Annotated, Any

import typer

from gateway.cli.common import GLOBALS, client
from gateway.cli.errors import LoginFailed, UsageProblem
from gateway.cli.profile import load_profile, profile_path, write_profile
from gateway.cli.output import details, emit
from gateway.client.errors import GatewayUnreachable
from gateway.client.urls import DEFAULT_ADDR

if TYPE_CHECKING:
    import httpx


DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ID_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:id_token"
IDP_TIMEOUT = 10.0
MAX_DEVICE_WAIT = 1800  # never poll longer than this, whatever the IdP says


def _oauth_error(resp: httpx.Response) -> str:
    """The RFC 6749 5.2 ``error`` code of a refusal (never its free text: it's the IdP's)."""
    try:
        err = resp.json().get("error")
    except (ValueError, AttributeError):
        err = None
    if isinstance(err, str) and err.replace("_", "").isalnum() and len(err) <= 64:
        return err
    return f"http_{resp.status_code}"


def _idp_json(http: httpx.Client, url: str, what: str, **kwargs: Any) -> dict[str, Any]:
    import httpx

    try:
        resp = http.request("POST" if "data" in kwargs else "GET", url, **kwargs)
    except httpx.TransportError as exc:
        raise LoginFailed("idp_unreachable", f"can't reach the identity provider for {what} ({type(exc).__name__})") from None
    if resp.status_code != 200:
        raise LoginFailed(_oauth_error(resp), f"the identity provider refused {what} (HTTP {resp.status_code})")
    try:
        doc = resp.json()
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        raise LoginFailed("idp_bad_response", f"the identity provider's answer to {what} is not a JSON object")
    return doc


def _seconds(value: Any, default: int) -> int:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else default


def _device_flow(http: httpx.Client, config: dict[str, Any]) -> str:
    """RFC 8628: show the code, poll until approved; returns the IdP's id_token."""
    import httpx

    issuer = config["issuer_url"].rstrip("/")
    disco = _idp_json(http, f"{issuer}/.well-known/openid-configuration", "its discovery document")
    if disco.get("issuer", "").rstrip("/") != issuer:
        raise LoginFailed("idp_bad_response", f"the discovery document of {issuer} names another issuer")
    device_ep, token_ep = disco.get("device_authorization_endpoint"), disco.get("token_endpoint")
    if not (isinstance(device_ep, str) and isinstance(token_ep, str)):
        raise LoginFailed("idp_no_device_flow", f"the identity provider at {issuer} does not offer device sign-in")
    device = _idp_json(
        http, device_ep, "the device authorization", data={"client_id": config["client_id"], "scope": config["scopes"]}
    )
    if not all(isinstance(device.get(k), str) for k in ("device_code", "user_code", "verification_uri")):
        raise LoginFailed("idp_bad_response", "the device authorization lacks device_code, user_code or verification_uri")
    typer.echo(f"To sign in, open {device['verification_uri']} and enter the code: {device['user_code']}", err=True)
    if isinstance(device.get("verification_uri_complete"), str):
        typer.echo(f"(or open {device['verification_uri_complete']})", err=True)
    typer.echo("Waiting for the sign-in to be approved...", err=True)

    interval = max(_seconds(device.get("interval"), 5), 1)
    deadline = time.monotonic() + min(_seconds(device.get("expires_in"), 600), MAX_DEVICE_WAIT)
    form = {"grant_type": DEVICE_GRANT, "device_code": device["device_code"], "client_id": config["client_id"]}
    while True:
        time.sleep(interval)
        if time.monotonic() > deadline:
            raise LoginFailed("expired_token", "the code expired before the sign-in was approved; run `credgate login` again")
        try:
            resp = http.post(token_ep, data=form, headers={"Accept": "application/json"})
        except httpx.TransportError as exc:
            raise LoginFailed("idp_unreachable", f"can't reach the identity provider's token endpoint ({type(exc).__name__})") from None
        if resp.status_code == 200:
            break
        error = _oauth_error(resp)
        if error == "authorization_pending":
            continue
        if error == "slow_down":
            interval += 5  # RFC 8628 3.5
            continue
        if error == "access_denied":
            raise LoginFailed("access_denied", "the sign-in was denied at the identity provider")
        if error == "expired_token":
            raise LoginFailed("expired_token", "the code expired before the sign-in was approved; run `credgate login` again")
        raise LoginFailed(error, "the identity provider refused the sign-in")
    try:
        id_token = resp.json().get("id_token")
    except (ValueError, AttributeError):
        id_token = None
    if not isinstance(id_token, str) or not id_token:
        raise LoginFailed("idp_no_id_token", "the identity provider sent no id_token (is 'openid' among the login scopes?)")
    return id_token


def _exchange(addr: str, id_token: str) -> dict[str, Any]:
    """RFC 8693 at the gateway: the IdP's id_token for a gateway access token."""
    import httpx

    form = {"grant_type": TOKEN_EXCHANGE, "subject_token": id_token, "subject_token_type": ID_TOKEN_TYPE}
    try:
        resp = httpx.post(f"{addr}/v1/auth/token", data=form, timeout=30.0, headers={"User-Agent": "credgate-client"})
    except httpx.TransportError as exc:
        raise GatewayUnreachable(f"can't reach the gateway at {addr} ({type(exc).__name__})") from None
    try:
        body = resp.json()
    except ValueError:
        body = None
    if resp.status_code != 200 or not isinstance(body, dict) or not isinstance(body.get("access_token"), str):
        # The gateway's error_description is written by credgate: safe to show.
        detail = body.get("error_description") if isinstance(body, dict) else None
        raise LoginFailed(_oauth_error(resp), f"the gateway refused the sign-in: {detail or f'HTTP {resp.status_code}'}")
    return body


def login() -> None:
    """Sign in through the gateway's identity provider (device flow); keeps the token in your profile."""
    import httpx

    from gateway.client.http import Client

    target = (GLOBALS.addr or os.environ.get("CREDGATE_ADDR") or DEFAULT_ADDR).rstrip("/")
    with Client(target, token="") as c:
        config = c.get("/v1/auth/login-config")
    with httpx.Client(timeout=IDP_TIMEOUT, follow_redirects=False, headers={"Accept": "application/json"}) as http:
        id_token = _device_flow(http, config)
    out = _exchange(target, id_token)
    expires_at = int(time.time()) + _seconds(out.get("expires_in"), 0)
    with Client(target, token=out["access_token"]) as c:
        me = c.get("/v1/auth/whoami")
    path = write_profile({"addr": target, "access_token": out["access_token"], "expires_at": expires_at})
    until = datetime.fromtimestamp(expires_at, timezone.utc).isoformat(timespec="seconds")
    typer.echo(f"signed in to {target} as {me['subject']} ({', '.join(me['roles']) or 'no roles'}) until {until}")
    typer.echo(f"token kept in {path}", err=True)


def _revoke_sign_in(addr: str, token: str) -> None:
    """RFC 7009 at the gateway that issued it: the token revokes itself (as its own bearer)."""
    import httpx

    keep = "the profile is kept: run `credgate logout` again, or `credgate logout --forget` to only delete it"
    try:
        resp = httpx.post(f"{addr}/v1/auth/revoke", data={"token": token, "token_type_hint": "access_token"},
                          headers={"Authorization": f"Bearer {token}", "User-Agent": "credgate-client"}, timeout=30.0)
    except httpx.TransportError as exc:
        raise LoginFailed("revoke_failed", f"can't reach {addr} to revoke the sign-in ({type(exc).__name__}); {keep}") from None
    if resp.status_code != 200:
        raise LoginFailed(_oauth_error(resp), f"the gateway did not revoke the sign-in (HTTP {resp.status_code}); {keep}")


def logout(
    forget: Annotated[bool, typer.Option(
        "--forget", help="Only delete the profile; the token is not revoked and works until it expires.")] = False,
) -> None:
    """Sign out: revoke the sign-in's token at the gateway, then delete the profile."""
    path = profile_path()
    if not path.exists():
        typer.echo("not signed in")
        return
    try:
        profile = load_profile()
    except UsageProblem:
        profile = None  # not a profile: nothing to revoke, only a file to remove
    revoked = ""
    if profile is not None and not forget:
        expires = profile.get("expires_at")
        if not (isinstance(expires, (int, float)) and expires <= time.time()):
            _revoke_sign_in(profile["addr"].rstrip("/"), profile["access_token"])
            revoked = f"token revoked at {profile['addr']}, "
    path.unlink(missing_ok=True)
    typer.echo(f"signed out: {revoked}removed {path}")


def whoami() -> None:
    """Who the gateway takes you for: kind, subject, issuer, roles."""
    with client() as c:
        out = c.get("/v1/auth/whoami")
    emit(out, lambda o: details(o, [
        ("kind", "kind"), ("subject", "subject"), ("issuer", "issuer"), ("roles", "roles"),
        *([("run", "run_id")] if o.get("run_id") else []),
    ]))
