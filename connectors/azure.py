"""Azure: Entra access tokens for a subscription or a key vault, user-delegation SAS for a container.

Auth methods:

- ``service-principal``: an app registration's client-credentials grant. ``tenant_id`` and
  ``client_id`` are not secret and live in ``config``; the material is exactly one of
  ``client_secret`` or ``client_certificate`` (one PEM holding the private key and its
  certificate). azure-identity's ``ClientSecretCredential`` / ``CertificateCredential``,
  one per instance, built on first use; it caches each scope's token until shortly
  before its expiry, so leases issued close together share a token.
- ``web-identity`` (keyless): no material. Entra trusts the gateway as the issuer of a
  *federated identity credential* on the app; the gateway signs a JWT for the audience
  ``api://AzureADTokenExchange`` and azure-identity's ``ClientAssertionCredential`` trades it
  for the access token. Entra matches the assertion's ``sub`` **exactly** (no wildcard), so
  ``federated_subject`` chooses it:

  - ``connector`` (default): ``connector:<name>``, the same for every issuance, so one
    federated credential on the app (issuer = the gateway, subject ``connector:<name>``)
    covers the connector. The token still carries ``run`` and ``lease`` claims.
  - ``principal``: the issuance's principal (``IssueRequest.principal``), as AWS
    web-identity does; only usable when the principals are few and fixed, each with its
    own federated credential. ``verify`` then still asserts ``connector:<name>``.

Resources and what is issued for them:

- ``azure-subscription:SUB_ID``: an access token for ``https://management.azure.com/.default``.
- ``key-vault:VAULT_NAME``: an access token for ``https://vault.azure.net/.default`` and the
  vault's URL (``key_vault_endpoint``).
- ``blob-container:ACCOUNT/CONTAINER``: a user-delegation SAS for the container. The gateway
  takes a token for ``https://storage.azure.com/.default``, asks the account's blob service
  for a user delegation key (``POST /?restype=service&comp=userdelegationkey``, ``KeyInfo``
  ``Start``/``Expiry`` = the lease's), and signs a container SAS (``sr=c``) with it: ``sp`` the
  configured ``blob_permissions`` (default ``r``), ``st`` five minutes ago (clock skew), ``se``
  the lease's expiry, ``spr=https``, ``sv`` :data:`SAS_VERSION`, and the key's ``skoid``,
  ``sktid``, ``skt``, ``ske``, ``sks``, ``skv``. The string to sign is the one of
  Microsoft's "Create a user delegation SAS" for that version (:func:`sas_string_to_sign`),
  HMAC-SHA256 with the base64-decoded key. What the SAS allows is the intersection of ``sp``
  and the app's own data-plane role on the account, as Azure evaluates it.

An access token's lifetime is Entra's choice (60-90 minutes by default); the client can't
shorten it. The lease's expiry is the earlier of the requested one and the token's, but a
token outlives a shorter lease: the credential's ``expires_on`` says when it really ends. A
SAS ends exactly at ``se``.

Nothing can be revoked (``EXPIRY_ONLY``): a token or a SAS is waited out (revoking the user
delegation keys of an account, ``revokeUserDelegationKeys``, would cut every SAS of every
lease at once: not done here). ``renew`` raises NotRenewable.

``list_resources("azure-subscription")`` asks Azure Resource Manager (``GET /subscriptions``)
which subscriptions the app sees; vaults and containers are not listed.

Endpoints are configurable for tests and sovereign clouds: ``authority`` (``host[:port]``;
instance discovery is disabled for a host that is not Microsoft's), ``blob_endpoint`` (a
template with ``{account}``), ``key_vault_endpoint`` (with ``{vault}``), ``arm_endpoint``,
``ca_bundle`` (a CA file for all of them).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import re
import threading
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any, ClassVar, Literal, TypeVar
from urllib.parse import quote, urlencode, urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from connectors.base import (
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
    "AzureConnector",
    "AzureConfig",
    "AzureServicePrincipalMaterial",
    "AzureWebIdentityMaterial",
    "SAS_VERSION",
    "SCOPES",
    "parse_resource",
    "sas_string_to_sign",
    "sign_sas",
]

FEDERATED_AUDIENCE = "api://AzureADTokenExchange"
SCOPES: Mapping[str, str] = MappingProxyType({
    "azure-subscription": "https://management.azure.com/.default",
    "key-vault": "https://vault.azure.net/.default",
    "blob-container": "https://storage.azure.com/.default",
})
# The service version the SAS is signed for and the user delegation key is requested with;
# sas_string_to_sign follows the string-to-sign of this version.
SAS_VERSION = "2026-10-06"
PERMISSION_ORDER = "racwdxyltfmei"  # a container SAS's permissions, in the order Azure requires
CLOCK_SKEW = timedelta(minutes=5)
MAX_KEY_LIFETIME = timedelta(days=7)  # Azure's limit for a user delegation key
_MICROSOFT_AUTHORITIES = frozenset({
    "login.microsoftonline.com", "login.microsoftonline.us", "login.chinacloudapi.cn", "login.microsoftonline.de",
})
_GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_VAULT = re.compile(r"^[A-Za-z](?!.*--)[A-Za-z0-9-]{1,22}[A-Za-z0-9]$")
_ACCOUNT = re.compile(r"^[a-z0-9]{3,24}$")
_CONTAINER = re.compile(r"^[a-z0-9](?!.*--)[a-z0-9-]{1,61}[a-z0-9]$")
_AADSTS = re.compile(r"AADSTS(\d{4,9})")
_T = TypeVar("_T")


class AzureServicePrincipalMaterial(BaseModel):
    """Auth method ``service-principal``: exactly one of a client secret or a certificate
    (PEM: the private key, unencrypted, and the certificate registered on the app)."""

    model_config = ConfigDict(extra="forbid")

    client_secret: SecretStr | None = None
    client_certificate: SecretStr | None = None

    @model_validator(mode="after")
    def _one(self) -> AzureServicePrincipalMaterial:
        if (self.client_secret is None) == (self.client_certificate is None):
            raise ValueError("give exactly one of client_secret or client_certificate")
        return self


class AzureWebIdentityMaterial(KeylessMaterial):
    """Auth method ``web-identity``: no material. The gateway signs a federated client
    assertion per call; the app trusts it through a federated identity credential."""


def _https_template(value: str, placeholder: str) -> str:
    probe = value.replace(placeholder, "x")
    try:
        parts = urlsplit(probe)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise ValueError("not a valid URL template") from None
    if placeholder not in value:
        raise ValueError(f"the template must contain {placeholder}")
    if parts.scheme != "https" or not parts.hostname:
        raise ValueError("the template must be an https:// URL with a host (Azure refuses a SAS or token over http)")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ValueError("the template must not carry credentials, a query or a fragment")
    return value.rstrip("/")


class AzureConfig(BaseModel):
    """The app registration (not secret), the endpoints, and what a blob SAS allows."""

    model_config = ConfigDict(extra="forbid")

    tenant_id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9.-]+$")
    client_id: str = Field(pattern=_GUID.pattern)
    authority: str = Field("login.microsoftonline.com", max_length=512,
                           pattern=r"^(https://)?[A-Za-z0-9.-]+(:[0-9]{1,5})?/?$")
    ca_bundle: str | None = Field(None, min_length=1, max_length=4096,
                                  description="a CA file for the authority and the services (tests, proxies)")
    blob_endpoint: str = Field("https://{account}.blob.core.windows.net", max_length=512)
    key_vault_endpoint: str = Field("https://{vault}.vault.azure.net", max_length=512)
    arm_endpoint: str = Field("https://management.azure.com", max_length=512,
                              description="Azure Resource Manager, where subscriptions are listed")
    blob_permissions: str = Field("r", min_length=1, max_length=len(PERMISSION_ORDER))
    federated_subject: Literal["connector", "principal"] = "connector"
    connection_timeout: float = Field(5.0, gt=0, le=60)
    read_timeout: float = Field(10.0, gt=0, le=120)

    @field_validator("blob_endpoint")
    @classmethod
    def _blob(cls, value: str) -> str:
        return _https_template(value, "{account}")

    @field_validator("key_vault_endpoint")
    @classmethod
    def _vault(cls, value: str) -> str:
        return _https_template(value, "{vault}")

    @field_validator("arm_endpoint")
    @classmethod
    def _arm(cls, value: str) -> str:
        return _https_template(value + "{}", "{}").removesuffix("{}")

    @field_validator("blob_permissions")
    @classmethod
    def _permissions(cls, value: str) -> str:
        if not set(value) <= set(PERMISSION_ORDER) or len(set(value)) != len(value):
            raise ValueError(f"blob_permissions are distinct letters of {PERMISSION_ORDER}")
        return "".join(p for p in PERMISSION_ORDER if p in value)

    @property
    def authority_host(self) -> str:
        return self.authority.removeprefix("https://").rstrip("/")


def parse_resource(resource: str) -> tuple[str, tuple[str, ...]]:
    """``(resource type, parts)``; raises ResourceNotSupported. Pure."""
    kind, sep, rest = resource.partition(":") if isinstance(resource, str) else ("", "", "")
    if sep and kind == "azure-subscription":
        if _GUID.match(rest):
            return kind, (rest.lower(),)
        raise ResourceNotSupported("An azure-subscription resource is 'azure-subscription:<subscription GUID>'.")
    if sep and kind == "key-vault":
        if _VAULT.match(rest):
            return kind, (rest.lower(),)
        raise ResourceNotSupported(
            "A key vault name is 3-24 characters of letters, digits and single hyphens, starting with a letter."
        )
    if sep and kind == "blob-container":
        account, slash, container = rest.partition("/")
        if slash and _ACCOUNT.match(account) and _CONTAINER.match(container):
            return kind, (account, container)
        raise ResourceNotSupported(
            "A blob-container resource is 'blob-container:<account>/<container>': an account of 3-24 "
            "lowercase letters and digits, a container of 3-63 lowercase letters, digits and single hyphens."
        )
    raise ResourceNotSupported(
        "An azure resource is 'azure-subscription:<id>', 'key-vault:<name>' or 'blob-container:<account>/<container>'."
    )


def _sas_time(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def sas_string_to_sign(fields: Mapping[str, str], canonicalized_resource: str) -> str:
    """The string to sign of a user-delegation service SAS of version :data:`SAS_VERSION` (the
    one azure-storage-blob 12.31 signs too): one line per field in the reference's order, an
    empty line for an absent field, the ``/blob/ACCOUNT/CONTAINER[/BLOB]`` resource after
    ``se``. Pure."""
    get = lambda k: fields.get(k, "")  # noqa: E731
    lines = [
        get("sp"), get("st"), get("se"), canonicalized_resource,
        get("skoid"), get("sktid"), get("skt"), get("ske"), get("sks"), get("skv"),
        get("saoid"), get("suoid"), get("scid"), get("skdutid"), get("sduoid"),
        get("sip"), get("spr"), get("sv"), get("sr"), get("snapshot"), get("ses"),
        get("srh"), get("srq"),
        get("rscc"), get("rscd"), get("rsce"), get("rscl"), get("rsct"),
    ]
    return "\n".join(lines)


def sign_sas(fields: Mapping[str, str], canonicalized_resource: str, key_b64: str) -> str:
    """HMAC-SHA256 of the string to sign with the base64-decoded delegation key, base64."""
    key = base64.b64decode(key_b64)
    digest = hmac.new(key, sas_string_to_sign(fields, canonicalized_resource).encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def _root(exc: BaseException) -> BaseException:
    """What an azure-identity ``ClientAuthenticationError`` wraps (it raises one ``from`` a
    failed connection too), else the exception itself."""
    seen = 0
    while exc.__cause__ is not None and seen < 5 and type(exc).__name__ == "ClientAuthenticationError":
        exc = exc.__cause__
        seen += 1
    return exc


class _Refused(Exception):
    """The blob service or Resource Manager answered with an error (status and code only)."""

    def __init__(self, status: int, code: str | None) -> None:
        super().__init__(status, code)
        self.status, self.code = status, code


class AzureConnector(ConnectorBase):
    """Entra access tokens and user-delegation SAS tokens; see the module docstring."""

    type: ClassVar[str] = "azure"
    auth_methods: ClassVar[Mapping[str, type[BaseModel]]] = MappingProxyType(
        {"service-principal": AzureServicePrincipalMaterial, "web-identity": AzureWebIdentityMaterial}
    )
    config_model: ClassVar[type[BaseModel]] = AzureConfig
    resource_types: ClassVar[tuple[str, ...]] = tuple(SCOPES)
    capabilities: ClassVar[ConnectorCapabilities] = ConnectorCapabilities(Revocability.EXPIRY_ONLY, renewable=False)
    ttl: ClassVar[TTLLimits] = TTLLimits(default=timedelta(hours=1), min=timedelta(minutes=5), max=timedelta(hours=12))

    def __init__(
        self, config: BaseModel, auth_method: str, material: BaseModel, *, name: str = "", pool: PoolLimits | None = None
    ) -> None:
        super().__init__(config, auth_method, material, name=name, pool=pool)
        self.config: AzureConfig
        if isinstance(self._material, AzureServicePrincipalMaterial) and self._material.client_certificate is not None:
            self._check_certificate(self._material.client_certificate.get_secret_value())
        self._threads = f"connector:{name or 'azure'}"
        self._credential: Any = None  # service-principal: built on first use, caches tokens per scope
        self._client: Any = None  # httpx.AsyncClient for Storage and Resource Manager, built on first use
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<AzureConnector {self.auth_method} tenant={self.config.tenant_id} client={self.config.client_id}>"

    async def start(self) -> None:
        """Refuse a ``ca_bundle`` that can't be read (else every call would look like a network failure)."""
        import os

        if self.config.ca_bundle and not os.access(self.config.ca_bundle, os.R_OK):
            raise ValidationFailed(f"Connector {self.name!r}: its ca_bundle can't be read.", code="invalid_ca_bundle")

    @staticmethod
    def _check_certificate(pem: str) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        try:
            load_pem_private_key(pem.encode(), password=None)
            x509.load_pem_x509_certificate(pem.encode())
        except (ValueError, TypeError):
            raise ValidationFailed(
                "The azure material's client_certificate must be one PEM with an unencrypted private key and its certificate.",
                code="invalid_connector_config",
            ) from None

    @classmethod
    def sanitize(cls, exc: BaseException) -> str:
        """An azure-core/azure-identity error as its class, HTTP status and AADSTS number (a
        wrapper names what it wraps the same way); never its message, which quotes ids and URLs."""
        if isinstance(exc, _Refused):
            return f"HTTP {exc.status}" + (f" ({exc.code})" if exc.code else "")
        root = _root(exc)
        if root is not exc:
            return f"{type(exc).__name__} from {cls.sanitize(root)}"
        if type(exc).__module__.startswith(("azure.", "msal")):
            parts: list[str] = []
            status = getattr(exc, "status_code", None)
            if isinstance(status, int):
                parts.append(str(status))
            m = _AADSTS.search(str(getattr(exc, "message", "") or ""))
            if m:
                parts.append(f"AADSTS{m.group(1)}")
            return f"{type(exc).__name__} ({', '.join(parts)})" if parts else type(exc).__name__
        return generic_sanitize(exc)

    def _error(self, exc: BaseException, doing: str) -> TargetError:
        import httpx
        from azure.core.exceptions import ClientAuthenticationError, ServiceRequestError, ServiceResponseError

        what = self.sanitize(exc)
        root = _root(exc)
        if isinstance(exc, (asyncio.TimeoutError, TimeoutError, httpx.TimeoutException)):
            return TargetUnreachable(f"Azure did not answer in time while {doing}.", code="target_timeout")
        if isinstance(root, (ServiceRequestError, ServiceResponseError, httpx.TransportError, OSError)):
            return TargetUnreachable(f"Azure could not be reached while {doing} ({what}).")
        if isinstance(exc, ClientAuthenticationError):
            return TargetError(f"Entra refused connector {self.name!r}'s credentials while {doing} ({what}).",
                               code="target_auth_failed")
        if isinstance(exc, _Refused):
            if exc.status == 403:
                return TargetError(f"Azure denied {doing} ({what}).", code="target_permission_denied")
            if exc.status == 401:
                return TargetError(f"Azure refused the token while {doing} ({what}).", code="target_auth_failed")
            if exc.status == 404:
                return TargetError(f"Azure found nothing while {doing} ({what}).", code="resource_not_found")
        return TargetError(f"Azure failed while {doing} ({what}).")

    # -- pure ------------------------------------------------------------------

    def validate_resource(self, resource: str) -> str:
        return parse_resource(resource)[0]

    def plan(self, lease_id: str, resource: str) -> dict[str, Any]:
        """What the lease is, for the audit trail: nothing is revoked."""
        kind, _ = parse_resource(resource)
        state: dict[str, Any] = {"resource_type": kind, "scope": SCOPES[kind], "auth_method": self.auth_method}
        if kind == "blob-container":
            state["permissions"] = self.config.blob_permissions
        return state

    # -- tokens ------------------------------------------------------------------

    def _kwargs(self) -> dict[str, Any]:
        c = self.config
        kw: dict[str, Any] = {
            "authority": c.authority_host, "connection_timeout": c.connection_timeout, "read_timeout": c.read_timeout,
            "retry_total": 1, "retry_backoff_factor": 0.2, "retry_backoff_max": 2,
        }
        if c.authority_host.split(":")[0].lower() not in _MICROSOFT_AUTHORITIES:
            kw["disable_instance_discovery"] = True
        if c.ca_bundle:
            kw["connection_verify"] = c.ca_bundle
        return kw

    def _service_principal(self) -> Any:
        credential = self._credential
        if credential is not None:
            return credential
        from azure.identity import CertificateCredential, ClientSecretCredential

        m = self._material
        assert isinstance(m, AzureServicePrincipalMaterial)
        with self._lock:
            if self._credential is None:
                c = self.config
                if m.client_secret is not None:
                    self._credential = ClientSecretCredential(
                        c.tenant_id, c.client_id, m.client_secret.get_secret_value(), **self._kwargs())
                else:
                    assert m.client_certificate is not None
                    self._credential = CertificateCredential(
                        c.tenant_id, c.client_id, certificate_data=m.client_certificate.get_secret_value().encode(),
                        **self._kwargs())
            return self._credential

    async def _assertion(self, req: IssueRequest | None) -> str:
        """The federated client assertion for this call (see ``federated_subject``)."""
        if req is None or self.config.federated_subject == "principal":
            return await self.identity_token(FEDERATED_AUDIENCE, req)
        if self.identity is None:
            raise TargetError(
                "This gateway is not set up as an OIDC issuer (no public URL), so web-identity can't be used.",
                code="oidc_issuer_unconfigured",
            )
        return await self.identity.token(audience=FEDERATED_AUDIENCE, subject=f"connector:{self.name}",
                                         run_id=req.run_id, lease_id=req.lease_id)

    async def _run(self, doing: str, timeout: float, fn: Callable[[], _T]) -> _T:
        try:
            return await run_sync(fn, timeout=timeout, pool=self._threads)
        except TargetError:
            raise
        except Exception as exc:  # noqa: BLE001 - every azure failure is mapped, never quoted
            raise self._error(exc, doing) from None

    async def _token(self, scope: str, req: IssueRequest | None, timeout: float) -> Any:
        """An ``AccessToken`` for ``scope`` (``.token``, ``.expires_on`` in epoch seconds)."""
        if self.auth_method == "service-principal":
            credential = self._service_principal()
            return await self._run("requesting an access token", timeout, lambda: credential.get_token(scope))
        assertion = await self._assertion(req)  # fetched here: the SDK calls its func in a thread

        def call() -> Any:
            from azure.identity import ClientAssertionCredential

            c = self.config
            credential = ClientAssertionCredential(c.tenant_id, c.client_id, lambda: assertion, **self._kwargs())
            try:
                return credential.get_token(scope)
            finally:
                credential.close()

        return await self._run("exchanging the federated assertion for an access token", timeout, call)

    # -- the blob service ------------------------------------------------------------

    def _blob_url(self, account: str) -> str:
        return self.config.blob_endpoint.replace("{account}", account)

    async def _delegation_key(self, account: str, token: str, start: datetime, expiry: datetime,
                              timeout: float) -> dict[str, str]:
        """Get User Delegation Key: the key's fields, by the names a SAS gives them."""
        from xml.etree import ElementTree

        import httpx

        body = (f'<?xml version="1.0" encoding="utf-8"?><KeyInfo><Start>{_sas_time(start)}</Start>'
                f"<Expiry>{_sas_time(expiry)}</Expiry></KeyInfo>")
        headers = {"Authorization": f"Bearer {token}", "x-ms-version": SAS_VERSION,
                   "Content-Type": "application/xml"}
        try:
            r = await self._http().post(f"{self._blob_url(account)}/", params={"restype": "service",
                                                                               "comp": "userdelegationkey"},
                                        content=body.encode(), headers=headers, timeout=httpx.Timeout(
                                            timeout, connect=self.config.connection_timeout))
            if r.status_code != 200:
                code = r.headers.get("x-ms-error-code")
                raise _Refused(r.status_code, code if code and re.fullmatch(r"[A-Za-z0-9]{1,64}", code) else None)
            root = ElementTree.fromstring(r.content)
        except TargetError:
            raise
        except Exception as exc:  # noqa: BLE001 - mapped, never quoted
            raise self._error(exc, "requesting a user delegation key") from None
        names = {"SignedOid": "skoid", "SignedTid": "sktid", "SignedStart": "skt", "SignedExpiry": "ske",
                 "SignedService": "sks", "SignedVersion": "skv", "Value": "value"}
        key = {short: (root.findtext(tag) or "") for tag, short in names.items()}
        if not all(key.values()):
            raise TargetError("The storage account's user delegation key answer is incomplete.")
        return key

    async def _sas(self, account: str, container: str, req: IssueRequest) -> tuple[dict[str, str], datetime]:
        now = datetime.now(UTC)
        expires = min(req.expires_at, now + MAX_KEY_LIFETIME)
        start = now - CLOCK_SKEW
        token = await self._token(SCOPES["blob-container"], req, req.timeout_seconds)
        key = await self._delegation_key(account, token.token, start, expires, req.timeout_seconds)
        fields = {
            "sp": self.config.blob_permissions, "st": _sas_time(start), "se": _sas_time(expires),
            "skoid": key["skoid"], "sktid": key["sktid"], "skt": key["skt"], "ske": key["ske"],
            "sks": key["sks"], "skv": key["skv"], "spr": "https", "sv": SAS_VERSION, "sr": "c",
        }
        fields["sig"] = sign_sas(fields, f"/blob/{account}/{container}", key["value"])
        sas = urlencode(fields, quote_via=quote, safe="")
        se = datetime.strptime(fields["se"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        credential = {
            "sas_token": sas, "container_url": f"{self._blob_url(account)}/{container}",
            "account": account, "container": container, "permissions": fields["sp"], "expires_on": fields["se"],
        }
        return credential, se

    # -- the contract ------------------------------------------------------------------

    async def issue(self, req: IssueRequest) -> Issued:
        kind, parts = parse_resource(req.resource)
        if req.revoke_state.get("resource_type", kind) != kind:
            raise TargetError("The lease was planned for another resource type.", code="invalid_revoke_state")
        if kind == "blob-container":
            credential, expires_at = await self._sas(parts[0], parts[1], req)
            return Issued(credential=credential, expires_at=min(expires_at, req.expires_at))
        token = await self._token(SCOPES[kind], req, req.timeout_seconds)
        token_expiry = datetime.fromtimestamp(token.expires_on, UTC)
        credential = {"access_token": token.token, "token_type": "Bearer", "scope": SCOPES[kind],
                      "tenant_id": self.config.tenant_id, "expires_on": token_expiry.isoformat()}
        if kind == "azure-subscription":
            credential["subscription_id"] = parts[0]
        else:
            credential["vault_url"] = self.config.key_vault_endpoint.replace("{vault}", parts[0])
        return Issued(credential=credential, expires_at=min(token_expiry, req.expires_at))

    async def renew(self, revoke_state: Mapping[str, Any], expires_at: datetime) -> datetime:
        raise NotRenewable("Entra access tokens and SAS tokens can't be extended; issue a new one.")

    async def revoke(self, revoke_state: Mapping[str, Any]) -> None:
        return None  # expiry-only: never called by the gateway; nothing to remove

    async def verify(self) -> Verification:
        """Whether Entra issues this connector a management-scope token."""
        who = f"app {self.config.client_id} in tenant {self.config.tenant_id}"
        try:
            await self._token(SCOPES["azure-subscription"], None, 30.0)
        except TargetError as exc:
            return Verification(ok=False, message=str(exc))
        return Verification(ok=True, message=f"Entra issued a token to {who}.", identity=who)

    async def list_resources(self, resource_type: str) -> list[str]:
        """``azure-subscription``: the subscriptions Azure Resource Manager shows the app
        (``GET /subscriptions``), as resources. Vaults and containers are not listed (that
        needs a resource query per subscription and account): name them in the connector."""
        if resource_type not in SCOPES:
            raise ResourceNotSupported(
                f"Connector type azure has no resource type {resource_type!r}; it has: {', '.join(SCOPES)}."
            )
        if resource_type != "azure-subscription":
            raise ResourceNotSupported(
                f"Connector type azure can't list {resource_type} resources; name them in the connector's resources."
            )
        return await self._subscriptions()

    async def _subscriptions(self, timeout: float = 30.0) -> list[str]:
        import httpx

        token = await self._token(SCOPES["azure-subscription"], None, timeout)
        found: list[str] = []
        url: str | None = f"{self.config.arm_endpoint}/subscriptions?api-version=2022-12-01"
        prefix = self.config.arm_endpoint + "/"
        try:
            client = self._http()
            for _ in range(50):  # pages
                if url is None:
                    break
                r = await client.get(url, headers={"Authorization": f"Bearer {token.token}"},
                                     timeout=httpx.Timeout(timeout, connect=self.config.connection_timeout))
                if r.status_code != 200:
                    code = r.headers.get("x-ms-failure-cause") or None
                    raise _Refused(r.status_code, code if code and re.fullmatch(r"[A-Za-z0-9]{1,64}", code) else None)
                page = r.json()
                found += [str(v.get("subscriptionId", "")).lower() for v in page.get("value", [])]
                url = page.get("nextLink")
                if url is not None and not str(url).startswith(prefix):
                    raise TargetError("Azure Resource Manager sent a next page on another host.")
        except TargetError:
            raise
        except Exception as exc:  # noqa: BLE001 - mapped, never quoted
            raise self._error(exc, "listing subscriptions") from None
        return sorted(f"azure-subscription:{sub}" for sub in set(found) if _GUID.match(sub))

    def _http(self) -> Any:
        """The instance's HTTP client for Storage and Resource Manager: one TLS context (the
        configured CA bundle, else the system's) and its kept-alive connections, for every call."""
        if self._client is None:
            import ssl

            import httpx

            verify: Any = ssl.create_default_context(cafile=self.config.ca_bundle) if self.config.ca_bundle else True
            self._client = httpx.AsyncClient(verify=verify, trust_env=False)
        return self._client

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()
        credential, self._credential = self._credential, None
        if credential is not None:
            try:
                credential.close()
            except Exception:  # noqa: BLE001 - closing a dropped instance's sessions: nothing to report
                pass
