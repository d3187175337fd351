"""The ``azure`` backend: Azure Key Vault secrets, through azure-keyvault-secrets and azure-identity.

Configuration (:class:`AzureBackendConfig`, unknown fields refused with 422)
----------------------------------------------------------------------------

- ``vault_url`` (required): ``https://<vault>.vault.azure.net/`` (or a private endpoint).
- ``name_prefix`` (default ``credgate-``, ``[0-9a-zA-Z-]``, at most 64): every secret's Key
  Vault name is ``name_prefix + encode(path)`` (see "Names").
- Ownership: ``owner_tag_key`` (default ``credgate:owner``) and ``owner_tag_value``
  (default: the mount's name), ``adopt_prefixes`` (see "Ownership").
- ``auth``, exactly one of (``method`` chooses):

  - ``client_secret``: ``tenant_id``, ``client_id``, ``secret``: a
    :class:`backends.base.SecretRef` (the client secret held in another backend, read at
    ``start()``) or an inline string (sealed with the backend's configuration, shown masked);
  - ``certificate``: ``tenant_id``, ``client_id``, and the PEM (private key + certificate)
    as ``certificate`` (a SecretRef or an inline string) or ``certificate_file`` (a path);
    ``send_certificate_chain`` for subject-name/issuer authentication;
  - ``workload_identity``: ``tenant_id``, ``client_id``, ``token_file`` (the federated
    token file, e.g. ``AZURE_FEDERATED_TOKEN_FILE`` of AKS workload identity). The file is
    read at every token request (about once an hour: access tokens are cached until near
    their expiry), so a rotated token is used at once (azure-identity's own
    ``WorkloadIdentityCredential`` keeps what it read for 10 minutes);
  - ``ambient``: ``DefaultAzureCredential`` (environment, managed identity, Azure CLI...;
    ``managed_identity_client_id`` for a user-assigned identity), without interactive ones.

- ``authority_host``: the Entra authority (default ``login.microsoftonline.com``); a host
  that is not one of Microsoft's clouds also turns instance discovery off.
- ``ca_bundle``: a CA file for the vault and the authority (``connection_verify``), for a
  private endpoint behind a TLS-inspecting proxy, or a test stand-in.
- ``verify_challenge_resource`` (default true): the SDK checks that the vault's 401
  challenge names a resource in the vault's own domain; turn off only for a vault URL that
  is not under ``vault.azure.net`` (and similar cloud domains).
- Bounded I/O: ``connection_timeout`` and ``read_timeout`` (per HTTP attempt, vault and
  authority), ``retry_total`` (azure-core retries, default 1) and ``call_timeout`` (a whole
  operation, through :func:`run_sync`).

Names
-----

Key Vault names allow only ``[0-9a-zA-Z-]``, at most 127 characters, and compare without
case. credgate paths (segments of ``[A-Za-z0-9._-]`` joined by ``/``) are encoded one
character at a time, ``-`` being the escape:

==========  =============
path        Key Vault name
==========  =============
``a-z``     itself
``0-9``     itself
``A-Z``     ``-`` + the lower-case letter (``A`` -> ``-a``)
``/``       ``-0``
``-``       ``-1``
``.``       ``-2``
``_``       ``-3``
==========  =============

e.g. ``team/DB_main-1.json`` -> ``team-0-d-b-3main-11-2json``. Every encoded character is a
lower-case letter, a digit or a two-character escape, so the code is prefix-free and uses no
upper case: two paths that differ (even only in case) never meet in Key Vault, and decoding
is exact. An encoded name grows by one character per upper-case letter and per ``/ - . _``:
a path whose ``name_prefix + encode(path)`` exceeds 127 characters is refused (422
``path_too_long``) by every operation. A name under ``name_prefix`` that is not a valid
encoding (another tool's secret) is never listed. Mounts sharing a vault need prefixes that
are not prefixes of one another, or distinct owners.

Values and versions
-------------------

A version's value is the data as one compact JSON object (content type
``application/json``); credgate's facts live in the version's tags:
``credgate:version`` (the integer version), ``credgate:keys`` (the key names as JSON, when
at most 256 characters), ``credgate:by`` (the author, cut to 256) and the owner tag. Key
Vault's own version ids (32 hex digits) are never shown.

- The current read is one ``GET /secrets/{name}/``: its tags give N.
- Reading version N lists the secret's versions (``GET /secrets/{name}/versions``, 25 per
  page: 1 + V/25 requests for V versions) to find the id tagged N, then reads it; the id is
  remembered in the process, so the next read of N is one request.
- ``metadata()`` is the versions listing (plus one read of each version whose key names
  did not fit in the tag, remembered).
- ``put`` lists the versions (N = the highest credgate number on any of them, disabled ones
  included, so a number is never reused) and writes N+1 (``PUT /secrets/{name}``): two
  requests, and the listing plus the write's answer are the metadata it returns. Key Vault
  has no conditional write:
  writers of one path queue on a per-path lock inside one gateway process (held until the
  SDK call's thread ends, even when the caller gave up), so no number is lost or doubled
  there. Two gateway replicas writing the same path at the same moment can both write N+1
  (both values are kept; reading N returns the newer). ``check_and_set`` is therefore
  not offered (capabilities: False).
- A disabled version (Key Vault's ``enabled=false``) reads as 404 ``version_not_found`` and
  is left out of the versions.
- Key Vault finishes deletes, purges and recoveries asynchronously; a call on a name still in
  transit (409 ``ObjectIsBeingDeleted``/``ObjectIsBeingRecovered``, e.g. a write right after a
  destroy) is answered like an unavailable store (503 with ``Retry-After``): try again.

Size limit: Key Vault documents a secret value of at most "25k bytes"; credgate takes the
stricter reading, 25,000 bytes, and adds nothing around the data (the tags carry the rest),
so ``capabilities.max_value_bytes`` is 25,000.

Ownership
---------

credgate writes the owner tag on every version it creates. A secret whose current version
carries another value of the owner tag, or none (outside ``adopt_prefixes``), is not
read, deleted or restored (404 ``secret_not_owned``), and ``list`` and ``count`` skip it; a
write is refused (409 ``secret_not_owned``) unless one of the secret's versions is this
owner's. Under an ``adopt_prefixes``
prefix, a secret credgate never wrote reads as version 1 (a JSON object is its map,
non-string values as their JSON text; any other text is ``{"value": <text>}``); credgate's
first write tags that version as 1 (``PATCH``, so it stays readable) and writes version 2.
A version written into an owned secret by someone else (current version untagged) reads
as 409 ``foreign_version``; credgate's next write supersedes it.

Soft delete, recover, purge
---------------------------

Key Vault soft delete is always on. ``delete`` is ``DELETE /secrets/{name}`` (the secret
and all its versions move to the deleted state, recoverable for the vault's retention,
7-90 days); ``restore`` is Recover Deleted Secret; ``destroy`` deletes (if live) and then
purges (``DELETE /deletedsecrets/{name}``): every version is gone and a later write starts
again at version 1. Key Vault keeps a soft-deleted secret's name: a ``put`` to it recovers
it first (its versions come back) and then writes the next version, as the protocol asks.
With purge protection on the vault (the secret's ``recoveryLevel`` lacks ``Purgeable``),
``destroy`` is refused before anything changes: 409 ``purge_forbidden`` (a soft delete
still works; Key Vault purges it when retention ends). Without the ``purge`` permission, a
destroy of a live secret leaves it soft-deleted and answers 502 ``target_permission_denied``
(``check()`` does not probe purge). Deleting and recovering are
long-running in Key Vault; the backend waits for them (polling every half second, within
``call_timeout``).

Listing
-------

``GET /secrets`` (25 per page, in no promised order) returns every secret in the vault: the
backend keeps the names under ``name_prefix`` that decode, whose current version carries
its owner tag (or lie under an adopt prefix), sorts the paths and cuts the page after
``after``. A list costs one request per 25 secrets in the vault, whatever ``limit`` is;
``include_deleted`` adds ``GET /deletedsecrets``.

Errors
------

No connection, TLS failure, a timeout (``ServiceRequestError``, ``ServiceResponseError``),
429 -> :class:`TargetUnreachable` (503 ``backend_unavailable`` with ``Retry-After``);
``ClientAuthenticationError`` (Entra refused the credentials, the vault refused the token,
an unreadable token file) -> ``TargetError(code="target_auth_failed")``; 403 ->
``target_permission_denied``; ``ResourceNotFoundError`` -> 404 ``secret_not_found`` (or
``secret_deleted``/``version_not_found``); a 5xx -> ``backend_unavailable`` (502); anything
else -> ``target_error``. Messages say what failed in credgate's words plus
:meth:`AzureKeyVaultBackend.sanitize` (the azure-core exception class, the HTTP status, Key
Vault's error and inner error codes, an ``AADSTS`` number), never the vendor's message.

``check()`` probes without changing anything: the first page of ``GET /secrets``
(reachability, credentials, list permission), ``GET`` and ``PATCH`` of a name credgate paths
can't produce (``<prefix>-9check``; "not found" means permitted). ``Health.details`` says
``list``/``read``/``write`` ``ok`` or ``denied``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from backends.base import (
    BackendBase,
    BackendCapabilities,
    BackendContext,
    Conflict,
    CredgateError,
    Health,
    NotFound,
    Page,
    SecretMetadata,
    SecretRef,
    SecretValue,
    TargetError,
    TargetUnreachable,
    ValidationFailed,
    VersionInfo,
    generic_sanitize,
    run_sync,
)

_T = TypeVar("_T")

NAME_MAX = 127  # Key Vault's limit on a secret name
VALUE_MAX = 25_000  # bytes: Key Vault's "25k bytes", read strictly
TAG_VALUE_MAX = 256
CONTENT_TYPE = "application/json"
TAG_VERSION = "credgate:version"
TAG_KEYS = "credgate:keys"
TAG_BY = "credgate:by"
_CHECK_SUFFIX = "-9check"  # '-9' is no escape: no credgate path encodes to it
_IDS_MAX = 20_000
_POLL = 0.5  # seconds between polls of a delete/recover

# Key Vault deletes, purges and recovers asynchronously: a name in transit answers 409 with these.
_BUSY = frozenset({"ObjectIsBeingDeleted", "ObjectIsBeingRecovered"})
_ESCAPE = {"/": "-0", "-": "-1", ".": "-2", "_": "-3"}
_UNESCAPE = {v[1]: k for k, v in _ESCAPE.items()}
_PATH_RE = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")
_AADSTS = re.compile(r"AADSTS(\d{4,9})")
_MICROSOFT_AUTHORITIES = frozenset({
    "login.microsoftonline.com", "login.microsoftonline.us", "login.chinacloudapi.cn", "login.partner.microsoftonline.cn",
})


def encode_path(path: str) -> str:
    """A credgate path as the body of a Key Vault name (see "Names" in the module docstring)."""
    out = []
    for ch in path:
        if "a" <= ch <= "z" or "0" <= ch <= "9":
            out.append(ch)
        elif "A" <= ch <= "Z":
            out.append("-" + ch.lower())
        elif ch in _ESCAPE:
            out.append(_ESCAPE[ch])
        else:
            raise ValueError("not a credgate path character")
    return "".join(out)


def decode_name(body: str) -> str | None:
    """The credgate path a name body encodes, or None if it is no valid encoding of a path."""
    body = body.lower()  # Key Vault names compare without case; credgate writes lower case only
    out = []
    i = 0
    while i < len(body):
        ch = body[i]
        if ch == "-":
            if i + 1 >= len(body):
                return None
            nxt = body[i + 1]
            if "a" <= nxt <= "z":
                out.append(nxt.upper())
            elif nxt in _UNESCAPE:
                out.append(_UNESCAPE[nxt])
            else:
                return None
            i += 2
        elif "a" <= ch <= "z" or "0" <= ch <= "9":
            out.append(ch)
            i += 1
        else:
            return None
    path = "".join(out)
    if not _PATH_RE.match(path) or any(seg in (".", "..") for seg in path.split("/")):
        return None
    return path


# -- configuration ------------------------------------------------------------------------

_TENANT = r"^[A-Za-z0-9][A-Za-z0-9.-]{0,127}$"
_CLIENT = r"^[A-Za-z0-9][A-Za-z0-9-]{0,63}$"


class ClientSecretAuth(BaseModel):
    """An app registration's client secret."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["client_secret"]
    tenant_id: str = Field(pattern=_TENANT)
    client_id: str = Field(pattern=_CLIENT)
    secret: SecretRef | SecretStr


class CertificateAuth(BaseModel):
    """An app registration's certificate: PEM with the private key, inline/by reference or from a file."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["certificate"]
    tenant_id: str = Field(pattern=_TENANT)
    client_id: str = Field(pattern=_CLIENT)
    certificate: SecretRef | SecretStr | None = None
    certificate_file: str | None = Field(default=None, min_length=1, max_length=4096)
    send_certificate_chain: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> CertificateAuth:
        if (self.certificate is None) == (self.certificate_file is None):
            raise ValueError("give exactly one of certificate (PEM, inline or a SecretRef) and certificate_file")
        return self


class WorkloadIdentityAuth(BaseModel):
    """Workload identity federation: a federated token file (e.g. a projected service-account token)."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["workload_identity"]
    tenant_id: str = Field(pattern=_TENANT)
    client_id: str = Field(pattern=_CLIENT)
    token_file: str = Field(min_length=1, max_length=4096)


class AmbientAuth(BaseModel):
    """DefaultAzureCredential (environment, managed identity, Azure CLI...), never interactive."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["ambient"]
    managed_identity_client_id: str | None = Field(default=None, pattern=_CLIENT)


AzureAuth = Annotated[
    ClientSecretAuth | CertificateAuth | WorkloadIdentityAuth | AmbientAuth, Field(discriminator="method")
]


class AzureBackendConfig(BaseModel):
    """See the module docstring."""

    model_config = ConfigDict(extra="forbid")

    vault_url: str = Field(max_length=2048, pattern=r"^https://[A-Za-z0-9.-]+(:[0-9]{1,5})?/?$")
    name_prefix: str = Field(default="credgate-", max_length=64, pattern=r"^[0-9a-zA-Z-]*$")
    owner_tag_key: str = Field(default="credgate:owner", min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:/=+@-]+$")
    owner_tag_value: str | None = Field(default=None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:/=+@-]+$")
    adopt_prefixes: list[str] = Field(default_factory=list, max_length=50)
    auth: AzureAuth
    authority_host: str | None = Field(default=None, max_length=512, pattern=r"^(https://)?[A-Za-z0-9.-]+(:[0-9]{1,5})?/?$")
    ca_bundle: str | None = Field(default=None, min_length=1, max_length=4096)
    verify_challenge_resource: bool = True
    connection_timeout: float = Field(default=5.0, gt=0, le=60)
    read_timeout: float = Field(default=10.0, gt=0, le=120)
    retry_total: int = Field(default=1, ge=0, le=5)
    call_timeout: float = Field(default=30.0, gt=0, le=600)

    @field_validator("adopt_prefixes")
    @classmethod
    def _prefixes(cls, v: list[str]) -> list[str]:
        for p in v:
            if not p or len(p) > 512 or not re.fullmatch(r"[A-Za-z0-9._/-]+", p):
                raise ValueError("each adopt prefix is a non-empty path prefix of [A-Za-z0-9._/-]")
        return v

    @field_validator("owner_tag_key")
    @classmethod
    def _not_ours(cls, v: str) -> str:
        if v in (TAG_VERSION, TAG_KEYS, TAG_BY):
            raise ValueError("the owner tag key can't be one of credgate's own tags")
        return v


# -- errors -----------------------------------------------------------------------------------


class _TokenFileError(Exception):
    """The federated token file could not be read (carries no path or content)."""


def _root(exc: BaseException) -> BaseException:
    """What an azure-identity ``ClientAuthenticationError`` wraps (it raises one ``from`` any
    failure of a token request, a refused connection included), else the exception itself."""
    seen = 0
    while exc.__cause__ is not None and seen < 5 and type(exc).__name__ == "ClientAuthenticationError":
        exc = exc.__cause__
        seen += 1
    return exc


def _status(exc: BaseException) -> int:
    status = getattr(exc, "status_code", None)
    return int(status) if isinstance(status, int) else 0


def _codes(exc: BaseException) -> tuple[str | None, str | None]:
    """Key Vault's error code and inner error code, if the exception carries an error body."""
    err = getattr(exc, "error", None)
    if err is None:
        return None, None
    code = getattr(err, "code", None)
    inner = getattr(err, "innererror", None)
    inner_code = inner.get("code") if isinstance(inner, dict) else None
    return (str(code) if code else None), (str(inner_code) if inner_code else None)


def _level(props: Any) -> str:
    """A secret's ``recoveryLevel`` as Key Vault spells it (the SDK gives an enum or a string)."""
    level = getattr(props, "recovery_level", None)
    return str(getattr(level, "value", level) or "")


def _created(props: Any) -> datetime:
    return props.created_on or props.updated_on or datetime.now(UTC)


class AzureKeyVaultBackend(BackendBase):
    """Azure Key Vault secrets; see the module docstring for the mapping."""

    type: ClassVar[str] = "azure"
    config_model: ClassVar[type[BaseModel]] = AzureBackendConfig
    # Others can write to a vault behind the gateway's back: not cacheable. No conditional
    # write in Key Vault: no check-and-set.
    capabilities: ClassVar[BackendCapabilities] = BackendCapabilities(
        versions=True, soft_delete=True, check_and_set=False, cacheable=False, read_only=False,
        max_value_bytes=VALUE_MAX,
    )

    def __init__(self, name: str, config: AzureBackendConfig, context: BackendContext) -> None:
        super().__init__(name, config, context)
        self.config: AzureBackendConfig
        self.owner = config.owner_tag_value or name
        self._client: Any = None
        self._credential: Any = None
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        # (name lower, N) -> Key Vault version id; (name lower, version id) -> keys. Both immutable
        # until a purge, after which a stale id answers 404 and is dropped.
        self._ids: OrderedDict[tuple[str, int], str] = OrderedDict()
        self._keys: OrderedDict[tuple[str, str], list[str]] = OrderedDict()
        self._memo_lock = threading.Lock()

    # -- lifecycle ----------------------------------------------------------------------

    def _transport_kwargs(self) -> dict[str, Any]:
        c = self.config
        kw: dict[str, Any] = {
            "connection_timeout": c.connection_timeout, "read_timeout": c.read_timeout,
            "retry_total": c.retry_total, "retry_backoff_factor": 0.2, "retry_backoff_max": 2,
        }
        if c.ca_bundle:
            kw["connection_verify"] = c.ca_bundle
        return kw

    def _authority_kwargs(self) -> dict[str, Any]:
        host = self.config.authority_host
        if not host:
            return {}
        bare = host.removeprefix("https://").rstrip("/")
        kw: dict[str, Any] = {"authority": bare}
        if bare.split(":")[0].lower() not in _MICROSOFT_AUTHORITIES:
            kw["disable_instance_discovery"] = True
        return kw

    async def _material(self, value: SecretRef | SecretStr, what: str) -> str:
        if isinstance(value, SecretStr):
            return value.get_secret_value()
        if self.context.read_ref is None:
            raise ValidationFailed(
                f"Backend {self.name!r} keeps its {what} in another backend, which this gateway can't read.",
                code="secret_ref_unavailable",
            )
        return await self.context.read_ref(value)

    async def start(self) -> None:
        auth = self.config.auth
        material: str | bytes | None = None
        if self.config.ca_bundle and not os.access(self.config.ca_bundle, os.R_OK):
            raise ValidationFailed(f"Backend {self.name!r}: its ca_bundle can't be read.", code="invalid_ca_bundle")
        if isinstance(auth, ClientSecretAuth):
            material = await self._material(auth.secret, "client secret")
        elif isinstance(auth, CertificateAuth):
            if auth.certificate is not None:
                material = (await self._material(auth.certificate, "certificate")).encode()
            else:
                try:
                    material = await run_sync(
                        _read_file, auth.certificate_file, timeout=self.config.call_timeout, pool=f"backend:{self.name}"
                    )
                except OSError:
                    raise ValidationFailed(
                        f"Backend {self.name!r}: its certificate_file can't be read.", code="invalid_certificate"
                    ) from None
        self._credential, self._client = self._make_client(material)

    def _make_client(self, material: str | bytes | None) -> tuple[Any, Any]:
        from azure.identity import (
            CertificateCredential,
            ClientAssertionCredential,
            ClientSecretCredential,
            DefaultAzureCredential,
        )
        from azure.keyvault.secrets import SecretClient

        auth = self.config.auth
        kw = {**self._transport_kwargs(), **self._authority_kwargs()}
        if isinstance(auth, ClientSecretAuth):
            assert isinstance(material, str)
            credential: Any = ClientSecretCredential(auth.tenant_id, auth.client_id, material, **kw)
        elif isinstance(auth, CertificateAuth):
            assert isinstance(material, bytes)
            try:
                credential = CertificateCredential(
                    auth.tenant_id, auth.client_id, certificate_data=material,
                    send_certificate_chain=auth.send_certificate_chain, **kw,
                )
            except (ValueError, TypeError):
                raise ValidationFailed(
                    f"Backend {self.name!r}: the certificate is not a PEM private key and certificate.",
                    code="invalid_certificate",
                ) from None
        elif isinstance(auth, WorkloadIdentityAuth):
            credential = ClientAssertionCredential(auth.tenant_id, auth.client_id, self._federated_token, **kw)
        else:
            extra = {"managed_identity_client_id": auth.managed_identity_client_id} if auth.managed_identity_client_id else {}
            if "authority" in kw:
                kw["authority"] = "https://" + kw["authority"]
            credential = DefaultAzureCredential(exclude_interactive_browser_credential=True, **extra, **kw)
        client = SecretClient(
            self.config.vault_url, credential, verify_challenge_resource=self.config.verify_challenge_resource,
            **self._transport_kwargs(),
        )
        return credential, client

    def _federated_token(self) -> str:
        """The federated token, read from the file at every token request (rare: access
        tokens are cached until near their expiry), so a rotated file is used at once."""
        assert isinstance(self.config.auth, WorkloadIdentityAuth)
        try:
            with open(self.config.auth.token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except (OSError, UnicodeDecodeError):
            raise _TokenFileError("unreadable") from None
        if not token:
            raise _TokenFileError("empty")
        return token

    async def aclose(self) -> None:
        client, self._client = self._client, None
        credential, self._credential = self._credential, None
        for thing in (client, credential):
            if thing is not None:
                try:
                    thing.close()
                except Exception:  # noqa: BLE001 - closing is best effort
                    pass

    @property
    def _kv(self) -> Any:
        if self._client is None:
            raise TargetUnreachable(f"Backend {self.name!r} is not started.", code="backend_not_started")
        return self._client

    # -- errors ---------------------------------------------------------------------------

    @classmethod
    def sanitize(cls, exc: BaseException) -> str:
        """An azure-core/azure-identity error as its class, HTTP status, Key Vault error and inner
        error codes and an AADSTS number: never its message (it quotes names, ids and URLs)."""
        if isinstance(exc, _TokenFileError):
            return "federated token file unreadable"
        root = _root(exc)
        if root is not exc:  # an azure-identity wrapper: say what it wraps, by class and codes
            return f"{type(exc).__name__} from {cls.sanitize(root)}"
        parts: list[str] = []
        if _status(exc):
            parts.append(str(_status(exc)))
        code, inner = _codes(exc)
        parts += [c for c in (code, inner) if c and re.fullmatch(r"[A-Za-z0-9_.]{1,64}", c)]
        if type(exc).__module__.startswith("azure."):
            m = _AADSTS.search(str(getattr(exc, "message", "") or ""))
            if m:
                parts.append(f"AADSTS{m.group(1)}")
            return f"{type(exc).__name__} ({', '.join(parts)})" if parts else type(exc).__name__
        return generic_sanitize(exc)

    def _map(self, exc: BaseException, doing: str) -> CredgateError:
        from azure.core.exceptions import (
            ClientAuthenticationError,
            HttpResponseError,
            ServiceRequestError,
            ServiceResponseError,
        )

        what = self.sanitize(exc)
        root = _root(exc)
        if root is not exc and isinstance(root, (ServiceRequestError, ServiceResponseError, OSError)):
            return TargetUnreachable(f"The Entra authority could not be reached while {doing} ({what}).")
        if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
            return TargetUnreachable(f"Azure Key Vault did not answer in time while {doing}.", code="target_timeout")
        if isinstance(exc, (ServiceRequestError, ServiceResponseError)):
            return TargetUnreachable(f"Azure Key Vault or its authority could not be reached while {doing} ({what}).")
        if isinstance(exc, (ClientAuthenticationError, _TokenFileError)):
            return TargetError(
                f"Azure refused backend {self.name!r}'s credentials while {doing} ({what}).", code="target_auth_failed"
            )
        if isinstance(exc, HttpResponseError):
            status = _status(exc)
            if status == 403:
                return TargetError(
                    f"Azure Key Vault denied backend {self.name!r} permission for {doing} ({what}).",
                    code="target_permission_denied",
                )
            if status == 404:
                return NotFound(f"Azure Key Vault found nothing while {doing} ({what}).", code="secret_not_found")
            if status == 429:
                return TargetUnreachable(f"Azure Key Vault is throttling {doing} ({what}).", code="target_throttled")
            if status == 409 and _codes(exc)[1] in _BUSY:
                return TargetUnreachable(
                    f"Azure Key Vault is still finishing a delete, purge or recovery of this secret ({what}); "
                    "try again in a few seconds.",
                    code="target_busy",
                )
            if status >= 500:
                return TargetError(f"Azure Key Vault failed while {doing} ({what}).", code="backend_unavailable")
            return TargetError(f"Azure Key Vault refused {doing} ({what}).")
        if isinstance(exc, OSError):
            return TargetUnreachable(f"Azure Key Vault could not be reached while {doing} ({what}).")
        return TargetError(f"Azure Key Vault failed while {doing} ({what}).")

    async def _call(self, doing: str, fn: Callable[[], _T]) -> _T:
        """Run ``fn`` (blocking SDK calls) in a thread under ``call_timeout``; every SDK
        failure becomes a credgate error (``from None``); credgate errors pass as they are."""
        try:
            return await run_sync(fn, timeout=self.config.call_timeout, pool=f"backend:{self.name}")
        except CredgateError:
            raise
        except Exception as exc:  # noqa: BLE001 - every SDK failure is mapped, never quoted
            raise self._map(exc, doing) from None

    # -- names, ownership, values ------------------------------------------------------------

    def _ref(self, path: str) -> str:
        return f"{self.name}/{path}"

    def _name(self, path: str) -> str:
        name = self.config.name_prefix + encode_path(path)
        if len(name) > NAME_MAX:
            raise ValidationFailed(
                f"The secret path encodes to a Key Vault name of {len(name)} characters (name_prefix included); "
                f"Key Vault allows {NAME_MAX}. Upper-case letters and '/', '-', '.', '_' take two characters each.",
                code="path_too_long",
            )
        return name

    def _path_of(self, name: str) -> str | None:
        prefix = self.config.name_prefix.lower()
        if not name.lower().startswith(prefix):
            return None
        return decode_name(name[len(prefix):])

    def _adoptable(self, path: str) -> bool:
        return any(path.startswith(p) for p in self.config.adopt_prefixes)

    def _owned(self, tags: Mapping[str, str] | None) -> bool:
        return (tags or {}).get(self.config.owner_tag_key) == self.owner

    def _not_owned(self, path: str, writing: bool = False) -> CredgateError:
        msg = (
            f"Secret {self._ref(path)} exists in Azure Key Vault but was not created by this backend "
            f"(no {self.config.owner_tag_key}={self.owner} tag); credgate does not touch it."
        )
        return Conflict(msg, code="secret_not_owned") if writing else NotFound(msg, code="secret_not_owned")

    def _visible(self, tags: Mapping[str, str] | None, path: str) -> bool:
        """Listed: owned, or untagged under an adopt prefix."""
        tags = tags or {}
        if self._owned(tags):
            return True
        return self.config.owner_tag_key not in tags and self._adoptable(path)

    @staticmethod
    def _number(tags: Mapping[str, str] | None) -> int | None:
        raw = (tags or {}).get(TAG_VERSION)
        return int(raw) if raw is not None and raw.isdigit() and 0 < len(raw) < 10 else None

    def _tags(self, n: int, keys: list[str], author: str) -> dict[str, str]:
        tags = {self.config.owner_tag_key: self.owner, TAG_VERSION: str(n), TAG_BY: author[:TAG_VALUE_MAX]}
        listed = json.dumps(keys, separators=(",", ":"), ensure_ascii=False)
        if len(listed) <= TAG_VALUE_MAX:
            tags[TAG_KEYS] = listed
        return tags

    @staticmethod
    def _data(value: str | None, content_type: str | None, path: str) -> dict[str, str]:
        """A version's value as a map: credgate's JSON object, or a foreign value (see "Ownership")."""
        text = value or ""
        try:
            body = json.loads(text)
        except ValueError:
            return {"value": text}
        if not isinstance(body, dict):
            return {"value": text}
        return {
            str(k): v if isinstance(v, str) else json.dumps(v, separators=(",", ":"), ensure_ascii=False)
            for k, v in body.items()
        }

    def _remember_id(self, name: str, n: int, vid: str) -> None:
        with self._memo_lock:
            self._ids[(name.lower(), n)] = vid
            self._ids.move_to_end((name.lower(), n))
            while len(self._ids) > _IDS_MAX:
                self._ids.popitem(last=False)

    def _forget_ids(self, name: str) -> None:
        with self._memo_lock:
            for key in [k for k in self._ids if k[0] == name.lower()]:
                del self._ids[key]

    # -- blocking pieces (run in a thread by _call) -------------------------------------------

    def _current(self, name: str) -> Any | None:
        """The current version (value included), None if there is no live secret, or the
        string "disabled" if the current version is disabled."""
        from azure.core.exceptions import HttpResponseError, ResourceNotFoundError

        try:
            return self._kv.get_secret(name)
        except ResourceNotFoundError:
            return None
        except HttpResponseError as exc:
            if _status(exc) == 403 and _codes(exc)[1] == "SecretDisabled":
                return "disabled"
            raise

    def _deleted(self, name: str) -> Any | None:
        from azure.core.exceptions import ResourceNotFoundError

        try:
            return self._kv.get_deleted_secret(name)
        except ResourceNotFoundError:
            return None

    def _absent(self, name: str, path: str) -> CredgateError:
        """Why a live secret is missing: soft-deleted (ours), someone else's deleted one, or nothing."""
        deleted = self._deleted(name)
        if deleted is not None:
            tags = deleted.properties.tags or {}
            if self._visible(tags, path):
                return NotFound(
                    f"Secret {self._ref(path)} is deleted; restore it with `credgate secret restore {self._ref(path)}`.",
                    code="secret_deleted",
                )
            return self._not_owned(path)
        return NotFound(f"Secret {self._ref(path)} does not exist.", code="secret_not_found")

    def _versions(self, name: str) -> list[Any] | None:
        """Every version's properties (no values), or None if there is no live secret."""
        from azure.core.exceptions import ResourceNotFoundError

        try:
            return list(self._kv.list_properties_of_secret_versions(name, max_page_size=25))
        except ResourceNotFoundError:
            return None

    def _ours(self, versions: list[Any], *, enabled_only: bool = True) -> dict[int, Any]:
        """credgate's numbered versions of this owner (by default the enabled ones: a disabled
        version can't be read), the newest of a number winning."""
        out: dict[int, Any] = {}
        for p in sorted(versions, key=_created):
            n = self._number(p.tags)
            if n is not None and self._owned(p.tags) and (p.enabled is not False or not enabled_only):
                out[n] = p
        return out

    def _get_sync(self, path: str, version: int | None) -> SecretValue:
        name = self._name(path)
        if version is None:
            cur = self._current(name)
            if cur is None:
                raise self._absent(name, path)
            if cur != "disabled":
                tags = cur.properties.tags or {}
                n = self._number(tags)
                if self._owned(tags) and n is not None:
                    self._remember_id(name, n, cur.properties.version)
                    return SecretValue(path, n, self._data(cur.value, cur.properties.content_type, path))
                if self.config.owner_tag_key in tags:
                    raise self._not_owned(path)
            # An untagged (or disabled) current version: decide from the versions.
            versions = self._versions(name) or []
            ours = self._ours(versions, enabled_only=False)
            if not ours:
                if cur != "disabled" and self._adoptable(path):
                    return SecretValue(path, 1, self._data(cur.value, cur.properties.content_type, path))
                if cur == "disabled":
                    raise NotFound(f"Secret {self._ref(path)}'s current version is disabled.", code="version_not_found")
                raise self._not_owned(path)
            if cur == "disabled":
                raise NotFound(f"Secret {self._ref(path)}'s current version is disabled.", code="version_not_found")
            raise Conflict(
                f"Secret {self._ref(path)}'s current version was written outside credgate; "
                "write a new version through credgate to supersede it.",
                code="foreign_version",
            )
        return self._get_version_sync(path, name, version)

    def _get_version_sync(self, path: str, name: str, version: int) -> SecretValue:
        from azure.core.exceptions import HttpResponseError, ResourceNotFoundError

        with self._memo_lock:
            vid = self._ids.get((name.lower(), version))
        if vid is not None:
            try:
                got = self._kv.get_secret(name, vid)
                if self._owned(got.properties.tags) and self._number(got.properties.tags) == version:
                    return SecretValue(path, version, self._data(got.value, got.properties.content_type, path))
            except (ResourceNotFoundError, HttpResponseError):
                pass
            self._forget_ids(name)
        versions = self._versions(name)
        if not versions:
            raise self._absent(name, path)
        ours = self._ours(versions)
        if not ours and not self._ours(versions, enabled_only=False):
            if self._adoptable(path) and version == 1 and not any(self.config.owner_tag_key in (p.tags or {}) for p in versions):
                return self._get_sync(path, None)
            raise self._not_owned(path)
        props = ours.get(version)
        if props is None:
            raise NotFound(f"Secret {self._ref(path)} has no version {version}.", code="version_not_found")
        try:
            got = self._kv.get_secret(name, props.version)
        except HttpResponseError as exc:
            if _status(exc) in (403, 404) and (_status(exc) == 404 or _codes(exc)[1] == "SecretDisabled"):
                raise NotFound(f"Secret {self._ref(path)} has no version {version}.", code="version_not_found") from None
            raise
        self._remember_id(name, version, props.version)
        return SecretValue(path, version, self._data(got.value, got.properties.content_type, path))

    def _keys_of(self, name: str, props: Any, path: str) -> list[str]:
        raw = (props.tags or {}).get(TAG_KEYS)
        if raw is not None:
            try:
                keys = json.loads(raw)
                if isinstance(keys, list):
                    return [str(k) for k in keys]
            except ValueError:
                pass
        memo = (name.lower(), props.version)
        with self._memo_lock:
            if memo in self._keys:
                return list(self._keys[memo])
        got = self._kv.get_secret(name, props.version)
        keys = sorted(self._data(got.value, got.properties.content_type, path))
        with self._memo_lock:
            self._keys[memo] = keys
            while len(self._keys) > _IDS_MAX:
                self._keys.popitem(last=False)
        return keys

    def _metadata_sync(self, path: str) -> SecretMetadata:
        name = self._name(path)
        versions = self._versions(name)
        if not versions:
            raise self._absent(name, path)
        ours = self._ours(versions)
        if not ours:
            latest = max(versions, key=_created)
            if self._ours(versions, enabled_only=False):
                raise NotFound(f"Every version of secret {self._ref(path)} is disabled.", code="version_not_found")
            if self.config.owner_tag_key not in (latest.tags or {}) and self._adoptable(path) and latest.enabled is not False:
                ours = {1: latest}  # an adopted secret credgate never wrote: its current version is 1
            else:
                raise self._not_owned(path)
        return self._describe(path, name, ours)

    def _describe(self, path: str, name: str, ours: dict[int, Any]) -> SecretMetadata:
        """Metadata from numbered version properties (the newest number is the current one)."""
        infos = []
        for n in sorted(ours):
            p = ours[n]
            self._remember_id(name, n, p.version)
            infos.append(VersionInfo(n, self._keys_of(name, p, path), _created(p), (p.tags or {}).get(TAG_BY)))
        current = infos[-1]
        return SecretMetadata(
            backend=self.name,
            path=path,
            current_version=current.version,
            keys=list(current.keys),
            created_at=min(i.created_at for i in infos),
            updated_at=max((p.updated_on or _created(p)) for p in ours.values()),
            deleted_at=None,
            versions=infos,
        )

    def _recover_sync(self, name: str) -> None:
        self._kv.begin_recover_deleted_secret(name, _polling_interval=_POLL).result()

    def _put_sync(
        self, path: str, name: str, value: str, keys: list[str], author: str, recovered: bool = False
    ) -> SecretMetadata:
        """Write the next version: list the versions (the current number and, with the
        answer to the write, the metadata to return), then write N+1. Two requests."""
        from azure.core.exceptions import ResourceExistsError

        versions = self._versions(name) or []
        mine = self._ours(versions, enabled_only=False)
        adopted = False
        if mine:
            n = max(mine) + 1  # numbers are never reused, a disabled or foreign current version included
        elif not versions:
            n = 1
        elif any(self.config.owner_tag_key in (p.tags or {}) for p in versions) or not self._adoptable(path):
            raise self._not_owned(path, writing=True)
        else:
            # Adoption: the foreign current version becomes version 1, kept readable.
            cur = self._current(name)
            if cur is None or cur == "disabled":
                raise self._not_owned(path, writing=True)
            v1_keys = sorted(self._data(cur.value, cur.properties.content_type, path))
            self._kv.update_secret_properties(name, cur.properties.version, tags=self._tags(1, v1_keys, "adopted"))
            n, adopted = 2, True
        try:
            got = self._kv.set_secret(name, value, content_type=CONTENT_TYPE, tags=self._tags(n, keys, author))
        except ResourceExistsError as exc:
            if recovered or _codes(exc)[1] != "ObjectIsDeletedButRecoverable":
                raise
            deleted = self._deleted(name)
            if deleted is None:
                raise
            tags = deleted.properties.tags or {}
            if not self._owned(tags) and not (self.config.owner_tag_key not in tags and self._adoptable(path)):
                raise self._not_owned(path, writing=True) from None
            self._recover_sync(name)  # a write to a soft-deleted secret restores it first
            return self._put_sync(path, name, value, keys, author, recovered=True)
        if adopted:
            return self._metadata_sync(path)
        ours = {k: v for k, v in self._ours(versions).items() if k < n}
        ours[n] = got.properties
        return self._describe(path, name, ours)

    def _delete_sync(self, path: str, destroy: bool) -> None:
        from azure.core.exceptions import ResourceNotFoundError

        name = self._name(path)
        cur = self._current(name)
        if cur is None:
            deleted = self._deleted(name)
            if deleted is None:
                raise NotFound(f"Secret {self._ref(path)} does not exist.", code="secret_not_found")
            if not self._visible(deleted.properties.tags, path):
                raise self._not_owned(path)
            level = _level(deleted.properties)
        else:
            tags = {} if cur == "disabled" else (cur.properties.tags or {})
            if not self._visible(tags, path) and not self._ours(self._versions(name) or [], enabled_only=False):
                raise self._not_owned(path)
            level = "" if cur == "disabled" else _level(cur.properties)
            if destroy and level and "Purgeable" not in level:
                raise self._purge_forbidden(path)
            self._kv.begin_delete_secret(name, _polling_interval=_POLL).result()
        self._forget_ids(name)
        if not destroy:
            return
        if level and "Purgeable" not in level:
            raise self._purge_forbidden(path)
        try:
            self._kv.purge_deleted_secret(name)
        except ResourceNotFoundError:
            return  # purged meanwhile

    def _purge_forbidden(self, path: str) -> CredgateError:
        return Conflict(
            f"Secret {self._ref(path)} can't be destroyed: the vault has purge protection, so Key Vault keeps "
            "deleted secrets until their retention ends. A soft delete still works.",
            code="purge_forbidden",
        )

    def _restore_sync(self, path: str) -> SecretMetadata:
        name = self._name(path)
        deleted = self._deleted(name)
        if deleted is not None:
            if not self._visible(deleted.properties.tags, path):
                raise self._not_owned(path)
            self._recover_sync(name)
        return self._metadata_sync(path)

    def _list_sync(self, include_deleted: bool) -> list[str]:
        found: set[str] = set()
        sources = [self._kv.list_properties_of_secrets(max_page_size=25)]
        if include_deleted:
            sources.append(self._kv.list_deleted_secrets(max_page_size=25))
        for source in sources:
            for item in source:
                props = getattr(item, "properties", item)
                name = props.name or ""
                path = self._path_of(name)
                if path is not None and self._visible(props.tags, path):
                    found.add(path)
        return sorted(found)

    def _check_sync(self) -> Health:
        from azure.core.exceptions import (
            ClientAuthenticationError,
            HttpResponseError,
            ResourceNotFoundError,
            ServiceRequestError,
            ServiceResponseError,
        )

        probe = self.config.name_prefix + _CHECK_SUFFIX
        details: dict[str, str] = {}
        probes: list[tuple[str, Callable[[], Any]]] = [
            ("list", lambda: next(iter(self._kv.list_properties_of_secrets(max_page_size=1)), None)),
            ("read", lambda: self._kv.get_secret(probe)),
            ("write", lambda: self._kv.update_secret_properties(probe, tags={"credgate-check": "1"})),
        ]
        for what, probe_fn in probes:
            try:
                probe_fn()
                details[what] = "ok"
            except ResourceNotFoundError:
                details[what] = "ok"  # permitted: the probe name does not exist
            except (ServiceRequestError, ServiceResponseError):
                raise
            except ClientAuthenticationError as exc:
                if isinstance(_root(exc), (ServiceRequestError, ServiceResponseError, OSError)):
                    raise
                return Health(
                    False, f"Azure refused backend {self.name!r}'s credentials ({self.sanitize(exc)}).",
                    {"auth": "refused"}, problem="auth_refused",
                )
            except HttpResponseError as exc:
                if _status(exc) != 403:
                    raise
                details[what] = "denied"
        denied = [k for k, v in details.items() if v != "ok"]
        if denied:
            return Health(
                False, f"Azure Key Vault denies backend {self.name!r}: {', '.join(denied)}.", details,
                problem="permission_missing",
            )
        return Health(True, "Azure Key Vault is reachable; list, read and write are permitted.", details)

    # -- the protocol ------------------------------------------------------------------------

    async def get(self, path: str, version: int | None = None) -> SecretValue:
        self._name(path)
        return await self._call("reading a secret", lambda: self._get_sync(path, version))

    async def metadata(self, path: str) -> SecretMetadata:
        self._name(path)
        return await self._call("reading a secret's metadata", lambda: self._metadata_sync(path))

    async def put(
        self, path: str, data: Mapping[str, str], *, author: str, cas: int | None = None
    ) -> SecretMetadata:
        if cas is not None:  # the gateway refuses it first (capabilities); never a silent non-atomic cas
            raise Conflict(f"Backend {self.name!r} (type azure) does not support check-and-set writes.", code="not_supported")
        name = self._name(path)
        value = json.dumps(dict(data), separators=(",", ":"), ensure_ascii=False, sort_keys=True)
        keys = sorted(data)
        lock = self._locks.get(name.lower())
        if lock is None:
            lock = self._locks.setdefault(name.lower(), asyncio.Lock())
        await lock.acquire()
        # The lock is released when the SDK's thread ends, not when the caller stops waiting
        # (the mounts' deadline): a write abandoned mid-flight can't race the next writer of
        # the path. A write abandoned before its thread began never begins.
        loop = asyncio.get_running_loop()
        guard = threading.Lock()
        state = {"started": False, "released": False}

        def release_from_thread() -> None:
            try:
                loop.call_soon_threadsafe(lock.release)
            except RuntimeError:  # the loop is gone (shutdown): nobody waits on the lock
                pass

        def work() -> SecretMetadata:
            with guard:
                if state["released"]:
                    raise asyncio.CancelledError  # abandoned while queued: write nothing
                state["started"] = True
            try:
                return self._put_sync(path, name, value, keys, author)
            finally:
                with guard:
                    state["released"] = True
                release_from_thread()

        try:
            return await self._call("writing a secret", work)
        except BaseException:
            with guard:
                if not state["started"] and not state["released"]:
                    state["released"] = True
                    lock.release()
            raise

    async def delete(self, path: str, *, author: str, destroy: bool = False) -> None:
        self._name(path)
        await self._call("destroying a secret" if destroy else "deleting a secret", lambda: self._delete_sync(path, destroy))

    async def restore(self, path: str) -> SecretMetadata:
        self._name(path)
        return await self._call("restoring a secret", lambda: self._restore_sync(path))

    async def list(
        self, prefix: str = "", *, after: str | None = None, limit: int = 100, include_deleted: bool = False
    ) -> Page:
        every = await self._call("listing secrets", lambda: self._list_sync(include_deleted))
        paths = [p for p in every if p.startswith(prefix) and (after is None or p > after)]
        page = paths[:limit]
        return Page(page, page[-1] if len(paths) > limit else None)

    async def count(self) -> int:
        return len(await self._call("counting secrets", lambda: self._list_sync(True)))

    async def check(self) -> Health:
        return await self._call("checking", self._check_sync)


def _read_file(path: str | None) -> bytes:
    assert path is not None
    with open(path, "rb") as f:
        return f.read()
