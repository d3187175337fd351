"""A STAND-IN for the Microsoft identity platform (Entra ID, v2.0 token endpoint) and for the
Blob Storage data plane's user-delegation SAS, for tests only. It is not Microsoft's service:
Azure can't run on this machine, so this module re-implements, from Microsoft's public
references ("Microsoft identity platform and the OAuth 2.0 client credentials flow",
"Workload identity federation", "Get User Delegation Key", "Create a user delegation SAS",
"Get Blob", "Put Blob", "Delete Blob", "Azure Storage error codes"), what credgate's ``azure``
connector and its tests use. It serves real HTTPS on 127.0.0.1 (a self-signed certificate for
``localhost`` and ``127.0.0.1``, written to :attr:`ca_file`), so it is driven by the vendor's
own clients: azure-identity (``authority=host:port``, ``disable_instance_discovery=True``,
``connection_verify=ca_file``) and azure-storage-blob (``connection_verify=ca_file``).

What it verifies, never assumes:

- Entra ``POST /{tenant}/oauth2/v2.0/token`` (``grant_type=client_credentials``; ``scope`` one
  of ``https://management.azure.com/.default``, ``https://vault.azure.net/.default``,
  ``https://storage.azure.com/.default``), the client authenticated by

  (a) ``client_secret``: one of the app's registered secrets;
  (b) a certificate ``client_assertion``: its RS256/PS256 signature with the public key of the
      registered certificate that its ``x5t`` or ``x5t#S256`` thumbprint names, ``aud`` this
      token endpoint, ``iss`` = ``sub`` = the client id, a live ``exp``;
  (c) a federated ``client_assertion`` (workload identity federation): the issuer's keys are
      *fetched* as Entra fetches them (``{iss}/.well-known/openid-configuration``, then its
      ``jwks_uri``; fetched again for an unknown ``kid``), the RS256 signature verified with the
      key the ``kid`` names, ``exp``/``nbf``, and ``iss``, ``sub`` and ``aud``
      (``api://AzureADTokenExchange``) must equal one of the app's federated identity
      credentials **exactly** (Entra has no wildcard subjects).

  It answers an access token (a JWT it signs, RS256, ``aud`` the scope's resource, ``tid``,
  ``oid``, ``appid``) or Entra's error shape (``error``, ``error_description`` starting with
  ``AADSTSnnnn``, ``error_codes``). Discovery: ``GET /{tenant}/v2.0/.well-known/openid-configuration``
  and ``GET /{tenant}/discovery/v2.0/keys``.

- Blob ``POST /{account}/?restype=service&comp=userdelegationkey``: a bearer token this stand-in
  issued (signature, ``aud`` ``https://storage.azure.com``, tenant, expiry), from an app that holds
  a data-plane role on the account (:meth:`grant`); ``KeyInfo`` ``Expiry`` in the future and at
  most 7 days away. The key (32 random bytes) is remembered with its ``skoid``/``sktid``/
  ``skt``/``ske``/``sks``/``skv``.

- Blob ``GET``/``PUT``/``DELETE /{account}/{container}/{blob}`` with a user-delegation SAS in the
  query: the delegation key its ``skoid``/``skt``/``ske``/``skv`` name must be one handed out for
  this account; the signature is recomputed (HMAC-SHA256 with the base64-decoded key over the
  string-to-sign of version ``2026-10-06``, the version azure-storage-blob 12.31 signs; others are
  refused) with the canonicalized resource of *the request* (``/blob/ACCOUNT/CONTAINER`` for
  ``sr=c``, ``.../BLOB`` for ``sr=b``), so a SAS for container A fails on container B and a
  tampered field or ``sig`` fails; ``st`` <= now <= ``se`` and the key's ``skt``/``ske``;
  ``spr`` allows https; the operation's permission (``r`` get, ``w`` put, or ``c`` put of a new
  blob, ``d`` delete) must be in ``sp`` *and* in the app's role on the account (the intersection
  Azure applies). Refusals are Azure Storage's XML errors with ``x-ms-error-code``
  (403 ``AuthenticationFailed``, ``AuthorizationPermissionMismatch``; 404 ``ContainerNotFound``,
  ``BlobNotFound``).

- Resource Manager ``GET /arm/subscriptions?api-version=...`` (Subscriptions - List, one page): a
  management-scope bearer token this stand-in issued; the subscriptions :meth:`add_subscription`
  gave the app.

Not implemented: the rest of Azure Resource Manager, Key Vault (see azure_keyvault.py), listing blobs,
block/page/append blob APIs beyond a single-shot Put Blob, ``sip``, stored access policies,
``saoid``/``suoid``/``scid`` semantics (they are signed, not enforced), key revocation.

Test knobs (not Azure's): ``token_lifetime``; ``seed()`` and ``blob()`` write and read behind the
API; ``token_requests``, ``refused`` (AADSTS codes) and ``storage_refused`` (storage error codes)
record what happened.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import secrets
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.etree import ElementTree
from xml.sax.saxutils import escape

import httpx
import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from tests.standins.azure_keyvault import new_rsa_key, pem_of, self_signed

FEDERATED_AUDIENCE = "api://AzureADTokenExchange"
RESOURCES = ("https://management.azure.com", "https://vault.azure.net", "https://storage.azure.com")
STORAGE = "https://storage.azure.com"
SAS_VERSIONS = frozenset({"2026-10-06"})
MAX_KEY_DAYS = 7
CLOCK_SKEW = 300
_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
_TIME = "%Y-%m-%dT%H:%M:%SZ"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _parse_time(value: str) -> float:
    return dt.datetime.strptime(value, _TIME).replace(tzinfo=dt.timezone.utc).timestamp()


@dataclass
class App:
    """An app registration (a service principal) in the stand-in's tenant."""

    client_id: str
    object_id: str
    secrets: set[str] = field(default_factory=set)
    certificates: list[x509.Certificate] = field(default_factory=list)
    federated: list[tuple[str, str, str]] = field(default_factory=list)  # (issuer, subject, audience)
    roles: dict[str, str] = field(default_factory=dict)  # storage account -> data permissions ("rwdc")
    subscriptions: set[str] = field(default_factory=set)  # what Resource Manager shows the app


class EntraError(Exception):
    def __init__(self, status: int, error: str, aadsts: int, description: str) -> None:
        self.status, self.error, self.aadsts, self.description = status, error, aadsts, description


class StorageError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        self.status, self.code, self.message = status, code, message


class EntraStorageStandIn:
    """One tenant and its storage accounts on one HTTPS port (see the module docstring)."""

    def __init__(self, *, tenant_id: str | None = None, token_lifetime: int = 3600) -> None:
        self.tenant_id = tenant_id or str(uuid.uuid4())
        self.token_lifetime = token_lifetime
        self.apps: dict[str, App] = {}
        self.accounts: dict[str, dict[str, dict[str, bytes]]] = {}  # account -> container -> blob -> data
        self.token_requests: list[tuple[str, str, str]] = []  # (client id, how, resource)
        self.refused: list[int] = []
        self.storage_refused: list[str] = []
        self._keys: dict[tuple[str, str, str, str, str], tuple[str, str]] = {}  # (account, oid, skt, ske, skv) -> (value, tid)
        self._issuer_keys: dict[str, jwt.PyJWKSet] = {}
        self._lock = threading.RLock()
        self._signing_key = new_rsa_key()
        self._kid = secrets.token_hex(8)
        self._dir = Path(tempfile.mkdtemp(prefix="entra-storage-"))
        tls_key = new_rsa_key()
        self.ca_file = str(self._dir / "tls-cert.pem")
        self._key_file = str(self._dir / "tls-key.pem")
        Path(self.ca_file).write_bytes(self_signed(tls_key, "localhost", tls=True).public_bytes(serialization.Encoding.PEM))
        Path(self._key_file).write_bytes(tls_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        self.port: int | None = None
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.app = self._build_app()

    # --- registry ------------------------------------------------------------------------

    def _new_app(self) -> App:
        app = App(client_id=str(uuid.uuid4()), object_id=str(uuid.uuid4()))
        with self._lock:
            self.apps[app.client_id] = app
        return app

    def add_secret_app(self) -> tuple[str, str]:
        """An app with a client secret: (client id, secret)."""
        app = self._new_app()
        secret = "cs~" + secrets.token_urlsafe(30)
        app.secrets.add(secret)
        return app.client_id, secret

    def add_certificate_app(self) -> tuple[str, bytes]:
        """An app with a certificate credential: (client id, PEM of key + certificate)."""
        app = self._new_app()
        key = new_rsa_key()
        cert = self_signed(key, f"app-{app.client_id[:8]}")
        app.certificates.append(cert)
        return app.client_id, pem_of(key, cert)

    def add_federated_app(self, issuer: str, subject: str) -> str:
        """An app with one federated identity credential (issuer, exact subject)."""
        app = self._new_app()
        app.federated.append((issuer.rstrip("/"), subject, FEDERATED_AUDIENCE))
        return app.client_id

    def grant(self, client_id: str, account: str, permissions: str = "rwdc") -> None:
        """A data-plane role for the app on ``account`` (what a SAS it signs can at most do)."""
        with self._lock:
            self.apps[client_id].roles[account] = permissions

    def add_subscription(self, client_id: str, subscription_id: str) -> None:
        """A role for the app on a subscription: Resource Manager's ``GET /subscriptions`` lists it."""
        with self._lock:
            self.apps[client_id].subscriptions.add(subscription_id)

    def object_id(self, client_id: str) -> str:
        return self.apps[client_id].object_id

    def seed(self, account: str, container: str, blobs: dict[str, bytes] | None = None) -> None:
        with self._lock:
            self.accounts.setdefault(account, {}).setdefault(container, {}).update(blobs or {})

    def blob(self, account: str, container: str, name: str) -> bytes | None:
        with self._lock:
            return self.accounts.get(account, {}).get(container, {}).get(name)

    def public_jwks(self) -> dict[str, Any]:
        return self._jwks(self.tenant_id)

    # --- lifecycle -------------------------------------------------------------------------

    @property
    def authority(self) -> str:
        assert self.port is not None, "start() first"
        return f"127.0.0.1:{self.port}"

    @property
    def arm_endpoint(self) -> str:
        """The connector's ``arm_endpoint`` for this stand-in (the account name ``arm`` is reserved)."""
        return f"https://{self.authority}/arm"

    def blob_endpoint(self, port: int | None = None) -> str:
        """The connector's ``blob_endpoint`` template for this stand-in (path-style accounts)."""
        return f"https://127.0.0.1:{port or self.port}/{{account}}"

    def start(self) -> EntraStorageStandIn:
        import uvicorn

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port or 0))
        sock.listen(128)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, ssl_keyfile=self._key_file, ssl_certfile=self.ca_file, log_level="warning",
                                lifespan="off", timeout_graceful_shutdown=1, access_log=False)
        server = uvicorn.Server(config)
        self._server = server
        self._thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True,
                                        name=f"entra-storage-{self.port}")
        self._thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the Entra/Storage stand-in did not start")
            time.sleep(0.01)
        sock.close()
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(10)
        self._thread = self._server = None

    # --- Entra ---------------------------------------------------------------------------------

    def _check_tenant(self, tenant: str) -> None:
        if tenant.lower() != self.tenant_id.lower():
            raise EntraError(400, "invalid_tenant", 90002, f"Tenant '{tenant}' not found.")

    def _openid_configuration(self, base: str, tenant: str) -> dict[str, Any]:
        self._check_tenant(tenant)
        root = f"{base}/{tenant}"
        return {
            "issuer": f"{root}/v2.0", "token_endpoint": f"{root}/oauth2/v2.0/token",
            "jwks_uri": f"{root}/discovery/v2.0/keys", "authorization_endpoint": f"{root}/oauth2/v2.0/authorize",
            "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt", "client_secret_basic"],
            "id_token_signing_alg_values_supported": ["RS256"], "response_types_supported": ["code", "id_token"],
            "subject_types_supported": ["pairwise"], "tenant_region_scope": "WW",
            "cloud_instance_name": "microsoftonline.com",
        }

    def _jwks(self, tenant: str) -> dict[str, Any]:
        self._check_tenant(tenant)
        numbers = self._signing_key.public_key().public_numbers()
        b64 = lambda n: _b64url(n.to_bytes((n.bit_length() + 7) // 8, "big"))  # noqa: E731
        return {"keys": [{"kty": "RSA", "use": "sig", "kid": self._kid, "n": b64(numbers.n), "e": b64(numbers.e)}]}

    async def _token(self, base: str, tenant: str, form: dict[str, str]) -> dict[str, Any]:
        self._check_tenant(tenant)
        if form.get("grant_type") != "client_credentials":
            raise EntraError(400, "unsupported_grant_type", 70003, "The app requested an unsupported grant type.")
        client_id = form.get("client_id", "")
        with self._lock:
            app = self.apps.get(client_id)
        if app is None:
            raise EntraError(400, "unauthorized_client", 700016,
                             f"Application with identifier '{client_id}' was not found in the directory '{tenant}'.")
        scope = form.get("scope", "")
        resource = scope.removesuffix("/.default")
        if not scope.endswith("/.default") or resource not in RESOURCES:
            raise EntraError(400, "invalid_scope", 1002012, f"The provided value for scope {scope} is not valid.")
        endpoint = f"{base}/{tenant}/oauth2/v2.0/token"
        if "client_secret" in form:
            if form["client_secret"] not in app.secrets:
                raise EntraError(401, "invalid_client", 7000215, "Invalid client secret provided.")
            how = "client_secret"
        elif form.get("client_assertion_type") == _ASSERTION_TYPE and form.get("client_assertion"):
            how = await self._check_assertion(app, form["client_assertion"], endpoint)
        else:
            raise EntraError(401, "invalid_client", 7000218,
                             "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.")
        now = int(time.time())
        claims = {
            "aud": resource, "iss": f"https://sts.windows.net/{self.tenant_id}/", "iat": now, "nbf": now,
            "exp": now + self.token_lifetime, "appid": app.client_id, "oid": app.object_id, "sub": app.object_id,
            "tid": self.tenant_id, "idtyp": "app", "ver": "1.0", "appidacr": "1" if how == "client_secret" else "2",
        }
        token = jwt.encode(claims, self._signing_key, algorithm="RS256", headers={"kid": self._kid})
        with self._lock:
            self.token_requests.append((app.client_id, how, resource))
        return {"token_type": "Bearer", "expires_in": self.token_lifetime, "ext_expires_in": self.token_lifetime,
                "access_token": token}

    async def _check_assertion(self, app: App, assertion: str, endpoint: str) -> str:
        try:
            header = jwt.get_unverified_header(assertion)
            unverified = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise EntraError(401, "invalid_client", 50027, "JWT token is invalid or malformed.") from None
        if unverified.get("iss") == app.client_id:
            return self._check_certificate_assertion(app, assertion, header, endpoint)
        return await self._check_federated_assertion(app, assertion, header, unverified)

    def _check_certificate_assertion(self, app: App, assertion: str, header: dict[str, Any], endpoint: str) -> str:
        s256, s1 = str(header.get("x5t#S256", "")).rstrip("="), str(header.get("x5t", "")).rstrip("=")
        cert = next((c for c in app.certificates
                     if s256 == _b64url(c.fingerprint(hashes.SHA256())) or s1 == _b64url(c.fingerprint(hashes.SHA1()))),
                    None)
        if cert is None:
            raise EntraError(401, "invalid_client", 700027,
                             "The certificate with identifier used to sign the client assertion is not registered on application.")
        if header.get("alg") not in ("RS256", "PS256"):
            raise EntraError(401, "invalid_client", 5002738, "The token signing algorithm is not supported.")
        try:
            claims = jwt.decode(assertion, cert.public_key(), algorithms=[header["alg"]], audience=endpoint,
                                options={"require": ["exp", "aud", "iss", "sub"]}, leeway=30)
        except jwt.ExpiredSignatureError:
            raise EntraError(401, "invalid_client", 700024, "Client assertion is not within its valid time range.") from None
        except jwt.InvalidAudienceError:
            raise EntraError(401, "invalid_client", 700021, "Client assertion audience is wrong.") from None
        except jwt.PyJWTError:
            raise EntraError(401, "invalid_client", 700027, "Client assertion failed signature validation.") from None
        if claims["sub"] != app.client_id:
            raise EntraError(401, "invalid_client", 700021, "Client assertion application identifier doesn't match.")
        return "certificate"

    async def _issuer_key(self, issuer: str, kid: str | None) -> Any:
        """The issuer's key named ``kid``, from its discovery document and JWKS (fetched, cached,
        fetched again for an unknown kid), as Entra does for a federated credential's issuer."""
        keys = self._issuer_keys.get(issuer)
        if keys is None or kid not in {k.key_id for k in keys.keys}:
            async with httpx.AsyncClient(timeout=5) as client:
                doc = (await client.get(f"{issuer}/.well-known/openid-configuration")).raise_for_status().json()
                if str(doc.get("issuer", "")).rstrip("/") != issuer:
                    raise ValueError("the discovery document names another issuer")
                keys = jwt.PyJWKSet.from_dict((await client.get(doc["jwks_uri"])).raise_for_status().json())
            self._issuer_keys[issuer] = keys
        for k in keys.keys:
            if k.key_id == kid:
                return k.key
        raise ValueError("no key with this kid")

    async def _check_federated_assertion(self, app: App, assertion: str, header: dict[str, Any],
                                         unverified: dict[str, Any]) -> str:
        iss = str(unverified.get("iss", "")).rstrip("/")
        if not any(i == iss for i, _, _ in app.federated):
            raise EntraError(401, "invalid_client", 700211,
                             "No matching federated identity record found for presented assertion issuer.")
        try:
            key = await self._issuer_key(iss, header.get("kid"))
            claims = jwt.decode(assertion, key, algorithms=["RS256"], audience=FEDERATED_AUDIENCE,
                                issuer=unverified.get("iss"), options={"require": ["exp", "aud", "iss", "sub"]})
        except jwt.ExpiredSignatureError:
            raise EntraError(401, "invalid_client", 700024, "Client assertion is not within its valid time range.") from None
        except jwt.InvalidAudienceError:
            raise EntraError(401, "invalid_client", 700212,
                             "No matching federated identity record found for presented assertion audience.") from None
        except (jwt.PyJWTError, ValueError, KeyError, httpx.HTTPError):
            raise EntraError(401, "invalid_client", 700027, "Client assertion failed signature validation.") from None
        if not any((i, s) == (iss, claims["sub"]) for i, s, _ in app.federated):
            raise EntraError(401, "invalid_client", 700213,
                             "No matching federated identity record found for presented assertion subject.")
        return "workload_identity"

    def _entra_body(self, exc: EntraError) -> dict[str, Any]:
        trace, corr = str(uuid.uuid4()), str(uuid.uuid4())
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
        return {"error": exc.error, "error_codes": [exc.aadsts], "timestamp": stamp, "trace_id": trace,
                "correlation_id": corr,
                "error_description": f"AADSTS{exc.aadsts}: {exc.description}\r\nTrace ID: {trace}\r\nCorrelation ID: {corr}"}

    # --- Blob storage ---------------------------------------------------------------------------

    def _bearer_app(self, authorization: str | None, audience: str = STORAGE) -> App:
        if not authorization or not authorization.startswith("Bearer "):
            raise StorageError(401, "NoAuthenticationInformation", "Server failed to authenticate the request.")
        try:
            claims = jwt.decode(authorization[7:], self._signing_key.public_key(), algorithms=["RS256"],
                                audience=audience, leeway=CLOCK_SKEW, options={"require": ["exp", "oid", "tid"]})
        except jwt.PyJWTError:
            raise StorageError(401, "InvalidAuthenticationInfo", "Authentication information is not given in the correct format.") from None
        if claims["tid"] != self.tenant_id:
            raise StorageError(401, "InvalidAuthenticationInfo", "Issuer validation failed.")
        with self._lock:
            app = next((a for a in self.apps.values() if a.object_id == claims["oid"]), None)
        if app is None:
            raise StorageError(401, "InvalidAuthenticationInfo", "Unknown principal.")
        return app

    def _delegation_key(self, account: str, authorization: str | None, version: str, body: bytes) -> str:
        app = self._bearer_app(authorization)
        if account not in app.roles:
            raise StorageError(403, "AuthorizationPermissionMismatch",
                               "This request is not authorized to perform this operation using this permission.")
        try:
            root = ElementTree.fromstring(body)
            start_text = root.findtext("Start") or dt.datetime.now(dt.timezone.utc).strftime(_TIME)
            expiry_text = root.findtext("Expiry") or ""
            start, expiry = _parse_time(start_text), _parse_time(expiry_text)
        except (ElementTree.ParseError, ValueError):
            raise StorageError(400, "InvalidXmlDocument", "XML specified is not syntactically valid.") from None
        now = time.time()
        if expiry <= now or expiry <= start or expiry > now + MAX_KEY_DAYS * 86400:
            raise StorageError(400, "InvalidQueryParameterValue", "The key expiry is not valid.")
        value = base64.b64encode(secrets.token_bytes(32)).decode()
        with self._lock:
            self._keys[(account, app.object_id, start_text, expiry_text, version)] = (value, self.tenant_id)
        return (
            '<?xml version="1.0" encoding="utf-8"?><UserDelegationKey>'
            f"<SignedOid>{app.object_id}</SignedOid><SignedTid>{self.tenant_id}</SignedTid>"
            f"<SignedStart>{escape(start_text)}</SignedStart><SignedExpiry>{escape(expiry_text)}</SignedExpiry>"
            f"<SignedService>b</SignedService><SignedVersion>{escape(version)}</SignedVersion>"
            f"<Value>{value}</Value></UserDelegationKey>"
        )

    @staticmethod
    def _string_to_sign(q: dict[str, str], resource: str) -> str:
        """The reference's user-delegation string-to-sign (version 2026-10-06), written out here on
        its own so that the connector's implementation is checked, not copied."""
        order = ["sp", "st", "se", None, "skoid", "sktid", "skt", "ske", "sks", "skv", "saoid", "suoid", "scid",
                 "skdutid", "sduoid", "sip", "spr", "sv", "sr", "snapshot", "ses", "srh", "srq",
                 "rscc", "rscd", "rsce", "rscl", "rsct"]
        return "\n".join(resource if k is None else q.get(k, "") for k in order)

    def _check_sas(self, account: str, container: str, blob: str, q: dict[str, str], any_of: str) -> None:
        """Raise the StorageError Azure answers unless the SAS in ``q`` allows one of the
        permissions ``any_of`` on this blob (see the module docstring)."""
        denied = lambda m: StorageError(403, "AuthenticationFailed", f"Server failed to authenticate the request. {m}")  # noqa: E731
        needed = ("sp", "se", "sv", "sr", "sig", "skoid", "sktid", "skt", "ske", "sks", "skv")
        if any(not q.get(k) for k in needed):
            raise denied("The SAS is missing a required field.")
        if q["sv"] not in SAS_VERSIONS:
            raise denied("This stand-in checks SAS version 2026-10-06 only.")
        with self._lock:
            key = self._keys.get((account, q["skoid"], q["skt"], q["ske"], q["skv"]))
            app = next((a for a in self.apps.values() if a.object_id == q["skoid"]), None)
        if key is None or key[1] != q["sktid"] or q["sks"] != "b" or app is None:
            raise denied("The user delegation key the SAS names was not issued by this account.")
        if q["sr"] == "c":
            resource = f"/blob/{account}/{container}"
        elif q["sr"] == "b":
            resource = f"/blob/{account}/{container}/{blob}"
        else:
            raise denied("Unsupported signed resource.")
        expected = base64.b64encode(hmac.new(base64.b64decode(key[0]), self._string_to_sign(q, resource).encode(),
                                             hashlib.sha256).digest()).decode()
        if not hmac.compare_digest(expected, q["sig"]):
            raise denied("Signature did not match.")
        now = time.time()
        try:
            start = _parse_time(q["st"]) if q.get("st") else 0.0
            times = (start, _parse_time(q["se"]), _parse_time(q["skt"]), _parse_time(q["ske"]))
        except ValueError:
            raise denied("A signed time is malformed.") from None
        if not (times[0] <= now <= times[1]) or not (times[2] - CLOCK_SKEW <= now <= times[3]):
            raise denied("Signed expiry time must be after the current time, start before it.")
        if "https" not in q.get("spr", "https,http").split(","):
            raise denied("This request is not authorized to perform this operation using this protocol.")
        if not any(p in q["sp"] for p in any_of):
            raise StorageError(403, "AuthorizationPermissionMismatch",
                               "This request is not authorized to perform this operation using this permission.")
        if not any(p in q["sp"] and p in app.roles.get(account, "") for p in any_of):
            raise StorageError(403, "AuthorizationPermissionMismatch",
                               "The signing principal's role does not grant this permission.")

    def _blob_op(self, method: str, account: str, container: str, blob: str, q: dict[str, str],
                 headers: Any, body: bytes) -> Response:
        with self._lock:
            containers = self.accounts.get(account)
            exists = containers is not None and container in containers and blob in containers[container]
        # Put Blob: a new blob needs create or write, an existing one write.
        any_of = {"GET": "r", "HEAD": "r", "DELETE": "d"}.get(method) or ("w" if exists else "wc")
        self._check_sas(account, container, blob, q, any_of)
        with self._lock:
            if containers is None or container not in containers:
                raise StorageError(404, "ContainerNotFound", "The specified container does not exist.")
            blobs = containers[container]
            common = {"x-ms-version": headers.get("x-ms-version", ""), "x-ms-request-id": str(uuid.uuid4())}
            if method == "PUT":
                if headers.get("x-ms-blob-type") != "BlockBlob":
                    raise StorageError(400, "InvalidHeaderValue", "Only single-shot BlockBlob uploads are served here.")
                blobs[blob] = body
                return Response(status_code=201, headers={**common, "ETag": f'"0x{secrets.token_hex(8).upper()}"',
                                                          "Last-Modified": _http_date(), "x-ms-request-server-encrypted": "true"})
            if blob not in blobs:
                raise StorageError(404, "BlobNotFound", "The specified blob does not exist.")
            if method == "DELETE":
                del blobs[blob]
                return Response(status_code=202, headers=common)
            data = blobs[blob]
        head = {**common, "ETag": '"0x1"', "Last-Modified": _http_date(), "x-ms-blob-type": "BlockBlob",
                "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
        rng = headers.get("x-ms-range") or headers.get("range")
        if rng and rng.startswith("bytes=") and data:
            first, _, last = rng[6:].partition("-")
            lo, hi = int(first or 0), min(int(last) if last else len(data) - 1, len(data) - 1)
            return Response(content=data[lo:hi + 1], status_code=206,
                            headers={**head, "Content-Range": f"bytes {lo}-{hi}/{len(data)}"})
        return Response(content=data, status_code=200, headers=head)

    # --- the HTTP app ------------------------------------------------------------------------------

    def _build_app(self) -> Any:
        api = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

        def base_of(request: Request) -> str:
            return f"https://{request.headers.get('host', self.authority)}"

        def entra_error(exc: EntraError) -> JSONResponse:
            with self._lock:
                self.refused.append(exc.aadsts)
            return JSONResponse(self._entra_body(exc), status_code=exc.status)

        def storage_error(exc: StorageError) -> Response:
            with self._lock:
                self.storage_refused.append(exc.code)
            body = (f'<?xml version="1.0" encoding="utf-8"?><Error><Code>{exc.code}</Code>'
                    f"<Message>{escape(exc.message)}\nRequestId:{uuid.uuid4()}</Message></Error>")
            return Response(body, status_code=exc.status, media_type="application/xml",
                            headers={"x-ms-error-code": exc.code})

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
                return JSONResponse(await self._token(base_of(request), tenant, form), headers={"Cache-Control": "no-store"})
            except EntraError as exc:
                return entra_error(exc)

        @api.get("/arm/subscriptions")
        async def subscriptions(request: Request) -> Response:
            """Resource Manager's Subscriptions - List (one page), for a management-scope token."""
            try:
                if not request.query_params.get("api-version"):
                    raise StorageError(400, "MissingApiVersionParameter", "The api-version query parameter is required.")
                app = self._bearer_app(request.headers.get("authorization"), audience=RESOURCES[0])
            except StorageError as exc:
                return JSONResponse({"error": {"code": exc.code, "message": exc.message}}, status_code=exc.status)
            items = [{"id": f"/subscriptions/{sub}", "subscriptionId": sub, "tenantId": self.tenant_id,
                      "displayName": f"sub {sub[:8]}", "state": "Enabled"} for sub in sorted(app.subscriptions)]
            return JSONResponse({"value": items})

        @api.api_route("/{rest:path}", methods=["GET", "HEAD", "PUT", "DELETE", "POST"])
        async def storage(rest: str, request: Request) -> Response:
            parts = rest.split("/", 2)
            q = dict(request.query_params)
            body = await request.body()
            try:
                if request.method == "POST" and len(parts) <= 2 and not "".join(parts[1:]) \
                        and q.get("restype") == "service" and q.get("comp") == "userdelegationkey":
                    xml = self._delegation_key(parts[0], request.headers.get("authorization"),
                                               request.headers.get("x-ms-version", ""), body)
                    return Response(xml, media_type="application/xml",
                                    headers={"x-ms-version": request.headers.get("x-ms-version", "")})
                if len(parts) == 3 and parts[2] and request.method != "POST":
                    return self._blob_op(request.method, parts[0], parts[1], parts[2], q, request.headers, body)
                raise StorageError(400, "UnsupportedHttpVerb", "This stand-in does not serve this operation.")
            except StorageError as exc:
                return storage_error(exc)

        return api


def _http_date() -> str:
    return time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime())
