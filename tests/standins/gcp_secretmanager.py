"""A STAND-IN for Google Cloud Secret Manager (API v1, REST) and Google's OAuth2 token
endpoint, for tests only. It is not Google's service: GCP can't run on this machine, so
this module re-implements, from Google's public REST reference, the part of the API that
credgate's ``gcp`` backend and its tests use, and serves it over real HTTP on 127.0.0.1 so
the backend is driven through the real ``google-cloud-secret-manager`` SDK (REST transport,
``api_endpoint`` override) and the real ``google-auth`` credentials.

REST methods implemented (paths under ``/v1/``; ``{project}`` is the project id or its
number, answers name the project by number, as Google does):

- ``projects.secrets``: ``create`` (``POST projects/{p}/secrets?secretId=``), ``get``,
  ``list`` (``pageSize``, ``pageToken``, ``filter``; sorted by name), ``delete`` (with an
  optional ``etag`` precondition), ``patch`` (``updateMask`` of ``labels``/``annotations``),
  ``addVersion``, ``testIamPermissions``.
- ``projects.secrets.versions``: ``get``, ``list`` (paged, newest first), ``access``
  (a number or ``latest``), ``disable``, ``enable``, ``destroy``.
- The resources ``Secret`` (name, replication ``automatic``, createTime, labels,
  annotations, etag) and ``SecretVersion`` (name, createTime, destroyTime, state
  ``ENABLED``/``DISABLED``/``DESTROYED``, etag); payloads up to 64 KiB.
- Errors in Google's shape ``{"error": {"code", "message", "status"}}``:
  400 INVALID_ARGUMENT / FAILED_PRECONDITION, 401 UNAUTHENTICATED, 403 PERMISSION_DENIED
  (checked before existence, so a caller without a permission can't probe names), 404
  NOT_FOUND, 409 ALREADY_EXISTS / ABORTED (etag mismatch).

Filters (``list``): terms joined by whitespace or ``AND``, alternatives by ``OR``; a term is
``name:TEXT`` (substring of the full name), ``labels.KEY=VALUE``, ``labels.KEY:VALUE`` or
``labels.KEY:*`` (present), optionally negated with ``NOT`` or ``-``.
Anything else is 400 INVALID_ARGUMENT.

Credentials are verified, never assumed:

- ``POST /token``: the OAuth2 JWT-bearer grant (RFC 7523) a service-account key's
  ``token_uri`` receives. The assertion must be RS256-signed by a registered key of the
  account named by ``iss`` (header ``kid`` = the key's ``private_key_id``), with
  ``aud`` = Google's token URL (or this stand-in's), a ``scope``, and a live ``exp``
  at most an hour after ``iat``. It answers an opaque access token (an hour), or
  ``400 {"error": "invalid_grant", ...}`` as Google does.
- API calls need ``Authorization: Bearer``: an access token issued above, or a
  self-signed service-account JWT (what the SDK sends when handed service-account
  credentials: ``aud`` = ``https://secretmanager.googleapis.com/`` or a ``scope``
  including cloud-platform, ``iss`` = ``sub`` = the account, same key checks).
  Anything else is 401 UNAUTHENTICATED.
- Permissions: each service account has a set of ``secretmanager.*`` IAM permissions
  (:data:`ALL_PERMISSIONS`, or e.g. :data:`READ_PERMISSIONS`); a call without its
  permission is 403 PERMISSION_DENIED.

Not implemented: locations/regional secrets, replication policies other than automatic,
rotation, topics, expiry/TTL, version aliases other than ``latest``, CMEK, IAM policies
(get/set), Pub/Sub. ``latest`` means the newest version, as in Google's API: if it is
disabled, access fails with FAILED_PRECONDITION.

Use::

    sm = GCPSecretManagerStandIn()
    sm.start()
    key = sm.add_service_account("app@credgate-test.iam.gserviceaccount.com")  # key JSON (dict)
    ...
    sm.stop()
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from tests.standins.serving import Served

__all__ = [
    "ALL_PERMISSIONS", "API_AUDIENCE", "GCPSecretManagerStandIn", "READ_PERMISSIONS", "make_service_account_key",
]

API_AUDIENCE = "https://secretmanager.googleapis.com/"
GOOGLE_TOKEN_URL = "https://oauth2.googleapis.com/token"
CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"
MAX_PAYLOAD = 64 * 1024
MAX_PAGE_SIZE = 25_000

ALL_PERMISSIONS = frozenset({
    "secretmanager.secrets.create", "secretmanager.secrets.get", "secretmanager.secrets.list",
    "secretmanager.secrets.update", "secretmanager.secrets.delete",
    "secretmanager.versions.add", "secretmanager.versions.get", "secretmanager.versions.list",
    "secretmanager.versions.access", "secretmanager.versions.enable", "secretmanager.versions.disable",
    "secretmanager.versions.destroy",
})
# roles/secretmanager.viewer + roles/secretmanager.secretAccessor
READ_PERMISSIONS = frozenset({
    "secretmanager.secrets.get", "secretmanager.secrets.list", "secretmanager.versions.get",
    "secretmanager.versions.list", "secretmanager.versions.access",
})

_SECRET_ID = re.compile(r"^[A-Za-z0-9_-]{1,255}$")
_LABEL_KEY = re.compile(r"^[\w-]{0,63}$")
_LABEL_VALUE = re.compile(r"^[\w-]{0,63}$")
_STATUS = {
    400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
    409: "ALREADY_EXISTS", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE",
}


class ApiError(Exception):
    def __init__(self, code: int, message: str, status: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.status = code, message, status or _STATUS[code]

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "status": self.status}}


def _now() -> datetime:
    return datetime.now(UTC)


def _ts(t: datetime | None) -> str | None:
    return None if t is None else t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def make_service_account_key(
    email: str, project: str, token_uri: str = GOOGLE_TOKEN_URL
) -> tuple[dict[str, str], rsa.RSAPublicKey]:
    """A fresh service-account key file (the JSON Google's console downloads) and its public key."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    info = {
        "type": "service_account",
        "project_id": project,
        "private_key_id": secrets.token_hex(20),
        "private_key": pem,
        "client_email": email,
        "client_id": str(secrets.randbelow(10**20)),
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
    }
    return info, private.public_key()


@dataclass
class _Version:
    number: int
    created: datetime
    data: bytes | None
    state: str = "ENABLED"
    destroyed: datetime | None = None
    etag: str = field(default_factory=lambda: f'"{secrets.token_hex(8)}"')


@dataclass
class _Secret:
    id: str
    created: datetime
    labels: dict[str, str]
    annotations: dict[str, str]
    etag: str = field(default_factory=lambda: f'"{secrets.token_hex(8)}"')
    versions: dict[int, _Version] = field(default_factory=dict)
    next_version: int = 1


@dataclass
class _Account:
    email: str
    keys: dict[str, rsa.RSAPublicKey]
    permissions: frozenset[str]


class GCPSecretManagerStandIn:
    """The stand-in as a real HTTP server on 127.0.0.1 (uvicorn in a thread).

    ``start()`` is idempotent and blocks until the server answers; after ``stop()`` a
    ``start()`` serves again on the same port with the same data (a store that went
    away and came back). ``page_size_max`` caps ``pageSize`` (Google: 25,000), so tests
    can make the SDK follow ``nextPageToken``.
    """

    host = "127.0.0.1"

    def __init__(self, project: str = "credgate-test", project_number: str = "424242424242", *, page_size_max: int = MAX_PAGE_SIZE) -> None:
        self.project = project
        self.project_number = project_number
        self.page_size_max = page_size_max
        self._served = Served(self._asgi, "GCP Secret Manager stand-in")
        self._secrets: dict[str, _Secret] = {}
        self._accounts: dict[str, _Account] = {}
        self._tokens: dict[str, tuple[str, float]] = {}  # access token -> (account, expires at)
        self._lock = threading.RLock()
        self.calls: dict[str, int] = {}  # method -> count (e.g. "token", "secrets.create")
        self.auth_failures = 0
        self.delay = 0.0  # seconds to wait before answering an API call (a slow store)

    # --- lifecycle ----------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._served.port

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def token_uri(self) -> str:
        return f"{self.endpoint}/token"

    @property
    def running(self) -> bool:
        return self._served.running

    def start(self) -> GCPSecretManagerStandIn:
        self._served.start()
        return self

    def stop(self) -> None:
        self._served.stop()

    def __enter__(self) -> GCPSecretManagerStandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- test helpers ---------------------------------------------------------------------

    def add_service_account(
        self, email: str | None = None, *, permissions: frozenset[str] = ALL_PERMISSIONS, token_uri: str | None = None
    ) -> dict[str, str]:
        """Create a service account (or a new key for an existing one) and return its key file as a dict.
        ``token_uri`` defaults to this stand-in's ``/token``."""
        email = email or f"sa-{secrets.token_hex(4)}@{self.project}.iam.gserviceaccount.com"
        info, public = make_service_account_key(email, self.project, token_uri or self.token_uri)
        with self._lock:
            account = self._accounts.setdefault(email, _Account(email, {}, frozenset(permissions)))
            account.permissions = frozenset(permissions)
            account.keys[info["private_key_id"]] = public
        return info

    def delete_key(self, email: str, key_id: str) -> None:
        with self._lock:
            self._accounts[email].keys.pop(key_id, None)

    def secret(self, secret_id: str) -> dict[str, Any] | None:
        """The stored secret (as the API shows it) or None: lets tests look behind the backend."""
        with self._lock:
            s = self._secrets.get(secret_id)
            return None if s is None else self._secret_json(s)

    def secret_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._secrets)

    def plant(self, secret_id: str, data: bytes, labels: dict[str, str] | None = None) -> None:
        """Create a secret with one version behind credgate's back (as another tool would)."""
        with self._lock:
            s = self._secrets.setdefault(secret_id, _Secret(secret_id, _now(), dict(labels or {}), {}))
            s.versions[s.next_version] = _Version(s.next_version, _now(), data)
            s.next_version += 1

    # --- HTTP -------------------------------------------------------------------------------

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
        query = parse_qs(scope.get("query_string", b"").decode(), keep_blank_values=True)
        status, payload, extra = await self._dispatch(scope["method"], scope["path"], query, headers, body)
        raw = json.dumps(payload).encode()
        out_headers = [(b"content-type", b"application/json; charset=UTF-8"), (b"content-length", str(len(raw)).encode())]
        out_headers += [(k.encode(), v.encode()) for k, v in extra.items()]
        await send({"type": "http.response.start", "status": status, "headers": out_headers})
        await send({"type": "http.response.body", "body": raw})

    async def _dispatch(
        self, method: str, path: str, query: dict[str, list[str]], headers: dict[str, str], body: bytes
    ) -> tuple[int, Any, dict[str, str]]:
        if method == "POST" and path == "/token":
            self._count("token")
            return self._token(body, headers)
        if self.delay:
            import asyncio

            await asyncio.sleep(self.delay)
        try:
            account = self._authenticate(headers.get("authorization", ""))
            with self._lock:
                return 200, self._route(method, path, query, body, account), {}
        except ApiError as err:
            extra = {"www-authenticate": 'Bearer realm="https://accounts.google.com/"'} if err.code == 401 else {}
            return err.code, err.body(), extra

    def _count(self, name: str) -> None:
        with self._lock:
            self.calls[name] = self.calls.get(name, 0) + 1

    # --- credentials ------------------------------------------------------------------------

    def _verify_jwt(self, token: str, audiences: tuple[str, ...], need_scope: bool) -> _Account:
        """Verify an RS256 JWT signed by a registered service-account key; returns the account.
        Raises ValueError with a reason (never the token)."""
        try:
            head_b64, claims_b64, sig_b64 = token.split(".")
            header = json.loads(_unb64url(head_b64))
            claims = json.loads(_unb64url(claims_b64))
            signature = _unb64url(sig_b64)
        except (ValueError, TypeError) as exc:
            raise ValueError("malformed JWT") from exc
        if header.get("alg") != "RS256":
            raise ValueError("unsupported algorithm")
        with self._lock:
            account = self._accounts.get(str(claims.get("iss")))
        if account is None:
            raise ValueError("unknown service account")
        keys = [account.keys[header["kid"]]] if header.get("kid") in account.keys else []
        if not keys:
            raise ValueError("unknown key id")
        try:
            keys[0].verify(signature, f"{head_b64}.{claims_b64}".encode(), padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            raise ValueError("invalid JWT signature") from None
        now = time.time()
        exp, iat = claims.get("exp"), claims.get("iat")
        if not isinstance(exp, (int, float)) or not isinstance(iat, (int, float)):
            raise ValueError("exp and iat are required")
        if exp < now - 30 or iat > now + 300 or exp - iat > 3600:
            raise ValueError("token expired or not yet valid")
        if claims.get("sub", account.email) != account.email:
            raise ValueError("sub differs from iss")
        scopes = str(claims.get("scope", "")).split()
        aud_ok = claims.get("aud") in audiences
        if need_scope:
            if not aud_ok or not scopes:
                raise ValueError("bad audience or no scope")
        elif not aud_ok and CLOUD_PLATFORM not in scopes:
            raise ValueError("bad audience")
        return account

    def _token(self, body: bytes, headers: dict[str, str]) -> tuple[int, Any, dict[str, str]]:
        form = parse_qs(body.decode(errors="replace"))
        grant = form.get("grant_type", [""])[0]
        if grant != "urn:ietf:params:oauth:grant-type:jwt-bearer":
            return 400, {"error": "unsupported_grant_type", "error_description": "Invalid grant_type."}, {}
        try:
            account = self._verify_jwt(form.get("assertion", [""])[0], (GOOGLE_TOKEN_URL, self.token_uri), True)
        except ValueError as exc:
            with self._lock:
                self.auth_failures += 1
            return 400, {"error": "invalid_grant", "error_description": f"Invalid JWT: {exc}."}, {}
        token = "ya29.standin-" + secrets.token_urlsafe(32)
        with self._lock:
            self._tokens[token] = (account.email, time.time() + 3600)
        return 200, {"access_token": token, "expires_in": 3599, "token_type": "Bearer"}, {}

    def _authenticate(self, authorization: str) -> _Account:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            self._refuse()
        with self._lock:
            issued = self._tokens.get(token)
            if issued is not None and issued[1] > time.time() and issued[0] in self._accounts:
                return self._accounts[issued[0]]
        if token.count(".") == 2:
            try:
                return self._verify_jwt(token, (API_AUDIENCE,), False)
            except ValueError:
                pass
        self._refuse()
        raise AssertionError  # unreachable

    def _refuse(self) -> None:
        with self._lock:
            self.auth_failures += 1
        raise ApiError(
            401,
            "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or "
            "other valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project.",
        )

    # --- the API ----------------------------------------------------------------------------

    _ROUTES = [
        ("POST", re.compile(r"^/v1/projects/([^/]+)/secrets$"), "secrets.create"),
        ("GET", re.compile(r"^/v1/projects/([^/]+)/secrets$"), "secrets.list"),
        ("POST", re.compile(r"^/v1/projects/([^/]+)/secrets/([^/:]+):addVersion$"), "secrets.addVersion"),
        ("POST", re.compile(r"^/v1/projects/([^/]+)/secrets/([^/:]+):testIamPermissions$"), "secrets.testIamPermissions"),
        ("GET", re.compile(r"^/v1/projects/([^/]+)/secrets/([^/:]+)$"), "secrets.get"),
        ("DELETE", re.compile(r"^/v1/projects/([^/]+)/secrets/([^/:]+)$"), "secrets.delete"),
        ("PATCH", re.compile(r"^/v1/projects/([^/]+)/secrets/([^/:]+)$"), "secrets.patch"),
        ("GET", re.compile(r"^/v1/projects/([^/]+)/secrets/([^/:]+)/versions$"), "versions.list"),
        ("GET", re.compile(r"^/v1/projects/([^/]+)/secrets/([^/:]+)/versions/([^/:]+):access$"), "versions.access"),
        ("POST", re.compile(r"^/v1/projects/([^/]+)/secrets/([^/:]+)/versions/([^/:]+):disable$"), "versions.disable"),
        ("POST", re.compile(r"^/v1/projects/([^/]+)/secrets/([^/:]+)/versions/([^/:]+):enable$"), "versions.enable"),
        ("POST", re.compile(r"^/v1/projects/([^/]+)/secrets/([^/:]+)/versions/([^/:]+):destroy$"), "versions.destroy"),
        ("GET", re.compile(r"^/v1/projects/([^/]+)/secrets/([^/:]+)/versions/([^/:]+)$"), "versions.get"),
    ]
    _PERMISSION = {
        "secrets.create": "secretmanager.secrets.create", "secrets.list": "secretmanager.secrets.list",
        "secrets.addVersion": "secretmanager.versions.add", "secrets.get": "secretmanager.secrets.get",
        "secrets.delete": "secretmanager.secrets.delete", "secrets.patch": "secretmanager.secrets.update",
        "versions.list": "secretmanager.versions.list", "versions.access": "secretmanager.versions.access",
        "versions.disable": "secretmanager.versions.disable", "versions.enable": "secretmanager.versions.enable",
        "versions.destroy": "secretmanager.versions.destroy", "versions.get": "secretmanager.versions.get",
    }

    def _route(self, method: str, path: str, query: dict[str, list[str]], body: bytes, account: _Account) -> Any:
        for verb, pattern, name in self._ROUTES:
            m = pattern.match(path)
            if verb == method and m:
                break
        else:
            raise ApiError(404, f"Method not found: {method} {path}.")
        self._count(name)
        project = m.group(1)
        if project not in (self.project, self.project_number):
            raise ApiError(403, f"Permission denied on resource project {project}.")
        args = m.groups()[1:]
        resource = self._name(*args)
        permission = self._PERMISSION.get(name)
        if permission is not None and permission not in account.permissions:
            raise ApiError(
                403, f"Permission '{permission}' denied for resource '{resource}' (or it may not exist)."
            )
        try:
            request = json.loads(body) if body.strip() else {}
        except ValueError:
            raise ApiError(400, "Invalid JSON payload received.") from None
        q = {k: v[-1] for k, v in query.items()}
        handler = getattr(self, "_" + name.replace(".", "_"))
        return handler(q, request, account, *args)

    def _name(self, secret_id: str | None = None, version: str | None = None) -> str:
        name = f"projects/{self.project_number}/secrets"
        if secret_id is not None:
            name += f"/{secret_id}"
        if version is not None:
            name += f"/versions/{version}"
        return name

    def _secret_json(self, s: _Secret) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self._name(s.id), "replication": {"automatic": {}}, "createTime": _ts(s.created), "etag": s.etag,
        }
        if s.labels:
            out["labels"] = dict(s.labels)
        if s.annotations:
            out["annotations"] = dict(s.annotations)
        return out

    def _version_json(self, s: _Secret, v: _Version) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self._name(s.id, str(v.number)), "createTime": _ts(v.created), "state": v.state, "etag": v.etag,
            "replicationStatus": {"automatic": {}}, "clientSpecifiedPayloadChecksum": False,
        }
        if v.destroyed:
            out["destroyTime"] = _ts(v.destroyed)
        return out

    def _get(self, secret_id: str) -> _Secret:
        s = self._secrets.get(secret_id)
        if s is None:
            raise ApiError(404, f"Secret [{self._name(secret_id)}] not found or has no versions.")
        return s

    def _version(self, s: _Secret, ref: str) -> _Version:
        if ref == "latest":
            if not s.versions:
                raise ApiError(404, f"Secret [{self._name(s.id)}] not found or has no versions.")
            return s.versions[max(s.versions)]
        if not ref.isdigit() or int(ref) not in s.versions:
            raise ApiError(404, f"Secret Version [{self._name(s.id, ref)}] not found.")
        return s.versions[int(ref)]

    @staticmethod
    def _check_labels(labels: Any) -> dict[str, str]:
        if not isinstance(labels, dict) or len(labels) > 64:
            raise ApiError(400, "Labels must be a map of at most 64 entries.")
        for k, v in labels.items():
            if not (isinstance(k, str) and isinstance(v, str) and k and k[0].islower()
                    and _LABEL_KEY.match(k) and _LABEL_VALUE.match(v) and k == k.lower() and v == v.lower()):
                raise ApiError(400, "Invalid label: keys start with a lowercase letter; keys and values are "
                                    "at most 63 lowercase letters, digits, '_' or '-'.")
        return dict(labels)

    def _check_etag(self, given: str | None, actual: str) -> None:
        if given and given != actual:
            raise ApiError(409, "The etag provided does not match the current etag.", "ABORTED")

    def _secrets_create(self, q: dict[str, str], request: dict[str, Any], account: _Account, *_: str) -> Any:
        secret_id = q.get("secretId", "")
        if not _SECRET_ID.match(secret_id):
            raise ApiError(400, "The secret ID must be 1-255 characters of [a-zA-Z0-9_-].")
        if not isinstance(request.get("replication"), dict) or not request["replication"]:
            raise ApiError(400, "Secret.replication is required.")
        if secret_id in self._secrets:
            raise ApiError(409, f"Secret [{self._name(secret_id)}] already exists.")
        labels = self._check_labels(request.get("labels", {}))
        s = _Secret(secret_id, _now(), labels, dict(request.get("annotations", {})))
        self._secrets[secret_id] = s
        return self._secret_json(s)

    def _secrets_get(self, q: dict[str, str], request: Any, account: _Account, secret_id: str) -> Any:
        return self._secret_json(self._get(secret_id))

    def _secrets_delete(self, q: dict[str, str], request: Any, account: _Account, secret_id: str) -> Any:
        s = self._get(secret_id)
        self._check_etag(q.get("etag"), s.etag)
        del self._secrets[secret_id]
        return {}

    def _secrets_patch(self, q: dict[str, str], request: dict[str, Any], account: _Account, secret_id: str) -> Any:
        s = self._get(secret_id)
        self._check_etag(request.get("etag"), s.etag)
        mask = [p for p in q.get("updateMask", "").split(",") if p]
        if not mask or set(mask) - {"labels", "annotations"}:
            raise ApiError(400, "updateMask must name labels and/or annotations.")
        if "labels" in mask:
            s.labels = self._check_labels(request.get("labels", {}))
        if "annotations" in mask:
            s.annotations = dict(request.get("annotations", {}))
        s.etag = f'"{secrets.token_hex(8)}"'
        return self._secret_json(s)

    def _secrets_addVersion(self, q: dict[str, str], request: dict[str, Any], account: _Account, secret_id: str) -> Any:
        s = self._get(secret_id)
        try:
            data = base64.b64decode(request["payload"]["data"], validate=True)
        except (KeyError, TypeError, ValueError):
            raise ApiError(400, "SecretPayload.data is required and must be base64.") from None
        if len(data) > MAX_PAYLOAD:
            raise ApiError(400, f"Secret payload data must be at most {MAX_PAYLOAD} bytes.")
        v = _Version(s.next_version, _now(), data)
        s.versions[v.number] = v
        s.next_version += 1
        return self._version_json(s, v)

    def _secrets_testIamPermissions(self, q: dict[str, str], request: dict[str, Any], account: _Account, secret_id: str) -> Any:
        self._get(secret_id)
        asked = request.get("permissions", [])
        held = [p for p in asked if p in account.permissions]
        return {"permissions": held} if held else {}

    def _page(self, items: list[Any], q: dict[str, str]) -> tuple[list[Any], str | None]:
        try:
            size = int(q.get("pageSize") or self.page_size_max)
            start = int(_unb64url(q["pageToken"]).decode()) if q.get("pageToken") else 0
        except ValueError:
            raise ApiError(400, "Invalid pageSize or pageToken.") from None
        if size < 0:
            raise ApiError(400, "pageSize must not be negative.")
        size = min(size or self.page_size_max, self.page_size_max)
        chunk = items[start:start + size]
        more = start + size < len(items)
        return chunk, _b64url(str(start + size).encode()) if more else None

    def _secrets_list(self, q: dict[str, str], request: Any, account: _Account) -> Any:
        match = _compile_filter(q.get("filter", ""))
        found = [self._secret_json(s) for _, s in sorted(self._secrets.items()) if match(self._secret_json(s))]
        chunk, token = self._page(found, q)
        out: dict[str, Any] = {"totalSize": len(found)}
        if chunk:
            out["secrets"] = chunk
        if token:
            out["nextPageToken"] = token
        return out

    def _versions_list(self, q: dict[str, str], request: Any, account: _Account, secret_id: str) -> Any:
        s = self._get(secret_id)
        found = [self._version_json(s, v) for _, v in sorted(s.versions.items(), reverse=True)]
        chunk, token = self._page(found, q)
        out: dict[str, Any] = {"totalSize": len(found)}
        if chunk:
            out["versions"] = chunk
        if token:
            out["nextPageToken"] = token
        return out

    def _versions_get(self, q: dict[str, str], request: Any, account: _Account, secret_id: str, ref: str) -> Any:
        s = self._get(secret_id)
        return self._version_json(s, self._version(s, ref))

    def _versions_access(self, q: dict[str, str], request: Any, account: _Account, secret_id: str, ref: str) -> Any:
        s = self._get(secret_id)
        v = self._version(s, ref)
        if v.state != "ENABLED":
            raise ApiError(
                400, f"Secret Version [{self._name(s.id, str(v.number))}] is in {v.state} state.", "FAILED_PRECONDITION"
            )
        assert v.data is not None
        return {"name": self._name(s.id, str(v.number)), "payload": {"data": base64.b64encode(v.data).decode()}}

    def _set_state(self, q: dict[str, str], request: dict[str, Any], secret_id: str, ref: str, state: str) -> Any:
        s = self._get(secret_id)
        v = self._version(s, ref)
        self._check_etag(request.get("etag"), v.etag)
        if v.state == "DESTROYED":
            raise ApiError(400, f"Secret Version [{self._name(s.id, str(v.number))}] is destroyed.", "FAILED_PRECONDITION")
        v.state = state
        v.etag = f'"{secrets.token_hex(8)}"'
        if state == "DESTROYED":
            v.data = None
            v.destroyed = _now()
        return self._version_json(s, v)

    def _versions_disable(self, q: dict[str, str], request: dict[str, Any], account: _Account, secret_id: str, ref: str) -> Any:
        return self._set_state(q, request, secret_id, ref, "DISABLED")

    def _versions_enable(self, q: dict[str, str], request: dict[str, Any], account: _Account, secret_id: str, ref: str) -> Any:
        return self._set_state(q, request, secret_id, ref, "ENABLED")

    def _versions_destroy(self, q: dict[str, str], request: dict[str, Any], account: _Account, secret_id: str, ref: str) -> Any:
        return self._set_state(q, request, secret_id, ref, "DESTROYED")


_TERM = re.compile(r"^(-|NOT\s+)?(name|labels\.[\w-]+)\s*([:=])\s*(\S+)$")


def _compile_filter(text: str) -> Any:
    """The list filter subset described in the module docstring, as a predicate on a Secret's JSON."""
    text = text.strip()
    if not text:
        return lambda secret: True
    alternatives = []
    for alt in re.split(r"\s+OR\s+", text):
        tokens = [t for t in re.split(r"\s+", alt) if t and t != "AND"]
        terms, negate = [], False
        for token in tokens:
            if token == "NOT":
                negate = True
                continue
            m = _TERM.match(("NOT " if negate else "") + token)
            negate = False
            if not m:
                raise ApiError(400, "Invalid filter.")
            neg, fld, op, value = m.groups()
            value = value.strip('"')
            terms.append((bool(neg), fld, op, value))
        alternatives.append(terms)

    def matches(term: tuple[bool, str, str, str], secret: dict[str, Any]) -> bool:
        neg, fld, op, value = term
        if fld == "name":
            got = value in secret["name"] if op == ":" else secret["name"].rsplit("/", 1)[-1] == value
        else:
            label = secret.get("labels", {}).get(fld.split(".", 1)[1])
            if op == "=":
                got = label == value
            else:
                got = label is not None and (value == "*" or value in label)
        return got != neg

    return lambda secret: any(all(matches(t, secret) for t in terms) for terms in alternatives)

