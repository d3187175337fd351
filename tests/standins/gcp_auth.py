"""A STAND-IN for Google's token services and a sliver of Cloud Storage, for tests only.

This is not Google: no GCP service can run on this machine. It re-implements, from Google's
public references, what credgate's ``gcp`` connector calls, served over real HTTP on
127.0.0.1 (uvicorn in a thread) so the connector and the tests' vendor client (google-auth:
``service_account.Credentials``, ``google.oauth2.sts.Client``, ``AuthorizedSession``) speak
to it unchanged. Everything it is handed is VERIFIED, never assumed:

- ``POST /token``, the OAuth 2.0 JWT-bearer grant (RFC 7523) a service-account key's
  ``token_uri`` receives: ``grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer``; the
  ``assertion`` must be RS256-signed by a registered key of the account its ``iss`` names
  (header ``kid`` = the key's ``private_key_id``), with ``aud`` Google's token URL (what
  google-auth always sends) or this server's, a ``sub`` absent or equal to ``iss`` (another
  ``sub`` is domain-wide delegation: refused), a non-empty ``scope``, a live ``exp`` at most an
  hour after ``iat``. Answers an opaque access token living an hour, or 400 ``invalid_grant``.
- ``POST /v1/projects/-/serviceAccounts/{email}:generateAccessToken`` (IAM Credentials API):
  the caller's ``Authorization: Bearer`` must be a live token this server issued, without an
  access boundary, with the cloud-platform scope; its principal must hold
  ``roles/iam.serviceAccountTokenCreator`` on the target (:meth:`GCPAuthStandIn.grant_token_creator`;
  members ``serviceAccount:EMAIL``, ``principal://iam.googleapis.com/projects/N/locations/global/
  workloadIdentityPools/P/subject/SUB`` or ``principalSet://.../workloadIdentityPools/P/*``).
  Body ``{"scope": [...], "lifetime": "<n>s"}``; the lifetime (default and maximum 3600 s) is
  honoured: ``{"accessToken", "expireTime"}``. Errors in Google's JSON shape (401/403/400/404).
- ``POST /v1/token`` (Security Token Service, RFC 8693 token exchange):
  (a) Credential Access Boundary downscoping: ``subject_token_type`` access_token, the subject
  a live token this server issued, ``options`` the URL-quoted JSON access boundary exactly as
  google-auth's ``sts.Client`` sends it; each rule's ``availableResource`` must be
  ``//storage.googleapis.com/projects/_/buckets/BUCKET`` and its permissions
  ``inRole:roles/storage.*``; the new token keeps the subject's principal and expiry and
  remembers its boundary (downscoping a downscoped token intersects the boundaries).
  (b) Workload identity federation: ``subject_token_type`` jwt (or id_token), ``audience`` a
  registered provider's resource name (:meth:`GCPAuthStandIn.add_provider`). The JWT is verified as
  Google does for an OIDC provider: keys from ``{issuer}/.well-known/openid-configuration`` and
  its ``jwks_uri`` (the provider's configured issuer, not whatever the token claims), RS256
  signature, ``iss`` = that issuer, ``aud`` one of the provider's allowed audiences (none configured:
  the provider's resource name with or without an ``https:`` prefix, as Google defaults), live ``exp`` (a minute's
  leeway), ``iat`` not in the future; attribute mapping ``google.subject = assertion.sub`` (at
  most 127 bytes, else refused) and an optional attribute condition (a predicate on the claims).
  The federated token's principal is ``principal://.../subject/SUB``; it lives at most an hour
  and never beyond the JWT's ``exp``. Errors are OAuth-shaped ``{"error", "error_description"}``.
- Cloud Storage JSON API: ``GET /storage/v1/b?project=P`` (needs an unbounded token: no access
  boundary can grant ``storage.buckets.list``) and ``GET /storage/v1/b/{bucket}/o`` (list
  objects): a live token of ours; one with a boundary is admitted only for a bucket its
  boundary names with a role granting ``storage.objects.list``; an unbounded one for a bucket
  whose readers include its principal (default: every principal).

What passed and failed is counted in :attr:`GCPAuthStandIn.calls` and
:attr:`GCPAuthStandIn.rejected` (reasons, never tokens).

Not implemented: delegation chains (``delegates``), ``generateIdToken``/``signJwt``, STS
``actor_token``, SAML/AWS providers, CAB availability conditions (refused as unsupported),
token introspection, object uploads, IAM policy APIs (bindings are set with the helpers).
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, unquote

import httpx
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from tests.standins.gcp_secretmanager import make_service_account_key
from tests.standins.serving import Served

__all__ = ["GCPAuthStandIn", "CLOUD_PLATFORM", "GOOGLE_TOKEN_URL", "ROLE_PERMISSIONS", "make_service_account_key"]

GOOGLE_TOKEN_URL = "https://oauth2.googleapis.com/token"
CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
TT_ACCESS = "urn:ietf:params:oauth:token-type:access_token"
TT_JWT = "urn:ietf:params:oauth:token-type:jwt"
TT_ID = "urn:ietf:params:oauth:token-type:id_token"
BUCKET_RESOURCE = re.compile(r"^//storage\.googleapis\.com/projects/_/buckets/([a-z0-9][a-z0-9._-]{1,221}[a-z0-9])$")
PROVIDER = re.compile(
    r"^//iam\.googleapis\.com/projects/(\d+)/locations/global/workloadIdentityPools/([a-z0-9-]{4,32})"
    r"/providers/([a-z0-9-]{4,32})$"
)
ROLE_PERMISSIONS: dict[str, frozenset[str]] = {
    "roles/storage.objectViewer": frozenset({"storage.objects.get", "storage.objects.list"}),
    "roles/storage.objectCreator": frozenset({"storage.objects.create"}),
    "roles/storage.objectAdmin": frozenset({
        "storage.objects.get", "storage.objects.list", "storage.objects.create", "storage.objects.delete",
        "storage.objects.update",
    }),
    "roles/storage.legacyBucketReader": frozenset({"storage.buckets.get", "storage.objects.list"}),
}
LEEWAY = 60
MAX_LIFETIME = 3600
MAX_SUBJECT_BYTES = 127


class _Refused(Exception):
    def __init__(self, status: int, body: dict[str, Any], reason: str) -> None:
        super().__init__(reason)
        self.status, self.body, self.reason = status, body, reason


def _google_error(code: int, message: str) -> _Refused:
    status = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND"}[code]
    return _Refused(code, {"error": {"code": code, "message": message, "status": status}}, f"{code} {message}")


def _oauth_error(error: str, description: str, status: int = 400) -> _Refused:
    return _Refused(status, {"error": error, "error_description": description}, f"{error}: {description}")


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass
class _Token:
    principal: str  # serviceAccount:EMAIL or principal://.../subject/SUB
    expires: float
    scopes: frozenset[str]
    boundary: dict[str, frozenset[str]] | None = None  # bucket -> permissions; None: unbounded
    kind: str = "access"  # access | federated | downscoped


@dataclass
class _Provider:
    name: str
    issuer: str
    audiences: frozenset[str]
    condition: Callable[[dict[str, Any]], bool] | None = None
    keys: KeySet | None = None


@dataclass
class _Bucket:
    name: str
    project: str
    objects: dict[str, bytes] = field(default_factory=dict)
    readers: frozenset[str] | None = None  # principals with objectViewer; None: everyone


class GCPAuthStandIn:
    """Google's OAuth2 token endpoint, IAM Credentials, STS and a sliver of GCS; see the module docstring.

    ``start()`` blocks until the server answers; ``stop()`` ends it. Tests configure it with
    :meth:`add_service_account`, :meth:`grant_token_creator`, :meth:`add_provider` and
    :meth:`add_bucket`."""

    host = "127.0.0.1"

    def __init__(self, project: str = "credgate-test", project_number: str = "424242424242") -> None:
        self.project = project
        self.project_number = project_number
        self._served = Served(self._asgi, "GCP auth stand-in")
        self._keys: dict[str, dict[str, rsa.RSAPublicKey]] = {}  # email -> kid -> public key
        self._creators: dict[str, set[str]] = {}  # target email -> members with tokenCreator
        self._tokens: dict[str, _Token] = {}
        self._providers: dict[str, _Provider] = {}
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.RLock()
        self.calls: dict[str, int] = {}
        self.rejected: list[str] = []
        self.accepted_claims: list[dict[str, Any]] = []  # verified federation JWT claims
        self.lifetimes: list[int] = []  # generateAccessToken lifetimes granted, seconds

    # --- lifecycle ---------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._served.port

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def token_uri(self) -> str:
        return f"{self.endpoint}/token"

    def start(self) -> GCPAuthStandIn:
        self._served.start()
        return self

    def stop(self) -> None:
        self._served.stop()

    def __enter__(self) -> GCPAuthStandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- configuration (what an admin does in the console) --------------------------------

    def add_service_account(self, email: str | None = None) -> dict[str, str]:
        """A service account (or a new key of one) whose key's ``token_uri`` is this server: the key file as a dict."""
        email = email or f"sa-{secrets.token_hex(4)}@{self.project}.iam.gserviceaccount.com"
        info, public = make_service_account_key(email, self.project, self.token_uri)
        with self._lock:
            self._keys.setdefault(email, {})[info["private_key_id"]] = public
        return info

    def grant_token_creator(self, target: str, member: str) -> None:
        """``roles/iam.serviceAccountTokenCreator`` on service account ``target`` for ``member``."""
        with self._lock:
            self._creators.setdefault(target, set()).add(member)

    def add_provider(
        self, pool: str, provider: str, issuer: str, *, audiences: Iterable[str] = (),
        condition: Callable[[dict[str, Any]], bool] | None = None,
    ) -> str:
        """A workload identity pool OIDC provider trusting ``issuer``; returns its resource name
        (``//iam.googleapis.com/projects/N/locations/global/workloadIdentityPools/POOL/providers/PROV``)."""
        name = (f"//iam.googleapis.com/projects/{self.project_number}/locations/global/"
                f"workloadIdentityPools/{pool}/providers/{provider}")
        with self._lock:
            # No allowed audiences configured: Google accepts the provider's full canonical
            # resource name, with or without the https: prefix.
            default = frozenset({name, "https:" + name})
            self._providers[name] = _Provider(name, issuer.rstrip("/"), frozenset(audiences) or default, condition)
        return name

    def pool_principal(self, pool: str, subject: str) -> str:
        return (f"principal://iam.googleapis.com/projects/{self.project_number}/locations/global/"
                f"workloadIdentityPools/{pool}/subject/{subject}")

    def pool_principal_set(self, pool: str) -> str:
        return (f"principalSet://iam.googleapis.com/projects/{self.project_number}/locations/global/"
                f"workloadIdentityPools/{pool}/*")

    def add_bucket(self, name: str, objects: dict[str, bytes] | None = None, *, readers: Iterable[str] | None = None) -> None:
        with self._lock:
            self._buckets[name] = _Bucket(name, self.project, dict(objects or {}),
                                          None if readers is None else frozenset(readers))

    def token_info(self, token: str) -> _Token | None:
        """What this server remembers about an access token it issued (for tests to look behind)."""
        with self._lock:
            return self._tokens.get(token)

    # --- HTTP ------------------------------------------------------------------------------

    async def _asgi(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        query = {k: v[-1] for k, v in parse_qs(scope.get("query_string", b"").decode()).items()}
        try:
            status, payload = await self._dispatch(scope["method"], scope["path"], query, headers, body)
        except _Refused as refused:
            with self._lock:
                self.rejected.append(refused.reason)
            status, payload = refused.status, refused.body
        raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        ctype = b"application/octet-stream" if isinstance(payload, bytes) else b"application/json; charset=UTF-8"
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", ctype), (b"content-length", str(len(raw)).encode())]})
        await send({"type": "http.response.body", "body": raw})

    def _count(self, name: str) -> None:
        with self._lock:
            self.calls[name] = self.calls.get(name, 0) + 1

    async def _dispatch(
        self, method: str, path: str, query: dict[str, str], headers: dict[str, str], body: bytes
    ) -> tuple[int, Any]:
        if method == "POST" and path == "/token":
            self._count("token")
            return 200, self._jwt_bearer(_form(body))
        if method == "POST" and path == "/v1/token":
            self._count("sts")
            return 200, await self._sts(_form(body))
        m = re.fullmatch(r"/v1/projects/([^/]+)/serviceAccounts/([^/:]+):generateAccessToken", path)
        if method == "POST" and m:
            self._count("generateAccessToken")
            return 200, self._generate_access_token(unquote(m.group(2)), headers, body)
        if method == "GET" and path == "/storage/v1/b":
            self._count("buckets.list")
            return 200, self._list_buckets(query, headers)
        m = re.fullmatch(r"/storage/v1/b/([^/]+)/o", path)
        if method == "GET" and m:
            self._count("objects.list")
            return 200, self._list_objects(unquote(m.group(1)), headers)
        raise _google_error(404, f"No route {method} {path}.")

    # --- OAuth2 JWT-bearer ------------------------------------------------------------------

    def _jwt_bearer(self, form: dict[str, str]) -> dict[str, Any]:
        if form.get("grant_type") != JWT_BEARER:
            raise _oauth_error("unsupported_grant_type", "Invalid grant_type.")
        assertion = form.get("assertion", "")
        try:
            head_b64, claims_b64, sig_b64 = assertion.split(".")
            header = json.loads(_b64url_decode(head_b64))
            claims = json.loads(_b64url_decode(claims_b64))
            signature = _b64url_decode(sig_b64)
        except ValueError:
            raise _oauth_error("invalid_grant", "Invalid JWT: the assertion is not a JWS.") from None
        if header.get("alg") != "RS256":
            raise _oauth_error("invalid_grant", "Invalid JWT: only RS256 is accepted.")
        iss = claims.get("iss")
        with self._lock:
            public = self._keys.get(iss, {}).get(header.get("kid", ""))
        if public is None:
            raise _oauth_error("invalid_grant", "Invalid JWT Signature.")  # Google's answer to an unknown key too
        try:
            public.verify(signature, f"{head_b64}.{claims_b64}".encode(), padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            raise _oauth_error("invalid_grant", "Invalid JWT Signature.") from None
        if claims.get("sub") not in (None, iss):
            raise _oauth_error("unauthorized_client", "Client is unauthorized to retrieve access tokens using this method.")
        if claims.get("aud") not in (GOOGLE_TOKEN_URL, self.token_uri):
            raise _oauth_error("invalid_grant", "Invalid JWT: the audience is not the token endpoint.")
        now = time.time()
        iat, exp = claims.get("iat"), claims.get("exp")
        if not isinstance(iat, int) or not isinstance(exp, int) or exp < now - LEEWAY or iat > now + LEEWAY:
            raise _oauth_error("invalid_grant", "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe.")
        if exp - iat > MAX_LIFETIME:
            raise _oauth_error("invalid_grant", "Invalid JWT: Token must be a short-lived token (60 minutes).")
        scopes = frozenset(str(claims.get("scope", "")).split())
        if not scopes:
            raise _oauth_error("invalid_scope", "Invalid OAuth scope or ID token audience provided.")
        token = self._mint(_Token(f"serviceAccount:{iss}", now + MAX_LIFETIME, scopes))
        return {"access_token": token, "expires_in": MAX_LIFETIME - 1, "token_type": "Bearer"}

    def _mint(self, info: _Token) -> str:
        token = "ya29.standin-" + secrets.token_urlsafe(32)
        with self._lock:
            self._tokens[token] = info
        return token

    def _bearer(self, headers: dict[str, str]) -> _Token:
        auth = headers.get("authorization", "")
        if not auth.startswith("Bearer "):
            raise _google_error(401, "Request is missing required authentication credential.")
        with self._lock:
            info = self._tokens.get(auth[7:])
        if info is None or info.expires < time.time():
            raise _google_error(401, "Request had invalid authentication credentials.")
        return info

    # --- IAM Credentials --------------------------------------------------------------------

    def _generate_access_token(self, target: str, headers: dict[str, str], body: bytes) -> dict[str, Any]:
        caller = self._bearer(headers)
        if caller.boundary is not None or CLOUD_PLATFORM not in caller.scopes:
            raise _google_error(403, "Request had insufficient authentication scopes.")
        with self._lock:
            members = set(self._creators.get(target, ()))
            known = target in self._keys
        allowed = caller.principal in members or any(
            m.endswith("/*") and m.startswith("principalSet://")
            and caller.principal.startswith("principal://" + m[len("principalSet://"):-1] + "subject/")
            for m in members
        )
        if not allowed or not known:
            raise _google_error(403, "Permission 'iam.serviceAccounts.getAccessToken' denied on resource (or it may not exist).")
        try:
            request = json.loads(body or b"{}")
            scopes = request["scope"]
            lifetime = request.get("lifetime", f"{MAX_LIFETIME}s")
            seconds = float(lifetime[:-1]) if isinstance(lifetime, str) and lifetime.endswith("s") else None
        except (ValueError, KeyError, TypeError):
            raise _google_error(400, "Invalid request: scope is required.") from None
        if not isinstance(scopes, list) or not scopes or not all(isinstance(s, str) for s in scopes):
            raise _google_error(400, "Scope must not be empty.")
        if seconds is None or not 1 <= seconds <= MAX_LIFETIME:
            raise _google_error(400, f"The lifetime must be between 1s and {MAX_LIFETIME}s.")
        expires = time.time() + seconds
        token = self._mint(_Token(f"serviceAccount:{target}", expires, frozenset(scopes)))
        with self._lock:
            self.lifetimes.append(int(seconds))
        expire_time = datetime.fromtimestamp(expires, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return {"accessToken": token, "expireTime": expire_time}

    # --- STS ----------------------------------------------------------------------------------

    async def _sts(self, form: dict[str, str]) -> dict[str, Any]:
        if form.get("grant_type") != TOKEN_EXCHANGE:
            raise _oauth_error("unsupported_grant_type", "Unsupported grant type.")
        if form.get("requested_token_type") != TT_ACCESS:
            raise _oauth_error("invalid_request", "Invalid requested_token_type.")
        kind = form.get("subject_token_type")
        if kind == TT_ACCESS:
            return self._downscope(form)
        if kind in (TT_JWT, TT_ID):
            return await self._federate(form)
        raise _oauth_error("invalid_request", "Invalid subject_token_type.")

    def _downscope(self, form: dict[str, str]) -> dict[str, Any]:
        with self._lock:
            subject = self._tokens.get(form.get("subject_token", ""))
        now = time.time()
        if subject is None or subject.expires < now:
            raise _oauth_error("invalid_grant", "The subject token is invalid or expired.")
        try:
            options = json.loads(unquote(form["options"]))
            rules = options["accessBoundary"]["accessBoundaryRules"]
            assert isinstance(rules, list) and 1 <= len(rules) <= 10
        except (KeyError, ValueError, TypeError, AssertionError):
            raise _oauth_error("invalid_request", "The options must hold an accessBoundary with 1-10 rules.") from None
        boundary: dict[str, frozenset[str]] = {}
        for rule in rules:
            m = BUCKET_RESOURCE.match(str(rule.get("availableResource", "")))
            perms = rule.get("availablePermissions")
            if not m or not isinstance(perms, list) or not perms:
                raise _oauth_error("invalid_request", "A rule needs a bucket availableResource and availablePermissions.")
            if rule.get("availabilityCondition"):
                raise _oauth_error("invalid_request", "availabilityCondition is not supported by this stand-in.")
            granted: set[str] = set()
            for perm in perms:
                role = perm[len("inRole:"):] if isinstance(perm, str) and perm.startswith("inRole:") else None
                if role not in ROLE_PERMISSIONS:
                    raise _oauth_error("invalid_request", "availablePermissions must be inRole: a storage role.")
                granted |= ROLE_PERMISSIONS[role]
            boundary[m.group(1)] = boundary.get(m.group(1), frozenset()) | granted
        if subject.boundary is not None:  # downscoping again can only narrow
            boundary = {b: p & subject.boundary[b] for b, p in boundary.items() if b in subject.boundary}
        token = self._mint(_Token(subject.principal, subject.expires, subject.scopes, boundary, "downscoped"))
        return {"access_token": token, "issued_token_type": TT_ACCESS, "token_type": "Bearer",
                "expires_in": int(subject.expires - now)}

    async def _federate(self, form: dict[str, str]) -> dict[str, Any]:
        with self._lock:
            provider = self._providers.get(form.get("audience", ""))
        if provider is None:
            raise _oauth_error("invalid_target", "The target service indicated by the \"audience\" parameters is invalid.")
        token = form.get("subject_token", "")
        try:
            kid = json.loads(_b64url_decode(token.split(".")[0])).get("kid")  # unverified: only to find the key
        except Exception:  # noqa: BLE001 - anything unparsable is a bad token
            raise _oauth_error("invalid_grant", "The subject token is not a JWT.") from None
        try:
            keys = await self._provider_keys(provider, kid)
            claims = jwt.decode(token, keys, algorithms=["RS256"]).claims
        except (JoseError, ValueError, KeyError, httpx.HTTPError):
            raise _oauth_error("invalid_grant", "Invalid JWT signature.") from None
        now = time.time()
        if str(claims.get("iss", "")).rstrip("/") != provider.issuer:
            raise _oauth_error("invalid_grant", "The issuer in ID Token does not match the expected issuer.")
        aud = claims.get("aud")
        auds = set(aud) if isinstance(aud, list) else {aud}
        if not auds & provider.audiences:
            raise _oauth_error("invalid_grant", "The audience in ID Token does not match the expected audience.")
        exp, iat = claims.get("exp"), claims.get("iat")
        if not isinstance(exp, int) or exp < now - LEEWAY:
            raise _oauth_error("invalid_grant", "ID Token has expired.")
        if not isinstance(iat, int) or iat > now + LEEWAY:
            raise _oauth_error("invalid_grant", "ID Token issued at a future time.")
        subject = claims.get("sub")  # attribute mapping: google.subject = assertion.sub
        if not isinstance(subject, str) or not subject:
            raise _oauth_error("invalid_grant", "The mapped google.subject is empty.")
        if len(subject.encode()) > MAX_SUBJECT_BYTES:
            raise _oauth_error("invalid_grant", "The mapped google.subject exceeds 127 bytes.")
        if provider.condition is not None and not provider.condition(dict(claims)):
            raise _oauth_error("unauthorized_client", "The given credential is rejected by the attribute condition.")
        pool = provider.name.split("/workloadIdentityPools/")[1].split("/")[0]
        scopes = frozenset(form.get("scope", "").split()) or frozenset({CLOUD_PLATFORM})
        expires = min(now + MAX_LIFETIME, float(exp))
        federated = self._mint(_Token(self.pool_principal(pool, subject), expires, scopes, None, "federated"))
        with self._lock:
            self.accepted_claims.append(dict(claims))
        return {"access_token": federated, "issued_token_type": TT_ACCESS, "token_type": "Bearer",
                "expires_in": int(expires - now)}

    async def _provider_keys(self, provider: _Provider, kid: str | None) -> KeySet:
        """The issuer's keys as Google fetches them: discovery, then ``jwks_uri`` (again for an unseen ``kid``)."""
        if provider.keys is not None and (kid is None or any(k.kid == kid for k in provider.keys.keys)):
            return provider.keys
        async with httpx.AsyncClient(timeout=5) as client:
            doc = (await client.get(f"{provider.issuer}/.well-known/openid-configuration")).raise_for_status().json()
            if str(doc.get("issuer", "")).rstrip("/") != provider.issuer:
                raise ValueError("the discovery document names another issuer")
            keys = KeySet.import_key_set((await client.get(doc["jwks_uri"])).raise_for_status().json())
        provider.keys = keys
        return keys

    # --- Cloud Storage -------------------------------------------------------------------------

    def _list_buckets(self, query: dict[str, str], headers: dict[str, str]) -> dict[str, Any]:
        caller = self._bearer(headers)
        if caller.boundary is not None:
            raise _google_error(403, "The caller does not have storage.buckets.list access to the Google Cloud project.")
        if query.get("project") not in (self.project, self.project_number):
            raise _google_error(404, "The requested project was not found.")
        with self._lock:
            items = [{"kind": "storage#bucket", "name": b.name, "id": b.name}
                     for b in sorted(self._buckets.values(), key=lambda b: b.name)
                     if b.readers is None or caller.principal in b.readers]
        return {"kind": "storage#buckets", "items": items}

    def _list_objects(self, bucket: str, headers: dict[str, str]) -> dict[str, Any]:
        caller = self._bearer(headers)
        denied = f"{caller.principal.split(':', 1)[-1]} does not have storage.objects.list access to the Google Cloud Storage bucket."
        if caller.boundary is not None:
            if "storage.objects.list" not in caller.boundary.get(bucket, frozenset()):
                raise _google_error(403, denied)
        with self._lock:
            b = self._buckets.get(bucket)
            if b is not None and b.readers is not None and caller.principal not in b.readers:
                raise _google_error(403, denied)
            if b is None:
                raise _google_error(404, "The specified bucket does not exist.")
            items = [{"kind": "storage#object", "name": n, "bucket": bucket, "size": str(len(d))}
                     for n, d in sorted(b.objects.items())]
        return {"kind": "storage#objects", "items": items}


def _form(body: bytes) -> dict[str, str]:
    """An ``application/x-www-form-urlencoded`` body (last value of each field)."""
    return {k: v[-1] for k, v in parse_qs(body.decode(), keep_blank_values=True).items()}
