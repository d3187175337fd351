"""A STAND-IN for what AWS STS does with a web-identity token, in front of moto.

This is not AWS. moto serves STS in server mode here, but its ``AssumeRoleWithWebIdentity``
does not look at the token at all (../shared/TESTING-NOTES.md), so a test against moto alone
would pass with any string. This server sits in front of moto and does, for
``Action=AssumeRoleWithWebIdentity``, what AWS documents for an IAM OIDC identity provider
(IAM User Guide, "Create an OpenID Connect (OIDC) identity provider in IAM" and
"AssumeRoleWithWebIdentity"), before forwarding the request to moto unchanged:

- the provider must be registered (:meth:`register_provider`: its issuer URL, its client IDs
  i.e. audiences); the token's ``iss`` names it;
- the issuer's keys are fetched as AWS fetches them: ``{iss}/.well-known/openid-configuration``,
  then its ``jwks_uri`` (cached per provider; fetched again for a ``kid`` it has not seen);
- the token's signature (RS256) with the key its ``kid`` names, ``aud`` among the client IDs,
  ``exp``/``nbf``/``iat`` with a minute's leeway, a ``sub``;
- the role's trust policy condition, as AWS evaluates ``StringLike`` on ``{issuer}:sub`` and
  ``StringEquals`` on ``{issuer}:aud`` (:meth:`trust`: role ARN -> allowed sub patterns).

A token that fails is answered as STS answers: HTTP 400 with an ``ErrorResponse`` whose code is
``InvalidIdentityToken`` (signature, issuer, audience, expiry) or ``AccessDenied`` (the trust
condition), and moto never sees it. Every other request is forwarded as it is. What passed
is kept in :attr:`accepted` (the decoded claims), what failed in :attr:`rejected` (the codes).
"""

from __future__ import annotations

import fnmatch
import json
import threading
import time
from typing import Any
from urllib.parse import parse_qs

import httpx
from joserfc import jws, jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from tests.standins.serving import Served

LEEWAY = 60


def _error(code: str, message: str, status: int = 400) -> tuple[int, bytes]:
    body = (
        '<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error><Type>Sender</Type>'
        f"<Code>{code}</Code><Message>{message}</Message></Error><RequestId>standin</RequestId></ErrorResponse>"
    )
    return status, body.encode()


class StsOidcStandIn:
    """The stand-in as a real HTTP server on 127.0.0.1 (uvicorn in a thread), forwarding to ``upstream``."""

    host = "127.0.0.1"

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self._served = Served(self._asgi, "STS OIDC stand-in")
        self.providers: dict[str, set[str]] = {}  # issuer URL -> client IDs (audiences)
        self.trusts: dict[str, tuple[str, list[str]]] = {}  # role ARN -> (issuer, allowed sub patterns)
        self._keys: dict[str, KeySet] = {}
        self._client: httpx.AsyncClient | None = None
        self.accepted: list[dict[str, Any]] = []
        self.rejected: list[str] = []
        self.why = ""  # why the last token failed verification (for a failing test's message)
        self._lock = threading.Lock()

    @property
    def port(self) -> int:
        return self._served.port

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def register_provider(self, issuer: str, client_ids: list[str]) -> None:
        self.providers[issuer.rstrip("/")] = set(client_ids)

    def trust(self, role_arn: str, issuer: str, subjects: list[str]) -> None:
        self.trusts[role_arn] = (issuer.rstrip("/"), subjects)

    # --- lifecycle -----------------------------------------------------------------

    def start(self) -> StsOidcStandIn:
        self._served.start()
        return self

    def stop(self) -> None:
        self._served.stop()

    # --- the checks ------------------------------------------------------------------

    async def _jwks(self, issuer: str, kid: str | None) -> KeySet:
        keys = self._keys.get(issuer)
        if keys is not None and (kid is None or any(k.kid == kid for k in keys.keys)):
            return keys
        async with httpx.AsyncClient(timeout=5) as client:  # once per issuer and new kid: not the hot path
            doc = (await client.get(f"{issuer}/.well-known/openid-configuration")).raise_for_status().json()
            if doc.get("issuer", "").rstrip("/") != issuer:
                raise ValueError("the discovery document names another issuer")
            keys = KeySet.import_key_set((await client.get(doc["jwks_uri"])).raise_for_status().json())
        self._keys[issuer] = keys
        return keys

    async def _check(self, form: dict[str, str]) -> tuple[int, bytes] | None:
        token, role = form.get("WebIdentityToken", ""), form.get("RoleArn", "")
        try:
            compact = jws.extract_compact(token.encode())  # unverified: only to find the issuer and key
            header, unverified = dict(compact.headers()), json.loads(compact.payload)
        except Exception:  # noqa: BLE001
            return self._reject("InvalidIdentityToken", "The token is not a JWT.")
        issuer = str(unverified.get("iss", "")).rstrip("/")
        if issuer not in self.providers:
            return self._reject("InvalidIdentityToken", "No OpenIDConnect provider found for the issuer.")
        try:
            keys = await self._jwks(issuer, header.get("kid"))
            claims = jwt.decode(token, keys, algorithms=["RS256"]).claims
        except (JoseError, ValueError, KeyError, httpx.HTTPError) as exc:
            self.why = f"{type(exc).__name__}: {exc}"
            return self._reject("InvalidIdentityToken", "The token's signature could not be verified.")
        now = time.time()
        aud = claims.get("aud")
        auds = set(aud) if isinstance(aud, list) else {aud}
        if not auds & self.providers[issuer]:
            return self._reject("InvalidIdentityToken", "Incorrect token audience.")
        if not isinstance(claims.get("exp"), int) or claims["exp"] < now - LEEWAY:
            return self._reject("ExpiredTokenException", "Token is expired.")
        if isinstance(claims.get("nbf"), int) and claims["nbf"] > now + LEEWAY:
            return self._reject("InvalidIdentityToken", "Token is not yet valid.")
        sub = claims.get("sub")
        trusted = self.trusts.get(role)
        if (not isinstance(sub, str) or trusted is None or trusted[0] != issuer
                or not any(fnmatch.fnmatchcase(sub, p) for p in trusted[1])):
            return self._reject("AccessDenied", "Not authorized to perform sts:AssumeRoleWithWebIdentity", 403)
        with self._lock:
            self.accepted.append(dict(claims))
        return None

    def _reject(self, code: str, message: str, status: int = 400) -> tuple[int, bytes]:
        with self._lock:
            self.rejected.append(code)
        return _error(code, message, status)

    # --- ASGI --------------------------------------------------------------------------

    async def _asgi(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        form = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}
        failure = await self._check(form) if form.get("Action") == "AssumeRoleWithWebIdentity" else None
        if failure is not None:
            status, out = failure
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", b"text/xml")]})
            await send({"type": "http.response.body", "body": out})
            return
        url = self.upstream + scope["path"] + (("?" + scope["query_string"].decode()) if scope["query_string"] else "")
        if self._client is None:  # one client, on the server's own event loop
            self._client = httpx.AsyncClient(timeout=30)
        resp = await self._client.request(scope["method"], url, content=body,
                                          headers=[(k, v) for k, v in headers if k.lower() not in ("host", "content-length")])
        await send({"type": "http.response.start", "status": resp.status_code,
                    "headers": [(k.encode(), v.encode()) for k, v in resp.headers.items()
                                if k.lower() not in ("content-length", "transfer-encoding", "content-encoding")]})
        await send({"type": "http.response.body", "body": resp.content})
