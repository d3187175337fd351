"""GCP: short-lived OAuth 2.0 access tokens, optionally downscoped to one Cloud Storage bucket.

Three auth methods, each ending in one access token per lease:

- ``service-account``: the material is a service-account key; the token is the key's own,
  from the OAuth 2.0 JWT-bearer grant at the key's ``token_uri`` (google-auth's
  ``service_account.Credentials``, run in a worker thread). Google fixes its lifetime (an
  hour) and the grant takes no lifetime parameter: **the token outlives a shorter lease** (the
  credential's ``expiry`` says when it really ends). Use ``impersonation`` or ``web-identity``
  when the lease's lifetime must bind.
- ``impersonation``: the material is a *source* service-account key; its token calls IAM
  Credentials ``generateAccessToken`` for ``config.target_service_account`` with the lease's
  lifetime (the source needs ``roles/iam.serviceAccountTokenCreator`` on the target). The
  source token is used only for that call and is never handed out.
- ``web-identity`` (keyless, see "Keyless auth methods" in connectors/base.py): no material.
  The gateway signs a JWT for the issuance (``sub`` the principal, ``run`` the run, ``aud``
  ``config.web_identity_audience``, by default ``https:`` + the provider's resource name, which
  is what a workload identity pool OIDC provider accepts unless told otherwise); Google STS
  trades it for a federated token (``audience`` the provider's resource name,
  ``config.workload_identity_provider``), which calls ``generateAccessToken`` for
  ``config.target_service_account`` with the lease's lifetime. The pool provider maps
  ``google.subject=assertion.sub`` (at most 127 bytes: a principal is short enough), and the
  target account grants ``roles/iam.serviceAccountTokenCreator`` to the pool's principals
  (``principal://.../subject/credgate/run:RUN`` or a ``principalSet``).

Material (``service-account`` and ``impersonation``): the key file Google's console downloads,
either as its fields (``type``, ``project_id``, ``private_key_id``, ``private_key``,
``client_email``, ``token_uri``, ...; every value of a key file is a string, so the file maps
one-to-one onto a backend secret) or as one field ``key_json`` holding the whole file. Only
``private_key`` is secret; the other fields are identifiers. Unknown key-file fields
(``auth_uri``, ``client_x509_cert_url``...) are ignored.

Resources:

- ``gcp-project:PROJECT_ID``: the identity's own token (scopes ``config.scopes``, by default
  cloud-platform). An access token is **not confined to a project**: it carries every
  permission its identity has anywhere; the resource names the project the caller works in
  (returned as ``project_id``) and lets policy tell projects apart. ``list_resources`` returns
  the connector's project (``config.project_id``, else the key's).
- ``gcs-bucket:BUCKET``: the token downscoped with a Credential Access Boundary (STS token
  exchange with ``options``, byte for byte as google-auth's ``downscoped.Credentials`` sends
  it: its STS URL is fixed to ``https://sts.<universe>/v1/token`` and can't be pointed
  elsewhere, so the exchange is made here with httpx) naming
  ``//storage.googleapis.com/projects/_/buckets/BUCKET`` and ``inRole:`` ``config.bucket_role``
  (default ``roles/storage.objectViewer``). The downscoped token can reach that bucket only, with
  at most that role, and no other API.

Access tokens can't be revoked or extended by credgate (``EXPIRY_ONLY``): ``revoke`` is a no-op
and ``renew`` raises NotRenewable. Endpoints default to Google's (the key's ``token_uri``,
``https://iamcredentials.googleapis.com``, ``https://sts.googleapis.com``,
``https://storage.googleapis.com``) and may be pointed elsewhere in config (tests use a local
stand-in). An instance keeps one requests session (google-auth's transport) and one httpx
client, closed by ``aclose``.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any, ClassVar, Literal
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationInfo, field_validator, model_validator

from connectors.base import (
    endpoint_url,
    is_ipv4,
    ConnectorBase,
    ConnectorCapabilities,
    IssueRequest,
    Issued,
    KeylessMaterial,
    NotRenewable,
    PoolLimits,
    ResourceNotSupported,
    Revocability,
    TargetError,
    TargetUnreachable,
    TTLLimits,
    Verification,
    generic_sanitize,
    run_sync,
)
from gateway.errors import ValidationFailed

__all__ = [
    "GCPConnector", "GCPConfig", "GCPServiceAccountKey", "GCPWebIdentityMaterial", "access_boundary", "parse_resource",
]

GOOGLE_TOKEN_URL = "https://oauth2.googleapis.com/token"
CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
TT_ACCESS = "urn:ietf:params:oauth:token-type:access_token"
TT_JWT = "urn:ietf:params:oauth:token-type:jwt"
PROJECT_PREFIX, BUCKET_PREFIX = "gcp-project:", "gcs-bucket:"
_PROJECT = re.compile(r"^[a-z][a-z0-9-]{4,28}[a-z0-9]$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]$")
_EMAIL = r"^[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9.-]{1,255}$"
_PROVIDER = (r"^//iam\.googleapis\.com/projects/\d{1,20}/locations/global/workloadIdentityPools/[a-z0-9-]{4,32}"
             r"/providers/[a-z0-9-]{4,32}$")
CONNECT_TIMEOUT = 10.0
DEFAULT_TIMEOUT = 30.0
SOURCE_TOKEN_MARGIN = timedelta(minutes=5)  # a cached source token is renewed this long before it ends


class GCPServiceAccountKey(BaseModel):
    """A service-account key file: its fields, or ``key_json`` holding the whole file."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["service_account"] = "service_account"
    project_id: str | None = Field(None, max_length=64)
    private_key_id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9]+$")
    private_key: SecretStr
    client_email: str = Field(max_length=320, pattern=_EMAIL)
    client_id: str | None = Field(None, max_length=64)
    token_uri: str = Field(GOOGLE_TOKEN_URL, max_length=512)
    universe_domain: str = Field("googleapis.com", max_length=255)

    @model_validator(mode="before")
    @classmethod
    def _whole_file(cls, data: Any) -> Any:
        if not isinstance(data, Mapping) or "key_json" not in data:
            return data
        if set(data) != {"key_json"}:
            raise ValueError("give either key_json or the key file's fields, not both")
        raw = data["key_json"]
        raw = raw.get_secret_value() if isinstance(raw, SecretStr) else raw
        try:
            parsed = json.loads(raw)
        except (TypeError, ValueError):
            raise ValueError("key_json is not a JSON document") from None
        if not isinstance(parsed, dict):
            raise ValueError("key_json is not a JSON object")
        return parsed

    def info(self, token_uri: str | None = None) -> dict[str, str]:
        """The key file as google-auth takes it (holds the private key: never log it)."""
        out = {
            "type": self.type, "private_key_id": self.private_key_id,
            "private_key": self.private_key.get_secret_value(), "client_email": self.client_email,
            "token_uri": token_uri or self.token_uri, "universe_domain": self.universe_domain,
        }
        if self.project_id:
            out["project_id"] = self.project_id
        return out


class GCPWebIdentityMaterial(KeylessMaterial):
    """Auth method ``web-identity``: no material. The gateway signs a JWT per issuance and
    Google STS trades it through the configured workload identity pool provider."""


class GCPConfig(BaseModel):
    """Which identity, which scopes, and where Google's endpoints are."""

    model_config = ConfigDict(extra="forbid")

    project_id: str | None = Field(None, pattern=_PROJECT.pattern,
                                   description="the project of gcp-project resources; default: the key's")
    scopes: list[str] = Field(default_factory=lambda: [CLOUD_PLATFORM], min_length=1, max_length=20)
    target_service_account: str | None = Field(None, max_length=320, pattern=_EMAIL,
                                               description="impersonation, web-identity: the account tokens are for")
    workload_identity_provider: str | None = Field(None, pattern=_PROVIDER,
                                                   description="web-identity: the pool provider's resource name")
    web_identity_audience: str | None = Field(None, min_length=1, max_length=512,
                                              description="web-identity: the JWT's aud; default https: + provider")
    bucket_role: str = Field("roles/storage.objectViewer", pattern=r"^roles/storage\.[A-Za-z]{1,64}$")
    token_uri: str | None = Field(None, max_length=512, description="overrides the key's token_uri")
    iam_endpoint: str = Field("https://iamcredentials.googleapis.com", max_length=512)
    sts_endpoint: str = Field("https://sts.googleapis.com", max_length=512)
    storage_endpoint: str = Field("https://storage.googleapis.com", max_length=512)

    @field_validator("token_uri", "iam_endpoint", "sts_endpoint", "storage_endpoint")
    @classmethod
    def _url(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else endpoint_url(value, info.field_name or "the URL")

    @field_validator("scopes")
    @classmethod
    def _scopes(cls, value: list[str]) -> list[str]:
        if not all(re.fullmatch(r"https://www\.googleapis\.com/auth/[A-Za-z0-9._/-]{1,128}", s) for s in value):
            raise ValueError("each scope is an https://www.googleapis.com/auth/... URL")
        return list(dict.fromkeys(value))

    @property
    def audience(self) -> str:
        return self.web_identity_audience or f"https:{self.workload_identity_provider}"


def parse_resource(resource: str) -> tuple[str, str]:
    """``(resource type, project id or bucket name)``; raises ResourceNotSupported."""
    if isinstance(resource, str) and resource.startswith(PROJECT_PREFIX):
        project = resource[len(PROJECT_PREFIX):]
        if _PROJECT.match(project):
            return "gcp-project", project
        raise ResourceNotSupported("A GCP project id is 6-30 characters of a-z 0-9 -, starting with a letter.")
    if isinstance(resource, str) and resource.startswith(BUCKET_PREFIX):
        bucket = resource[len(BUCKET_PREFIX):]
        if _BUCKET.match(bucket) and ".." not in bucket and not bucket.startswith("goog") and not is_ipv4(bucket):
            return "gcs-bucket", bucket
        raise ResourceNotSupported(
            "A Cloud Storage bucket name is 3-63 characters of a-z 0-9 . _ -, starts and ends with a letter "
            "or digit, does not start with 'goog' and is not an IP address."
        )
    raise ResourceNotSupported("A gcp resource is 'gcp-project:<project id>' or 'gcs-bucket:<bucket name>'.")


def access_boundary(bucket: str, role: str = "roles/storage.objectViewer") -> dict[str, Any]:
    """The Credential Access Boundary of a ``gcs-bucket`` token (what google-auth's
    ``CredentialAccessBoundary.to_json()`` makes for one rule)."""
    return {"accessBoundary": {"accessBoundaryRules": [{
        "availableResource": f"//storage.googleapis.com/projects/_/buckets/{bucket}",
        "availablePermissions": [f"inRole:{role}"],
    }]}}


def _vendor_code(body: Any) -> str | None:
    """Google's error code from a JSON error body: ``error.status`` (APIs) or ``error`` (OAuth)."""
    if not isinstance(body, dict):
        return None
    err = body.get("error")
    if isinstance(err, dict):
        status = err.get("status")
        return status if isinstance(status, str) and re.fullmatch(r"[A-Z_]{1,64}", status) else None
    if isinstance(err, str) and re.fullmatch(r"[a-z_]{1,64}", err):
        return err
    return None


class _TimeoutRequest:
    """google-auth's requests transport with our own timeout on every call."""

    def __init__(self, request: Any, timeout: float) -> None:
        self._request, self._timeout = request, timeout

    def __call__(self, url: str, method: str = "GET", body: Any = None, headers: Any = None,
                 timeout: Any = None, **kwargs: Any) -> Any:
        return self._request(url, method=method, body=body, headers=headers, timeout=self._timeout, **kwargs)


class GCPConnector(ConnectorBase):
    """Short-lived GCP access tokens; see the module docstring."""

    type: ClassVar[str] = "gcp"
    auth_methods: ClassVar[Mapping[str, type[BaseModel]]] = MappingProxyType({
        "service-account": GCPServiceAccountKey, "impersonation": GCPServiceAccountKey,
        "web-identity": GCPWebIdentityMaterial,
    })
    config_model: ClassVar[type[BaseModel]] = GCPConfig
    resource_types: ClassVar[tuple[str, ...]] = ("gcp-project", "gcs-bucket")
    capabilities: ClassVar[ConnectorCapabilities] = ConnectorCapabilities(Revocability.EXPIRY_ONLY, renewable=False)
    # generateAccessToken's lifetime is at most an hour unless an org policy raises it; the
    # JWT-bearer grant's token lives an hour.
    ttl: ClassVar[TTLLimits] = TTLLimits(default=timedelta(hours=1), min=timedelta(minutes=5), max=timedelta(hours=1))

    def __init__(
        self, config: BaseModel, auth_method: str, material: BaseModel, *, name: str = "", pool: PoolLimits | None = None
    ) -> None:
        super().__init__(config, auth_method, material, name=name, pool=pool)
        self.config: GCPConfig
        cfg = self.config
        if auth_method in ("impersonation", "web-identity") and not cfg.target_service_account:
            raise ValidationFailed(f"Auth method {auth_method} needs config.target_service_account.",
                                   code="invalid_connector_config")
        if auth_method == "service-account" and cfg.target_service_account:
            raise ValidationFailed("target_service_account is used by impersonation and web-identity only.",
                                   code="invalid_connector_config")
        if auth_method == "web-identity":
            if not cfg.workload_identity_provider:
                raise ValidationFailed("Auth method web-identity needs config.workload_identity_provider.",
                                       code="invalid_connector_config")
            if not cfg.project_id:
                raise ValidationFailed("Auth method web-identity needs config.project_id (there is no key to read it from).",
                                       code="invalid_connector_config")
        elif cfg.workload_identity_provider or cfg.web_identity_audience:
            raise ValidationFailed("workload_identity_provider is used by web-identity only.",
                                   code="invalid_connector_config")
        self._threads = f"connector:{name or 'gcp'}"
        self._session: Any = None  # requests.Session for google-auth, built on first use
        self._http: Any = None  # httpx.AsyncClient, built on first use
        self._source: tuple[str, datetime] | None = None  # impersonation: the source key's token, cached
        self._key_creds: Any = None  # the material key, parsed once (see _key_credentials)
        self._key_lock = threading.Lock()

    @classmethod
    def sanitize(cls, exc: BaseException) -> str:
        """A google-auth or httpx error as its class and Google's error code (``invalid_grant``,
        ``PERMISSION_DENIED``), never its message: google-auth quotes the whole response body."""
        args = getattr(exc, "args", ())
        code = _vendor_code(args[1]) if len(args) > 1 else None
        if code is None:
            response = getattr(exc, "response", None)
            try:
                code = _vendor_code(response.json()) if response is not None and hasattr(response, "json") else None
            except Exception:  # noqa: BLE001 - no JSON body: no code
                code = None
        return f"{type(exc).__name__} ({code})" if code else generic_sanitize(exc)

    def __repr__(self) -> str:
        return f"<GCPConnector {self.auth_method} {self.name}>"

    @property
    def project(self) -> str | None:
        if self.config.project_id:
            return self.config.project_id
        return getattr(self._material, "project_id", None)

    @property
    def identity_email(self) -> str:
        if self.auth_method == "service-account":
            return self._material.client_email  # type: ignore[attr-defined, no-any-return]
        return self.config.target_service_account  # type: ignore[return-value]

    # -- pure -------------------------------------------------------------------------

    def validate_resource(self, resource: str) -> str:
        return parse_resource(resource)[0]

    def plan(self, lease_id: str, resource: str) -> dict[str, Any]:
        """Nothing to revoke: the identity and the kind of token, for the audit trail."""
        kind, _ = parse_resource(resource)
        return {"auth_method": self.auth_method, "identity": self.identity_email,
                "downscoped": kind == "gcs-bucket"}

    # -- clients ----------------------------------------------------------------------

    def _requests_session(self) -> Any:
        if self._session is None:
            import requests

            self._session = requests.Session()
        return self._session

    def _client(self) -> Any:
        if self._http is None:
            import httpx

            self._http = httpx.AsyncClient(timeout=httpx.Timeout(DEFAULT_TIMEOUT, connect=CONNECT_TIMEOUT),
                                           follow_redirects=False, trust_env=False)
        return self._http

    async def aclose(self) -> None:
        http, session = self._http, self._session
        self._http = self._session = None
        if http is not None:
            await http.aclose()
        if session is not None:
            session.close()

    # -- the token chain ----------------------------------------------------------------

    async def _key_token(self, scopes: list[str], timeout: float) -> tuple[str, datetime]:
        """The material key's own access token (JWT-bearer grant, google-auth, in a worker thread)."""
        def refresh() -> tuple[str, datetime]:
            from google.auth.transport.requests import Request

            creds = self._key_credentials().with_scopes(scopes)  # a copy: its own token, the same signer
            creds.refresh(_TimeoutRequest(Request(self._requests_session()), min(timeout, DEFAULT_TIMEOUT)))
            expiry = creds.expiry.replace(tzinfo=UTC) if creds.expiry.tzinfo is None else creds.expiry
            return creds.token, expiry

        return await self._call("the OAuth 2.0 token request", timeout, refresh)

    def _key_credentials(self) -> Any:
        """The material key as google-auth credentials, its private key parsed once per instance
        (loading an RSA key costs ~60 ms of CPU: its primes are checked); each issuance refreshes
        a scoped copy of it, which shares the signer and holds its own token."""
        with self._key_lock:
            if self._key_creds is None:
                from google.oauth2 import service_account

                key: GCPServiceAccountKey = self._material  # type: ignore[assignment]
                try:
                    self._key_creds = service_account.Credentials.from_service_account_info(
                        key.info(self.config.token_uri))
                except (ValueError, TypeError):
                    raise TargetError("The service-account key's private_key could not be loaded.",
                                      code="target_auth_failed") from None
            return self._key_creds

    async def _source_token(self, timeout: float) -> str:
        cached = self._source
        if cached is not None and cached[1] - SOURCE_TOKEN_MARGIN > datetime.now(UTC):
            return cached[0]
        token, expiry = await self._key_token([CLOUD_PLATFORM], timeout)
        self._source = (token, expiry)
        return token

    async def _post(self, doing: str, url: str, timeout: float, **kwargs: Any) -> dict[str, Any]:
        """One call to IAM Credentials or STS: its JSON answer, or a sanitized error."""
        import httpx

        try:
            response = await asyncio.wait_for(self._client().post(url, **kwargs), timeout)
        except (httpx.TransportError, asyncio.TimeoutError, OSError) as exc:
            raise TargetUnreachable(f"Google could not be reached for {doing} ({generic_sanitize(exc)}).") from None
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code == 200 and isinstance(body, dict):
            return body
        code = _vendor_code(body)
        what = f"HTTP {response.status_code}" + (f", {code}" if code else "")
        if response.status_code >= 500:
            raise TargetUnreachable(f"Google failed {doing} ({what}).")
        if response.status_code == 401 or code in ("invalid_grant", "unauthorized_client", "UNAUTHENTICATED"):
            raise TargetError(f"Google refused the credentials for {doing} ({what}).", code="target_auth_failed")
        if response.status_code == 403:
            raise TargetError(f"Google denied {doing} ({what}).", code="target_permission_denied")
        raise TargetError(f"Google refused {doing} ({what}).")

    async def _generate(self, bearer: str, lifetime: int, timeout: float) -> tuple[str, datetime]:
        """IAM Credentials ``generateAccessToken`` for the target account, living ``lifetime`` seconds."""
        email = self.config.target_service_account
        url = f"{self.config.iam_endpoint}/v1/projects/-/serviceAccounts/{quote(email or '', safe='@.')}:generateAccessToken"
        body = await self._post("generateAccessToken", url, timeout, headers={"Authorization": f"Bearer {bearer}"},
                                json={"scope": self.config.scopes, "lifetime": f"{lifetime}s"})
        try:
            token = body["accessToken"]
            expiry = datetime.fromisoformat(body["expireTime"].replace("Z", "+00:00"))
        except (KeyError, TypeError, ValueError, AttributeError):
            raise TargetError("Google's generateAccessToken answer had no token or expiry.") from None
        return token, expiry

    async def _sts(self, doing: str, form: dict[str, str], timeout: float) -> tuple[str, int | None]:
        body = await self._post(doing, f"{self.config.sts_endpoint}/v1/token", timeout, data=form)
        token, expires_in = body.get("access_token"), body.get("expires_in")
        if not isinstance(token, str) or not token:
            raise TargetError(f"Google STS answered {doing} without a token.")
        return token, expires_in if isinstance(expires_in, int) else None

    async def _federated(self, req: IssueRequest | None, timeout: float) -> str:
        """web-identity: the gateway's JWT traded at STS for a federated token."""
        subject = await self.identity_token(self.config.audience, req)
        token, _ = await self._sts("the workload identity federation exchange", {
            "grant_type": TOKEN_EXCHANGE, "audience": self.config.workload_identity_provider or "",
            "scope": CLOUD_PLATFORM, "requested_token_type": TT_ACCESS,
            "subject_token": subject, "subject_token_type": TT_JWT,
        }, timeout)
        return token

    async def _identity_token(self, req: IssueRequest | None, lifetime: int, timeout: float) -> tuple[str, datetime]:
        """The (not yet downscoped) token of the connector's identity."""
        if self.auth_method == "service-account":
            return await self._key_token(self.config.scopes, timeout)
        bearer = (await self._source_token(timeout) if self.auth_method == "impersonation"
                  else await self._federated(req, timeout))
        return await self._generate(bearer, lifetime, timeout)

    async def _downscope(self, token: str, expiry: datetime, bucket: str, timeout: float) -> tuple[str, datetime]:
        """The Credential Access Boundary exchange, encoded as google-auth's ``sts.Client`` encodes it."""
        options = quote(json.dumps(access_boundary(bucket, self.config.bucket_role)))
        now = datetime.now(UTC)
        down, expires_in = await self._sts("the access boundary exchange", {
            "grant_type": TOKEN_EXCHANGE, "requested_token_type": TT_ACCESS,
            "subject_token": token, "subject_token_type": TT_ACCESS, "options": options,
        }, timeout)
        return down, (now + timedelta(seconds=expires_in)) if expires_in else expiry

    async def _call(self, doing: str, timeout: float, fn: Any) -> Any:
        try:
            return await run_sync(fn, timeout=timeout, pool=self._threads)
        except TargetError:
            raise
        except Exception as exc:  # noqa: BLE001 - every google-auth failure is mapped, never quoted
            raise self._map(exc, doing) from None

    def _map(self, exc: BaseException, doing: str) -> TargetError:
        from google.auth import exceptions as gexc

        what = self.sanitize(exc)
        if isinstance(exc, (asyncio.TimeoutError, OSError, gexc.TransportError)):
            return TargetUnreachable(f"Google could not be reached for {doing} ({what}).")
        if isinstance(exc, gexc.RefreshError):
            args = exc.args
            retryable = bool(getattr(exc, "retryable", False))
            status = args[1] if len(args) > 1 else None
            if retryable and not _vendor_code(status):
                return TargetUnreachable(f"Google failed {doing} ({what}).")
            return TargetError(f"Google refused the service-account key for {doing} ({what}).", code="target_auth_failed")
        return TargetError(f"Google failed {doing} ({what}).")

    # -- the protocol -------------------------------------------------------------------

    async def issue(self, req: IssueRequest) -> Issued:
        kind, name = parse_resource(req.resource)
        lifetime = max(1, int(req.ttl.total_seconds()))
        token, expiry = await self._identity_token(req, lifetime, req.timeout_seconds)
        credential = {"token_type": "Bearer", "service_account": self.identity_email}
        if kind == "gcs-bucket":
            token, expiry = await self._downscope(token, expiry, name, req.timeout_seconds)
            credential |= {"bucket": name, "role": self.config.bucket_role,
                           "storage_endpoint": self.config.storage_endpoint}
        else:
            credential["project_id"] = name
        credential |= {"access_token": token, "expiry": expiry.isoformat()}
        return Issued(credential=credential, expires_at=min(expiry, req.expires_at))

    async def renew(self, revoke_state: Mapping[str, Any], expires_at: datetime) -> datetime:
        raise NotRenewable("GCP access tokens can't be extended; request a new lease.")

    async def revoke(self, revoke_state: Mapping[str, Any]) -> None:
        """Nothing to do: access tokens end at their expiry."""
        return None

    async def verify(self) -> Verification:
        """Obtains a token for the connector's identity (15 minutes where a lifetime is taken) and
        reports it; ``reachable`` holds the connector's project."""
        try:
            await self._identity_token(None, 900, DEFAULT_TIMEOUT)
        except TargetError as exc:
            return Verification(ok=False, message=exc.message)
        message = f"Obtained a GCP access token for {self.identity_email} ({self.auth_method})."
        if self.auth_method == "web-identity" and self.identity is not None:
            message += (f" No secret is held: the workload identity pool provider trusts this gateway as OIDC "
                        f"issuer {self.identity.issuer}.")
        reachable = {"gcp-project": [PROJECT_PREFIX + self.project]} if self.project else {}
        return Verification(ok=True, message=message, identity=self.identity_email, reachable=reachable)

    async def list_resources(self, resource_type: str) -> list[str]:
        if resource_type == "gcp-project":
            return [PROJECT_PREFIX + self.project] if self.project else []
        if resource_type != "gcs-bucket":
            raise ResourceNotSupported(
                f"Connector type gcp has no resource type {resource_type!r}; it has: gcp-project, gcs-bucket."
            )
        if not self.project:
            return []
        return await self._buckets()

    async def _buckets(self) -> list[str]:
        """The buckets of the connector's project its identity may list (Cloud Storage JSON API)."""
        import httpx

        token, _ = await self._identity_token(None, 900, DEFAULT_TIMEOUT)
        url = f"{self.config.storage_endpoint}/storage/v1/b"
        names: list[str] = []
        params: dict[str, str] = {"project": self.project or "", "fields": "items/name,nextPageToken"}
        for _ in range(100):  # pages
            try:
                response = await self._client().get(url, params=params, headers={"Authorization": f"Bearer {token}"})
            except (httpx.TransportError, OSError) as exc:
                raise TargetUnreachable(f"Cloud Storage could not be reached ({generic_sanitize(exc)}).") from None
            if response.status_code != 200:
                try:
                    code = _vendor_code(response.json())
                except ValueError:
                    code = None
                raise TargetError(f"Cloud Storage refused listing buckets (HTTP {response.status_code}"
                                  f"{', ' + code if code else ''}).",
                                  code="target_permission_denied" if response.status_code == 403 else None)
            body = response.json()
            names += [b["name"] for b in body.get("items", []) if isinstance(b, dict) and isinstance(b.get("name"), str)]
            if not body.get("nextPageToken"):
                break
            params["pageToken"] = body["nextPageToken"]
        return sorted(BUCKET_PREFIX + n for n in names)
