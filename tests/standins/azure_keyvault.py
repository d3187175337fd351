"""A STAND-IN for Azure Key Vault (secrets, REST API 7.x) and the Microsoft identity platform
(Entra ID, v2.0 token endpoint), for tests only. It is not Microsoft's service: Azure can't
run on this machine, so this module re-implements, from Microsoft's public REST reference
("Key Vault secrets" REST API, "Microsoft identity platform and the OAuth 2.0 client
credentials flow", "Microsoft Entra authentication and authorization error codes"), the part
that credgate's ``azure`` backend and its tests use. It serves it over real HTTPS (a
self-signed certificate for ``localhost`` and ``127.0.0.1``, written to :attr:`ca_file`) on
127.0.0.1, so the backend is driven through the real ``azure-keyvault-secrets`` SDK and the
real ``azure-identity`` credentials (``authority=host:port``, ``connection_verify=ca_file``,
``verify_challenge_resource=False``).

Key Vault operations implemented (any ``api-version`` of the form ``7.N`` or ``YYYY-MM-DD``
is accepted and required; names must match ``^[0-9a-zA-Z-]{1,127}$`` and are
case-insensitive, as in Key Vault):

- Set Secret ``PUT /secrets/{name}`` (``value``, ``contentType``, ``tags``, ``attributes``;
  a value over 25 KiB, more than 15 tags, a tag name over 512 or a tag value over 256
  characters are 400 ``BadParameter``; a name held by a soft-deleted secret is 409
  ``Conflict`` with inner error ``ObjectIsDeletedButRecoverable``).
- Get Secret ``GET /secrets/{name}/{version}`` (empty version = the current one; a disabled
  version is 403 ``Forbidden``/``SecretDisabled``).
- Update Secret ``PATCH /secrets/{name}/{version}`` (``contentType``, ``tags``,
  ``attributes.enabled``).
- Get Secrets ``GET /secrets`` and Get Secret Versions ``GET /secrets/{name}/versions``
  (``maxresults`` 1-25, ``nextLink`` paging with a ``$skiptoken``; versions come in version
  id order, not creation order, since Key Vault promises no order).
- Delete Secret ``DELETE /secrets/{name}`` -> ``DeletedSecretBundle`` (``recoveryId``,
  ``deletedDate``, ``scheduledPurgeDate``); deletion completes at once.
- Get Deleted Secret(s) ``GET /deletedsecrets[/{name}]``, Recover Deleted Secret
  ``POST /deletedsecrets/{name}/recover``, Purge Deleted Secret ``DELETE
  /deletedsecrets/{name}`` (204; 403 ``Forbidden`` when the vault has purge protection,
  whose secrets then say ``recoveryLevel: Recoverable`` instead of
  ``Recoverable+Purgeable``).
- Errors in Key Vault's shape ``{"error": {"code", "message", "innererror"?}}``.

Authentication and authorisation, verified, never assumed:

- Every Key Vault call without a valid bearer token is 401 with the challenge
  ``WWW-Authenticate: Bearer authorization="https://login.microsoftonline.com/{tenant}",
  resource="https://vault.azure.net"`` (the SDK's first request of each client is such an
  unauthenticated probe). A token must be one this stand-in issued (RS256 signature), for
  the audience ``https://vault.azure.net``, of the vault's tenant, not expired (with five
  minutes of clock skew, as Azure; ``token_lifetime=0`` makes clients fetch a new token for
  every call, which tests of credential rotation use).
- The Entra endpoints, on the same server: ``GET /{tenant}/v2.0/.well-known/openid-configuration``,
  ``GET /{tenant}/discovery/v2.0/keys`` and ``POST /{tenant}/oauth2/v2.0/token`` with
  ``grant_type=client_credentials`` and ``scope=https://vault.azure.net/.default``,
  authenticated by (a) ``client_secret``, (b) a ``client_assertion`` signed with a
  registered certificate's key (RS256 or PS256; header ``x5t`` or ``x5t#S256`` naming the
  certificate; ``aud`` = this token endpoint; ``iss`` = ``sub`` = the client id; live
  ``exp``), or (c) a federated ``client_assertion`` (workload identity): a JWT from a
  trusted issuer whose key the stand-in holds, matching one of the application's federated
  credentials (issuer, subject, audience ``api://AzureADTokenExchange``). Refusals use
  Entra's shape ``{"error", "error_description": "AADSTSnnnn: ...", "error_codes", ...}``
  (401 ``invalid_client`` for bad credentials).
- Permissions follow Key Vault's access-policy model: each application holds a set of the
  secret permissions ``get list set delete recover purge``; a call without its permission
  is 403 ``Forbidden`` (inner error ``AccessDenied``).

Test knobs (not Azure's): ``purge_protection``, ``token_lifetime``, ``delay`` (seconds every
Key Vault call waits: a slow vault), ``seed()`` (write behind the API), ``raw_secret()`` and
``names()`` (look behind the API), ``token_requests`` and ``refused`` (what Entra issued and
refused).

Not implemented: backup/restore, certificates and keys, RBAC role assignments, managed
identities (IMDS), ``nbf``/``exp`` attribute enforcement, ``recoverableDays`` other than 90,
automatic purge at the end of retention, asynchronous deletion.

Use::

    kv = AzureKeyVaultStandIn()
    kv.start()
    client_id, secret = kv.add_secret_app()
    ... SecretClient(kv.vault_url, ClientSecretCredential(kv.tenant_id, client_id, secret,
            authority=kv.authority, disable_instance_discovery=True, connection_verify=kv.ca_file),
            verify_challenge_resource=False, connection_verify=kv.ca_file)
    kv.stop()
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import ipaddress
import json
import re
import secrets
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

VAULT_RESOURCE = "https://vault.azure.net"
FEDERATED_AUDIENCE = "api://AzureADTokenExchange"
ALL_PERMISSIONS = frozenset({"get", "list", "set", "delete", "recover", "purge"})
READ_PERMISSIONS = frozenset({"get", "list"})
MAX_VALUE_BYTES = 25 * 1024
RECOVERABLE_DAYS = 90
CLOCK_SKEW = 300  # seconds of clock skew Entra-issued tokens are accepted with, as Azure does
_NAME = re.compile(r"^[0-9a-zA-Z-]{1,127}$")
_API_VERSION = re.compile(r"^(7\.\d+|20\d\d-\d\d-\d\d)(-preview(\.\d+)?)?$")
_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _now() -> int:
    return int(time.time())


def new_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def self_signed(key: rsa.RSAPrivateKey, common_name: str, *, tls: bool = False, days: int = 30) -> x509.Certificate:
    """A self-signed certificate; with ``tls``, valid for DNS:localhost and IP:127.0.0.1."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
    )
    if tls:
        builder = (
            builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        )
    return builder.sign(key, hashes.SHA256())


def pem_of(key: rsa.RSAPrivateKey, cert: x509.Certificate) -> bytes:
    """Private key + certificate, one PEM (what azure-identity's CertificateCredential reads)."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ) + cert.public_bytes(serialization.Encoding.PEM)


@dataclass
class App:
    """An application registration (service principal) in the stand-in's tenant."""

    client_id: str
    object_id: str
    permissions: set[str]
    secrets: set[str] = field(default_factory=set)
    certificates: list[x509.Certificate] = field(default_factory=list)
    federated: list[tuple[str, str]] = field(default_factory=list)  # (issuer, subject)


class FederatedIssuer:
    """A token issuer Entra trusts for workload identity federation (e.g. a Kubernetes
    cluster's service-account issuer): mints the JWTs a pod finds in its token file."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.key = new_rsa_key()
        self.kid = secrets.token_hex(8)

    def mint(self, subject: str, *, audience: str = FEDERATED_AUDIENCE, lifetime: int = 3600, issuer: str | None = None) -> str:
        now = _now()
        claims = {"iss": issuer or self.url, "sub": subject, "aud": [audience], "iat": now, "nbf": now, "exp": now + lifetime}
        return jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": self.kid})


@dataclass
class _Version:
    id: str
    value: str
    content_type: str | None
    tags: dict[str, str]
    enabled: bool
    created: int
    updated: int


@dataclass
class _Secret:
    name: str  # as first set (Key Vault keeps the case, compares without it)
    versions: list[_Version] = field(default_factory=list)  # in creation order
    deleted_date: int | None = None


class KeyVaultError(Exception):
    def __init__(self, status: int, code: str, message: str, inner: str | None = None, headers: dict[str, str] | None = None):
        self.status, self.code, self.message, self.inner, self.headers = status, code, message, inner, headers or {}


class EntraError(Exception):
    def __init__(self, status: int, error: str, aadsts: int, description: str):
        self.status, self.error, self.aadsts, self.description = status, error, aadsts, description


class AzureKeyVaultStandIn:
    """One vault and its tenant on one HTTPS port (see the module docstring)."""

    def __init__(
        self, *, tenant_id: str | None = None, vault_name: str = "credgate-test", purge_protection: bool = False,
        token_lifetime: int = 3600,
    ) -> None:
        self.tenant_id = tenant_id or str(uuid.uuid4())
        self.vault_name = vault_name
        self.purge_protection = purge_protection
        self.token_lifetime = token_lifetime
        self.delay = 0.0  # seconds every Key Vault call waits before it is handled (a slow vault)
        self.apps: dict[str, App] = {}
        self.issuers: dict[str, FederatedIssuer] = {}
        self.token_requests: list[tuple[str, str]] = []  # (client_id, how) of each token issued
        self.refused: list[int] = []  # the AADSTS code of each refused token request
        self._secrets: dict[str, _Secret] = {}  # by lower-case name
        self._lock = threading.RLock()
        self._signing_key = new_rsa_key()
        self._kid = secrets.token_hex(8)
        self._dir = Path(tempfile.mkdtemp(prefix="azkv-standin-"))
        tls_key = new_rsa_key()
        cert = self_signed(tls_key, "localhost", tls=True)
        self.ca_file = str(self._dir / "tls-cert.pem")
        self._key_file = str(self._dir / "tls-key.pem")
        Path(self.ca_file).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        Path(self._key_file).write_bytes(
            tls_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
        self.port: int | None = None
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.app = self._build_app()

    # --- registry -------------------------------------------------------------------------

    def _new_app(self, permissions: frozenset[str] | set[str]) -> App:
        app = App(client_id=str(uuid.uuid4()), object_id=str(uuid.uuid4()), permissions=set(permissions))
        with self._lock:
            self.apps[app.client_id] = app
        return app

    def add_secret_app(self, permissions: frozenset[str] | set[str] = ALL_PERMISSIONS) -> tuple[str, str]:
        """An application with a client secret: returns (client id, secret)."""
        app = self._new_app(permissions)
        secret = "cs~" + secrets.token_urlsafe(30)
        app.secrets.add(secret)
        return app.client_id, secret

    def add_certificate_app(self, permissions: frozenset[str] | set[str] = ALL_PERMISSIONS) -> tuple[str, bytes]:
        """An application with a certificate credential: returns (client id, PEM key + certificate)."""
        app = self._new_app(permissions)
        key = new_rsa_key()
        cert = self_signed(key, f"app-{app.client_id[:8]}")
        app.certificates.append(cert)
        return app.client_id, pem_of(key, cert)

    def add_issuer(self, url: str) -> FederatedIssuer:
        issuer = FederatedIssuer(url)
        with self._lock:
            self.issuers[url] = issuer
        return issuer

    def add_federated_app(
        self, issuer: FederatedIssuer, subject: str, permissions: frozenset[str] | set[str] = ALL_PERMISSIONS
    ) -> str:
        """An application trusting ``issuer``'s tokens for ``subject`` (a federated credential)."""
        app = self._new_app(permissions)
        app.federated.append((issuer.url, subject))
        return app.client_id

    def set_permissions(self, client_id: str, permissions: frozenset[str] | set[str]) -> None:
        with self._lock:
            self.apps[client_id].permissions = set(permissions)

    def raw_secret(self, name: str) -> dict[str, Any] | None:
        """What the vault holds under ``name`` (tests' view behind the API)."""
        with self._lock:
            s = self._secrets.get(name.lower())
            if s is None:
                return None
            return {
                "name": s.name, "deleted": s.deleted_date is not None,
                "versions": [dict(id=v.id, value=v.value, tags=dict(v.tags), enabled=v.enabled, content_type=v.content_type) for v in s.versions],
            }

    def names(self) -> list[str]:
        with self._lock:
            return sorted(s.name for s in self._secrets.values())

    def seed(self, name: str, value: str, *, tags: dict[str, str] | None = None, content_type: str | None = None) -> str:
        """Write a version behind the API (someone else's secret); returns its version id."""
        with self._lock:
            return self._set(name, value, content_type, tags or {}, True).id

    # --- lifecycle ------------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        assert self.port is not None, "start() first"
        return ("127.0.0.1", self.port)

    @property
    def vault_url(self) -> str:
        return f"https://127.0.0.1:{self.address[1]}/"

    @property
    def authority(self) -> str:
        return f"127.0.0.1:{self.address[1]}"

    def start(self) -> AzureKeyVaultStandIn:
        """Serve (on the same port as before after a stop); returns once it answers."""
        if self._thread is not None:
            return self
        import uvicorn

        # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets that say they are TCP.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port or 0))
        sock.listen(128)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app, ssl_keyfile=self._key_file, ssl_certfile=self.ca_file, log_level="warning", lifespan="off",
            timeout_graceful_shutdown=1, access_log=False,
        )
        server = uvicorn.Server(config)
        self._server = server
        self._thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"azkv-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the Key Vault stand-in did not start")
            time.sleep(0.01)
        sock.close()  # uvicorn holds its own duplicate
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(10)
        self._thread = None
        self._server = None

    # --- Entra ID ---------------------------------------------------------------------------

    def _entra_body(self, exc: EntraError) -> dict[str, Any]:
        trace, corr = str(uuid.uuid4()), str(uuid.uuid4())
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
        return {
            "error": exc.error,
            "error_description": f"AADSTS{exc.aadsts}: {exc.description}\r\nTrace ID: {trace}\r\nCorrelation ID: {corr}\r\nTimestamp: {stamp}",
            "error_codes": [exc.aadsts],
            "timestamp": stamp,
            "trace_id": trace,
            "correlation_id": corr,
            "error_uri": f"https://login.microsoftonline.com/error?code={exc.aadsts}",
        }

    def _check_tenant(self, tenant: str) -> None:
        if tenant.lower() != self.tenant_id.lower():
            raise EntraError(400, "invalid_tenant", 90002, f"Tenant '{tenant}' not found.")

    def _openid_configuration(self, base: str, tenant: str) -> dict[str, Any]:
        self._check_tenant(tenant)
        root = f"{base}/{tenant}"
        return {
            "token_endpoint": f"{root}/oauth2/v2.0/token",
            "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt", "client_secret_basic"],
            "jwks_uri": f"{root}/discovery/v2.0/keys",
            "response_modes_supported": ["query", "fragment", "form_post"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "issuer": f"{root}/v2.0",
            "request_uri_parameter_supported": False,
            "authorization_endpoint": f"{root}/oauth2/v2.0/authorize",
            "device_authorization_endpoint": f"{root}/oauth2/v2.0/devicecode",
            "end_session_endpoint": f"{root}/oauth2/v2.0/logout",
            "tenant_region_scope": "WW",
            "cloud_instance_name": "microsoftonline.com",
        }

    def _jwks(self, tenant: str) -> dict[str, Any]:
        self._check_tenant(tenant)
        numbers = self._signing_key.public_key().public_numbers()
        as_b64 = lambda n: _b64url(n.to_bytes((n.bit_length() + 7) // 8, "big"))  # noqa: E731
        return {"keys": [{"kty": "RSA", "use": "sig", "kid": self._kid, "n": as_b64(numbers.n), "e": as_b64(numbers.e)}]}

    def _token(self, base: str, tenant: str, form: dict[str, str]) -> dict[str, Any]:
        self._check_tenant(tenant)
        if form.get("grant_type") != "client_credentials":
            raise EntraError(400, "unsupported_grant_type", 70003, "The app requested an unsupported grant type.")
        client_id = form.get("client_id", "")
        with self._lock:
            app = self.apps.get(client_id)
        if app is None:
            raise EntraError(
                400, "unauthorized_client", 700016,
                f"Application with identifier '{client_id}' was not found in the directory '{tenant}'.",
            )
        scope = form.get("scope", "")
        if scope.rstrip("/") not in (f"{VAULT_RESOURCE}/.default",):
            raise EntraError(400, "invalid_scope", 1002012, f"The provided value for scope {scope} is not valid.")
        endpoint = f"{base}/{tenant}/oauth2/v2.0/token"
        if "client_secret" in form:
            if form["client_secret"] not in app.secrets:
                raise EntraError(401, "invalid_client", 7000215, "Invalid client secret provided.")
            how = "client_secret"
        elif form.get("client_assertion_type") == _ASSERTION_TYPE and form.get("client_assertion"):
            how = self._check_assertion(app, form["client_assertion"], endpoint)
        else:
            raise EntraError(
                401, "invalid_client", 7000218,
                "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
            )
        now = _now()
        claims = {
            "aud": VAULT_RESOURCE, "iss": f"https://sts.windows.net/{self.tenant_id}/", "iat": now, "nbf": now,
            "exp": now + self.token_lifetime, "appid": app.client_id, "appidacr": "1" if how == "client_secret" else "2",
            "idtyp": "app", "oid": app.object_id, "sub": app.object_id, "tid": self.tenant_id, "ver": "1.0",
        }
        token = jwt.encode(claims, self._signing_key, algorithm="RS256", headers={"kid": self._kid, "x5t": self._kid})
        with self._lock:
            self.token_requests.append((app.client_id, how))
        return {"token_type": "Bearer", "expires_in": self.token_lifetime, "ext_expires_in": self.token_lifetime, "access_token": token}

    def _check_assertion(self, app: App, assertion: str, endpoint: str) -> str:
        try:
            header = jwt.get_unverified_header(assertion)
            unverified = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise EntraError(401, "invalid_client", 50027, "JWT token is invalid or malformed.") from None
        if unverified.get("iss") == app.client_id:
            return self._check_certificate_assertion(app, assertion, header, endpoint)
        return self._check_federated_assertion(app, assertion, header, unverified)

    def _check_certificate_assertion(self, app: App, assertion: str, header: dict[str, Any], endpoint: str) -> str:
        cert = None
        s256, s1 = str(header.get("x5t#S256", "")).rstrip("="), str(header.get("x5t", "")).rstrip("=")
        for c in app.certificates:
            if s256 == _b64url(c.fingerprint(hashes.SHA256())) or s1 == _b64url(c.fingerprint(hashes.SHA1())):
                cert = c
        if cert is None:
            raise EntraError(
                401, "invalid_client", 700027,
                "The certificate with identifier used to sign the client assertion is not registered on application.",
            )
        if header.get("alg") not in ("RS256", "PS256"):
            raise EntraError(401, "invalid_client", 5002738, "Invalid JWT token. The token signing algorithm is not supported.")
        try:
            claims = jwt.decode(
                assertion, cert.public_key(), algorithms=[header["alg"]], audience=endpoint,
                options={"require": ["exp", "aud", "iss", "sub"]}, leeway=30,
            )
        except jwt.ExpiredSignatureError:
            raise EntraError(401, "invalid_client", 700024, "Client assertion is not within its valid time range.") from None
        except jwt.InvalidAudienceError:
            raise EntraError(
                401, "invalid_client", 700021, "Client assertion application identifier doesn't match 'client_id' parameter or the audience is wrong.",
            ) from None
        except jwt.InvalidSignatureError:
            raise EntraError(401, "invalid_client", 700027, "Client assertion failed signature validation.") from None
        except jwt.PyJWTError:
            raise EntraError(401, "invalid_client", 50027, "JWT token is invalid or malformed.") from None
        if claims["sub"] != app.client_id:
            raise EntraError(401, "invalid_client", 700021, "Client assertion application identifier doesn't match 'client_id' parameter.")
        return "certificate"

    def _check_federated_assertion(self, app: App, assertion: str, header: dict[str, Any], unverified: dict[str, Any]) -> str:
        iss = unverified.get("iss")
        with self._lock:
            issuer = self.issuers.get(iss) if isinstance(iss, str) else None
        if issuer is None or not any(i == iss for i, _ in app.federated):
            raise EntraError(401, "invalid_client", 700211, "No matching federated identity record found for presented assertion issuer.")
        try:
            claims = jwt.decode(
                assertion, issuer.key.public_key(), algorithms=["RS256"], audience=FEDERATED_AUDIENCE, issuer=iss,
                options={"require": ["exp", "aud", "iss", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise EntraError(401, "invalid_client", 700024, "Client assertion is not within its valid time range.") from None
        except jwt.InvalidAudienceError:
            raise EntraError(401, "invalid_client", 700212, "No matching federated identity record found for presented assertion audience.") from None
        except jwt.PyJWTError:
            raise EntraError(401, "invalid_client", 700027, "Client assertion failed signature validation.") from None
        if (iss, claims["sub"]) not in app.federated:
            raise EntraError(401, "invalid_client", 700213, "No matching federated identity record found for presented assertion subject.")
        return "workload_identity"

    # --- Key Vault ------------------------------------------------------------------------------

    def _challenge(self) -> dict[str, str]:
        return {
            "WWW-Authenticate": f'Bearer authorization="https://login.microsoftonline.com/{self.tenant_id}", resource="{VAULT_RESOURCE}"'
        }

    def _authenticate(self, authorization: str | None) -> App:
        if not authorization or not authorization.startswith("Bearer "):
            raise KeyVaultError(401, "Unauthorized", "AKV10000: Request is missing a Bearer or PoP token.", headers=self._challenge())
        token = authorization[len("Bearer "):]
        try:
            claims = jwt.decode(
                token, self._signing_key.public_key(), algorithms=["RS256"], audience=[VAULT_RESOURCE, VAULT_RESOURCE + "/"],
                options={"require": ["exp", "aud", "iss", "tid"]}, leeway=CLOCK_SKEW,
            )
        except jwt.ExpiredSignatureError:
            raise KeyVaultError(401, "Unauthorized", "AKV10020: Invalid token: token expired.", headers=self._challenge()) from None
        except jwt.InvalidAudienceError:
            raise KeyVaultError(401, "Unauthorized", "AKV10022: Invalid audience.", headers=self._challenge()) from None
        except jwt.PyJWTError:
            raise KeyVaultError(401, "Unauthorized", "AKV10031: Invalid token signature.", headers=self._challenge()) from None
        if claims["tid"] != self.tenant_id or claims["iss"] != f"https://sts.windows.net/{self.tenant_id}/":
            raise KeyVaultError(401, "Unauthorized", "AKV10032: Invalid issuer.", headers=self._challenge())
        with self._lock:
            app = self.apps.get(claims.get("appid", ""))
        if app is None:
            raise KeyVaultError(401, "Unauthorized", "AKV10032: Invalid issuer.", headers=self._challenge())
        return app

    def _require(self, app: App, permission: str) -> None:
        if permission not in app.permissions:
            raise KeyVaultError(
                403, "Forbidden",
                f"The user, group or application 'appid={app.client_id};oid={app.object_id};iss=https://sts.windows.net/{self.tenant_id}/' "
                f"does not have secrets {permission} permission on key vault '{self.vault_name};location=local'.",
                inner="AccessDenied",
            )

    @staticmethod
    def _name(name: str) -> str:
        if not _NAME.match(name):
            raise KeyVaultError(400, "BadParameter", "The request URI contains an invalid name.")
        return name.lower()

    def _recovery_level(self) -> str:
        return "Recoverable" if self.purge_protection else "Recoverable+Purgeable"

    def _attributes(self, v: _Version) -> dict[str, Any]:
        return {
            "enabled": v.enabled, "created": v.created, "updated": v.updated,
            "recoveryLevel": self._recovery_level(), "recoverableDays": RECOVERABLE_DAYS,
        }

    def _bundle(self, base: str, s: _Secret, v: _Version, *, value: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {"id": f"{base}/secrets/{s.name}/{v.id}", "attributes": self._attributes(v), "tags": dict(v.tags)}
        if v.content_type is not None:
            out["contentType"] = v.content_type
        if value:
            out["value"] = v.value
        return out

    def _deleted(self, base: str, s: _Secret, *, value: bool = False) -> dict[str, Any]:
        out = self._bundle(base, s, s.versions[-1], value=value)
        out["recoveryId"] = f"{base}/deletedsecrets/{s.name}"
        out["deletedDate"] = s.deleted_date
        out["scheduledPurgeDate"] = (s.deleted_date or 0) + RECOVERABLE_DAYS * 86400
        return out

    def _live(self, name: str) -> _Secret:
        s = self._secrets.get(self._name(name))
        if s is None or s.deleted_date is not None:
            raise KeyVaultError(404, "SecretNotFound", f"A secret with (name/id) {name} was not found in this key vault.")
        return s

    def _deleted_secret(self, name: str) -> _Secret:
        s = self._secrets.get(self._name(name))
        if s is None or s.deleted_date is None:
            raise KeyVaultError(404, "SecretNotFound", f"Deleted Secret not found: {name}")
        return s

    def _version(self, s: _Secret, version: str) -> _Version:
        if not version:
            return s.versions[-1]
        for v in s.versions:
            if v.id == version.lower():
                return v
        raise KeyVaultError(404, "SecretNotFound", f"A secret with (name/id) {s.name}/{version} was not found in this key vault.")

    @staticmethod
    def _check_tags(tags: Any) -> dict[str, str]:
        if tags is None:
            return {}
        if not isinstance(tags, dict) or len(tags) > 15:
            raise KeyVaultError(400, "BadParameter", "A resource can have at most 15 tags.")
        for k, v in tags.items():
            if not isinstance(k, str) or not isinstance(v, str) or not 0 < len(k) <= 512 or len(v) > 256:
                raise KeyVaultError(400, "BadParameter", "Tag names are at most 512 characters and tag values at most 256.")
        return dict(tags)

    def _set(self, name: str, value: str, content_type: str | None, tags: dict[str, str], enabled: bool) -> _Version:
        key = self._name(name)
        s = self._secrets.get(key)
        if s is not None and s.deleted_date is not None:
            raise KeyVaultError(
                409, "Conflict",
                f"Secret {name} is currently in a deleted but recoverable state, and its name cannot be reused; "
                "in this state, the secret can only be recovered or purged.",
                inner="ObjectIsDeletedButRecoverable",
            )
        if s is None:
            s = self._secrets[key] = _Secret(name=name)
        now = _now()
        v = _Version(uuid.uuid4().hex, value, content_type, tags, enabled, now, now)
        s.versions.append(v)
        return v

    @staticmethod
    def _page(items: list[dict[str, Any]], base: str, path: str, query: dict[str, str]) -> dict[str, Any]:
        try:
            size = int(query.get("maxresults") or 25)
            skip = int(query.get("$skiptoken") or 0)
        except ValueError:
            raise KeyVaultError(400, "BadParameter", "maxresults and $skiptoken must be integers.") from None
        if not 1 <= size <= 25:
            raise KeyVaultError(400, "BadParameter", "The value of maxresults must be between 1 and 25.")
        page = items[skip : skip + size]
        nxt = None
        if skip + size < len(items):
            nxt = f"{base}{path}?api-version={query['api-version']}&$skiptoken={skip + size}&maxresults={size}"
        return {"value": page, "nextLink": nxt}

    def _vault(self, method: str, path: str, base: str, query: dict[str, str], app: App, body: Any) -> tuple[int, Any]:
        parts = [p for p in path.split("/")]
        parts = parts[1:]  # leading ""
        with self._lock:
            if parts[0] == "secrets":
                if len(parts) == 1 and method == "GET":
                    self._require(app, "list")
                    items = []
                    for s in sorted(self._secrets.values(), key=lambda s: s.name.lower()):
                        if s.deleted_date is None:
                            item = self._bundle(base, s, s.versions[-1], value=False)
                            item["id"] = f"{base}/secrets/{s.name}"
                            items.append(item)
                    return 200, self._page(items, base, "/secrets", query)
                if len(parts) == 2 and method == "PUT":
                    self._require(app, "set")
                    if not isinstance(body, dict) or not isinstance(body.get("value"), str):
                        raise KeyVaultError(400, "BadParameter", "Property value is required.")
                    if len(body["value"].encode()) > MAX_VALUE_BYTES:
                        raise KeyVaultError(400, "BadParameter", "Secret value exceeds the maximum allowed size of 25 KB.")
                    attrs = body.get("attributes") or {}
                    v = self._set(parts[1], body["value"], body.get("contentType"), self._check_tags(body.get("tags")), attrs.get("enabled", True) is not False)
                    return 200, self._bundle(base, self._secrets[parts[1].lower()], v)
                if len(parts) == 2 and method == "DELETE":
                    self._require(app, "delete")
                    s = self._live(parts[1])
                    s.deleted_date = _now()
                    return 200, self._deleted(base, s)
                if len(parts) == 3 and parts[2] == "versions" and method == "GET":
                    self._require(app, "list")
                    s = self._live(parts[1])
                    items = [self._bundle(base, s, v, value=False) for v in sorted(s.versions, key=lambda v: v.id)]
                    return 200, self._page(items, base, f"/secrets/{s.name}/versions", query)
                if len(parts) == 3 and method == "GET":
                    self._require(app, "get")
                    s = self._live(parts[1])
                    v = self._version(s, parts[2])
                    if not v.enabled:
                        raise KeyVaultError(403, "Forbidden", "Operation get is not allowed on a disabled secret.", inner="SecretDisabled")
                    return 200, self._bundle(base, s, v)
                if len(parts) == 3 and method == "PATCH":
                    self._require(app, "set")
                    s = self._live(parts[1])
                    v = self._version(s, parts[2])
                    body = body if isinstance(body, dict) else {}
                    if "tags" in body and body["tags"] is not None:
                        v.tags = self._check_tags(body["tags"])
                    if "contentType" in body and body["contentType"] is not None:
                        v.content_type = body["contentType"]
                    if "enabled" in (body.get("attributes") or {}):
                        v.enabled = bool(body["attributes"]["enabled"])
                    v.updated = _now()
                    return 200, self._bundle(base, s, v, value=False)
            elif parts[0] == "deletedsecrets":
                if len(parts) == 1 and method == "GET":
                    self._require(app, "list")
                    items = []
                    for s in sorted(self._secrets.values(), key=lambda s: s.name.lower()):
                        if s.deleted_date is not None:
                            item = self._deleted(base, s)
                            item["id"] = f"{base}/secrets/{s.name}"
                            items.append(item)
                    return 200, self._page(items, base, "/deletedsecrets", query)
                if len(parts) == 2 and method == "GET":
                    self._require(app, "get")
                    return 200, self._deleted(base, self._deleted_secret(parts[1]))
                if len(parts) == 2 and method == "DELETE":
                    self._require(app, "purge")
                    s = self._deleted_secret(parts[1])
                    if self.purge_protection:
                        raise KeyVaultError(
                            403, "Forbidden",
                            f"Operation 'purge' is not allowed on secret {s.name} because purge protection is enabled for this vault.",
                        )
                    del self._secrets[s.name.lower()]
                    return 204, None
                if len(parts) == 3 and parts[2] == "recover" and method == "POST":
                    self._require(app, "recover")
                    s = self._deleted_secret(parts[1])
                    s.deleted_date = None
                    return 200, self._bundle(base, s, s.versions[-1], value=False)
        raise KeyVaultError(404, "NotFound", "The requested resource was not found.")

    # --- the HTTP app -------------------------------------------------------------------------

    def _build_app(self) -> Any:
        api = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

        def base_of(request: Request) -> str:
            return f"https://{request.headers.get('host', self.authority)}"

        def entra_error(exc: EntraError) -> JSONResponse:
            with self._lock:
                self.refused.append(exc.aadsts)
            return JSONResponse(self._entra_body(exc), status_code=exc.status)

        @api.get("/{tenant}/v2.0/.well-known/openid-configuration")
        async def openid_configuration(tenant: str, request: Request) -> Response:
            try:
                return JSONResponse(self._openid_configuration(base_of(request), tenant))
            except EntraError as exc:
                return entra_error(exc)

        @api.get("/{tenant}/discovery/v2.0/keys")
        async def keys(tenant: str) -> Response:
            try:
                return JSONResponse(self._jwks(tenant))
            except EntraError as exc:
                return entra_error(exc)

        @api.post("/{tenant}/oauth2/v2.0/token")
        async def token(tenant: str, request: Request) -> Response:
            form = {k: str(v) for k, v in (await request.form()).items()}
            try:
                return JSONResponse(self._token(base_of(request), tenant, form), headers={"Cache-Control": "no-store"})
            except EntraError as exc:
                return entra_error(exc)

        @api.api_route("/{rest:path}", methods=["GET", "PUT", "PATCH", "DELETE", "POST"])
        async def vault(rest: str, request: Request) -> Response:
            path = "/" + rest  # `GET /secrets/{name}/` (the SDK's "current version") keeps its empty version
            if self.delay:
                await asyncio.sleep(self.delay)
            try:
                app = self._authenticate(request.headers.get("authorization"))
                query = dict(request.query_params)
                if not _API_VERSION.match(query.get("api-version", "")):
                    raise KeyVaultError(400, "BadParameter", "The request URI contains an invalid or missing api-version.")
                raw = await request.body()
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    raise KeyVaultError(400, "BadParameter", "The request body is not valid JSON.") from None
                status, out = self._vault(request.method, path, base_of(request), query, app, body)
            except KeyVaultError as exc:
                error: dict[str, Any] = {"code": exc.code, "message": exc.message}
                if exc.inner:
                    error["innererror"] = {"code": exc.inner}
                return JSONResponse({"error": error}, status_code=exc.status, headers=exc.headers)
            if out is None:
                return Response(status_code=status)
            return JSONResponse(out, status_code=status)

        return api
