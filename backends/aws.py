"""The ``aws`` backend: AWS Secrets Manager, through boto3.

Configuration (:class:`AWSBackendConfig`, unknown fields refused with 422)
--------------------------------------------------------------------------

- ``region`` (required) and ``endpoint_url`` (an override: a VPC endpoint, or
  moto in tests; STS is reached there too unless ``assume_role.sts_endpoint_url``).
- ``name_prefix`` (default ``credgate/``): every secret's name is
  ``name_prefix + path``. credgate paths are segments of ``[A-Za-z0-9._-]``
  joined by ``/``, all characters Secrets Manager names allow (``A-Za-z0-9/_+=.@-``),
  so the mapping is the identity after the prefix and needs no encoding. A name
  is at most 512 characters: a longer ``name_prefix + path`` is refused
  (422 ``path_too_long``). (AWS advises against names ending in ``-`` and six
  characters, which look like an ARN's random suffix: credgate always addresses
  secrets by their full name, so such paths work, but avoid them if other tools
  address the same secrets by partial ARN.)
- Ownership: ``owner_tag_key`` (default ``credgate:owner``) and
  ``owner_tag_value`` (default: the mount's name). credgate writes this tag on
  every secret it creates, and never reads, writes, lists or deletes a secret
  that lacks it (see "Ownership" below) unless its path starts with one of
  ``adopt_prefixes``.
- Credentials: ambient (boto3's default chain: environment, shared files, the
  container or instance role) unless ``keys`` names an access key id and a
  secret access key (and optionally a session token) held in *another* backend
  (:class:`backends.base.SecretRef`, read with ``context.read_ref`` at
  ``start()``). ``assume_role`` (``role_arn``, ``external_id``, ``session_name``,
  ``duration_seconds``) is then assumed with those base credentials, and
  re-assumed in the background of botocore's refreshable credentials before it
  expires (at a fifth of its lifetime left, at most 15 minutes).
- ``kms_key_id``: the KMS key new secrets are encrypted with (AWS's default key
  otherwise). ``recovery_window_days`` (7-30, default 30): a soft delete's window.
- Bounded I/O: ``connect_timeout`` and ``read_timeout`` (per HTTP attempt),
  ``max_attempts`` (botocore's standard retry mode, all attempts included) and
  ``call_timeout`` (a whole call, retries included, through :func:`run_sync`).

Values and versions
-------------------

Each version's ``SecretString`` is one JSON object (compact, UTF-8, not
ASCII-escaped)::

    {"credgate":1,"owner":"<owner tag value>","by":"<author>","nonce":"<hex>","data":{...}}

credgate's integer version N is the Secrets Manager version whose ``VersionId``
is ``c7ed6a7e-0000-4000-8000-<N as 12 hex digits>`` (a UUID-shaped string,
written as the ``ClientRequestToken`` of the ``CreateSecret``/``PutSecretValue``
that made it). So:

- the current read is exactly one ``GetSecretValue`` (stage ``AWSCURRENT``): the
  answer's ``VersionId`` gives N and the value carries the owner mark;
- reading version N is one ``GetSecretValue(VersionId=...)``;
- a write reads the current N (``DescribeSecret``, which also gives the tags and
  the deletion state) and writes N+1 with the token for N+1. Two writers that
  chose the same N+1 send the same token with different values (the nonce makes
  every value distinct): Secrets Manager keeps the first and refuses the second
  with ``ResourceExistsException``, and the loser moves on to N+2. No version is
  lost or overwritten, and versions stay dense. Within one gateway process,
  writers of one path also queue on an asyncio lock (fewer collisions; and
  moto, unlike AWS, checks tokens without a lock of its own);
- ``check_and_set`` is atomic: ``cas=c`` writes only with the token for c+1, and a
  collision there is 409 ``cas_mismatch`` (nobody else can have made c+1 twice);
- no staging labels are used for versions (AWS caps the labels on a secret).
  Versions lose ``AWSCURRENT``/``AWSPREVIOUS`` as newer ones arrive and become
  unlabelled ("deprecated"); they stay readable by ``VersionId`` until Secrets
  Manager removes them: it removes unlabelled versions beyond 100, but never one
  younger than 24 hours. A removed version reads as 404 ``version_not_found`` and
  disappears from ``metadata().versions``. AWS advises against writing one secret
  more than once every 10 minutes, sustained: past about 100 versions younger than a
  day, ``PutSecretValue`` fails (``LimitExceededException``: 502
  ``target_quota_exceeded``).
- ``metadata()`` is ``DescribeSecret`` + ``ListSecretVersionIds``; each version's key
  names and author come from its value, read once per process and remembered
  (versions are immutable), so the first ``metadata()`` of a secret with many
  versions made elsewhere costs one ``GetSecretValue`` per version.

Size limit: a ``SecretString`` holds at most 65,536 bytes; 1,024 are kept for the
wrapper (the owner is at most 128 characters and the author is cut to 256), so
``capabilities.max_value_bytes`` is 64,512.

Ownership
---------

- Create: ``CreateSecret`` with the owner tag. A name that exists without the tag
  (and outside ``adopt_prefixes``) is refused: 409 ``secret_not_owned``.
- ``metadata``, ``put``, ``delete``, ``restore``, ``list`` and ``count`` check the tag
  itself (``DescribeSecret``; ``ListSecrets`` returns tags).
- The current read (the hot path, one round trip) checks the owner mark inside
  the value instead: a value without credgate's wrapper or with another owner is
  refused with 404 ``secret_not_owned``, after one ``GetSecretValue`` whose answer
  is dropped unseen (never returned, logged or cached).
- A refused secret is 404 ``secret_not_owned`` (it does not exist for this mount;
  the code tells an administrator why), 409 for a write that would take the name.
- Adoption: under an ``adopt_prefixes`` prefix, an untagged secret may be read,
  written and deleted. Its current foreign value reads as version 1 (a JSON object
  is its map, non-string values as their JSON text; any other string is
  ``{"value": <string>}``; a binary secret is refused, 422 ``unsupported_value``).
  credgate's first write to it copies that map as credgate's version 1 (the foreign
  version itself is left as it is, deprecated), tags the secret and writes version 2.
- A value written into an owned secret by someone else (``AWSCURRENT`` not one of
  credgate's versions) is refused on read (409 ``foreign_version``); credgate's
  next write supersedes it.

Deletes
-------

Soft delete is ``DeleteSecret`` with ``RecoveryWindowInDays`` (the secret is
scheduled for deletion; Secrets Manager purges it when the window ends);
``restore`` is ``RestoreSecret``; writing to a soft-deleted secret restores it
first (its name can't be re-created until purged). ``destroy`` is ``DeleteSecret``
with ``ForceDeleteWithoutRecovery`` (restoring a soft-deleted secret first): every
version is gone. AWS deletes asynchronously, so the name may be refused for a
few seconds after a destroy.

Listing
-------

``ListSecrets`` (name prefix filter, ``IncludePlannedDeletion`` for
``include_deleted``, 100 per page) returns every secret under the prefix in no
useful order: the backend fetches them all, keeps the owned ones whose names are
valid credgate paths, sorts them and cuts the page after ``after``. A list call
therefore costs one request per 100 secrets under ``name_prefix + prefix``, whatever
``limit`` is. ``ListSecrets`` is eventually consistent (AWS: changes may take
minutes to show); reads and writes by name are not affected.

Errors
------

No connection, a timeout, throttling -> :class:`TargetUnreachable` (the mounts
answer 503 ``backend_unavailable`` with ``Retry-After``);
``UnrecognizedClientException``, ``InvalidSignatureException``,
``ExpiredTokenException``, missing credentials, a refused ``AssumeRole`` ->
``TargetError(code="target_auth_failed")``; ``AccessDeniedException`` ->
``target_permission_denied``; ``ResourceNotFoundException`` -> 404
``secret_not_found``/``version_not_found``; a 5xx -> ``backend_unavailable`` (502);
anything else -> ``target_error``. Messages name the operation and
:meth:`AWSSecretsManagerBackend.sanitize` (the exception's class and AWS error
code), never AWS's message (it can quote ARNs and parameters).

``check()`` probes, without creating anything: ``ListSecrets`` (reachability,
credentials, list permission), ``GetSecretValue`` and ``PutSecretValue`` on a name
credgate paths can't produce (``<prefix>credgate@check``; "not found" means
permitted). Create and delete can't be probed without a visible secret.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

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

__all__ = ["AWSSecretsManagerBackend", "AWSBackendConfig", "AssumeRoleConfig", "StaticKeysConfig", "version_id", "version_of"]

_T = TypeVar("_T")

SECRET_STRING_MAX = 65_536  # bytes, AWS's limit on a SecretString
WRAPPER_RESERVE = 1_024
NAME_MAX = 512
AUTHOR_MAX = 256
_VERSION_PREFIX = "c7ed6a7e-0000-4000-8000-"
_VERSION_RE = re.compile(r"^c7ed6a7e-0000-4000-8000-([0-9a-f]{12})$")
_PATH_RE = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")
_CHECK_SUFFIX = "credgate@check"  # '@' is never in a credgate path
_MAX_COLLISIONS = 1_000
_FACTS_MAX = 20_000

_AUTH_CODES = frozenset({
    "UnrecognizedClientException", "InvalidSignatureException", "ExpiredTokenException", "ExpiredToken",
    "InvalidClientTokenId", "SignatureDoesNotMatch", "IncompleteSignature", "MissingAuthenticationToken",
    "AuthFailure", "InvalidAccessKeyId", "RequestExpired",
})
_PERMISSION_CODES = frozenset({"AccessDeniedException", "AccessDenied", "UnauthorizedOperation"})
_THROTTLE_CODES = frozenset({
    "ThrottlingException", "Throttling", "TooManyRequestsException", "RequestLimitExceeded",
    "ServiceUnavailable", "ServiceUnavailableException",
})


def version_id(n: int) -> str:
    """The Secrets Manager ``VersionId`` (and ``ClientRequestToken``) of credgate version ``n``."""
    return f"{_VERSION_PREFIX}{n:012x}"


def version_of(vid: str | None) -> int | None:
    """credgate's version number for a ``VersionId``, or None for a version credgate did not write."""
    m = _VERSION_RE.match(vid or "")
    return int(m.group(1), 16) if m else None


class StaticKeysConfig(BaseModel):
    """Long-term (or temporary) AWS keys held in another backend."""

    model_config = ConfigDict(extra="forbid")

    access_key_id: SecretRef
    secret_access_key: SecretRef
    session_token: SecretRef | None = None


class AssumeRoleConfig(BaseModel):
    """A role assumed with the base credentials (ambient or ``keys``), refreshed before it expires."""

    model_config = ConfigDict(extra="forbid")

    role_arn: str = Field(max_length=2048, pattern=r"^arn:aws[a-z-]*:iam::[0-9]{12}:role/[A-Za-z0-9_+=,.@/-]+$")
    external_id: str | None = Field(default=None, min_length=2, max_length=1224, pattern=r"^[A-Za-z0-9_+=,.@:/-]+$")
    session_name: str = Field(default="credgate", min_length=2, max_length=64, pattern=r"^[A-Za-z0-9_+=,.@-]+$")
    duration_seconds: int = Field(default=3600, ge=900, le=43_200)
    sts_endpoint_url: str | None = Field(default=None, max_length=2048, pattern=r"^https?://[^\s]+$")


class AWSBackendConfig(BaseModel):
    """See the module docstring."""

    model_config = ConfigDict(extra="forbid")

    region: str = Field(pattern=r"^[a-z]{2}(-[a-z]+)+-\d{1,2}$")
    endpoint_url: str | None = Field(default=None, max_length=2048, pattern=r"^https?://[^\s]+$")
    name_prefix: str = Field(default="credgate/", max_length=256, pattern=r"^[A-Za-z0-9/_+=.@-]*$")
    owner_tag_key: str = Field(default="credgate:owner", min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:/=+@-]+$")
    owner_tag_value: str | None = Field(default=None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:/=+@-]+$")
    adopt_prefixes: list[str] = Field(default_factory=list, max_length=50)
    keys: StaticKeysConfig | None = None
    assume_role: AssumeRoleConfig | None = None
    kms_key_id: str | None = Field(default=None, min_length=1, max_length=2048)
    recovery_window_days: int = Field(default=30, ge=7, le=30)
    connect_timeout: float = Field(default=5.0, gt=0, le=60)
    read_timeout: float = Field(default=10.0, gt=0, le=120)
    max_attempts: int = Field(default=3, ge=1, le=10)
    call_timeout: float = Field(default=30.0, gt=0, le=600)

    @field_validator("owner_tag_key")
    @classmethod
    def _not_aws(cls, v: str) -> str:
        if v.lower().startswith("aws:"):
            raise ValueError("tag keys starting with 'aws:' are reserved by AWS")
        return v

    @field_validator("adopt_prefixes")
    @classmethod
    def _prefixes(cls, v: list[str]) -> list[str]:
        for p in v:
            if not p or len(p) > 512 or not re.fullmatch(r"[A-Za-z0-9._/-]+", p):
                raise ValueError("each adopt prefix is a non-empty path prefix of [A-Za-z0-9._/-]")
        return v


class _Passthrough(Exception):
    """A ClientError code a caller asked to decide on itself (see ``_call``); carries only the code."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


class _RoleRefused(Exception):
    """AssumeRole was refused; carries only the AWS error code."""

    def __init__(self, code: str) -> None:
        super().__init__(f"AssumeRole refused ({code})")
        self.code = code


_XML_CODE = re.compile(r"<Code>([A-Za-z.]{1,64})</Code>")


def _error_code(exc: BaseException) -> str | None:
    """The AWS error code of a botocore ClientError. When the answer was an XML
    ``ErrorResponse`` (moto answers auth failures of JSON services that way), botocore
    can't parse it and leaves the HTTP status as the code and the XML as the message:
    the ``<Code>`` element is then taken from it (only that token, never the message)."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None
    error = response.get("Error") or {}
    code = error.get("Code")
    if code is None:
        return None
    code = str(code)
    if code.isdigit():
        m = _XML_CODE.search(str(error.get("Message") or "")[:4096])
        if m:
            return m.group(1)
    return code


def _status(exc: BaseException) -> int:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    return 0


# botocore loggers whose DEBUG lines quote request bodies (a SecretString), response bodies,
# canonical requests or signatures: their DEBUG records are dropped (see _quiet_botocore).
_CHATTY_LOGGERS = (
    "botocore.endpoint", "botocore.parsers", "botocore.auth", "botocore.handlers",
    "botocore.awsrequest", "botocore.httpsession",
)


class _DropDebug(logging.Filter):
    """Drops DEBUG records: on the loggers above they can carry a secret value."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.DEBUG


def _quiet_botocore() -> None:
    """Whatever level the process logs at, botocore's body- and signature-quoting DEBUG
    lines never reach a handler (idempotent)."""
    for name in _CHATTY_LOGGERS:
        lg = logging.getLogger(name)
        if not any(isinstance(f, _DropDebug) for f in lg.filters):
            lg.addFilter(_DropDebug())


class _Described:
    """What ``DescribeSecret`` says, reduced to what the backend decides by."""

    __slots__ = ("tags", "deleted_at", "created_at", "updated_at", "stages")

    def __init__(self, raw: Mapping[str, Any]) -> None:
        self.tags = {t.get("Key"): t.get("Value") for t in raw.get("Tags") or []}
        self.deleted_at: datetime | None = raw.get("DeletedDate")
        self.created_at: datetime = raw.get("CreatedDate") or datetime.now(UTC)
        self.updated_at: datetime = raw.get("LastChangedDate") or self.created_at
        self.stages: dict[str, list[str]] = dict(raw.get("VersionIdsToStages") or raw.get("SecretVersionsToStages") or {})

    def stage(self, label: str) -> str | None:
        return next((vid for vid, labels in self.stages.items() if label in labels), None)

    def max_version(self) -> int:
        return max((n for n in map(version_of, self.stages) if n is not None), default=0)


class AWSSecretsManagerBackend(BackendBase):
    """AWS Secrets Manager; see the module docstring for the mapping."""

    type: ClassVar[str] = "aws"
    config_model: ClassVar[type[BaseModel]] = AWSBackendConfig
    # Others can write to Secrets Manager behind the gateway's back: not cacheable.
    capabilities: ClassVar[BackendCapabilities] = BackendCapabilities(
        versions=True, soft_delete=True, check_and_set=True, cacheable=False, read_only=False,
        max_value_bytes=SECRET_STRING_MAX - WRAPPER_RESERVE,
    )

    def __init__(self, name: str, config: AWSBackendConfig, context: BackendContext) -> None:
        super().__init__(name, config, context)
        self.config: AWSBackendConfig
        self.owner = config.owner_tag_value or name
        self._client: Any = None
        self._role_creds: Any = None  # botocore refreshable credentials, with assume_role
        self.role_refreshes = 0  # AssumeRole calls that succeeded
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        # (secret name, version) -> (keys, author): versions are immutable, so this never goes stale.
        self._facts: OrderedDict[tuple[str, int], tuple[list[str], str | None]] = OrderedDict()
        self._facts_lock = threading.Lock()

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        keys: tuple[str, str, str | None] | None = None
        if self.config.keys is not None:
            if self.context.read_ref is None:
                raise ValidationFailed(
                    f"Backend {self.name!r} keeps its AWS keys in another backend, which this gateway can't read.",
                    code="secret_ref_unavailable",
                )
            k = self.config.keys
            refs = [k.access_key_id, k.secret_access_key, *([k.session_token] if k.session_token else [])]
            got: list[str] = []
            for ref in refs:
                try:
                    got.append(await self.context.read_ref(ref))
                except (TargetUnreachable, ValidationFailed):
                    raise
                except CredgateError as exc:  # not the caller's path: the credentials can't be read
                    raise TargetError(
                        f"Backend {self.name!r} could not read its AWS keys from {ref.backend}/{ref.path} ({exc.code}).",
                        code="target_auth_failed",
                    ) from None
            keys = (got[0], got[1], got[2] if len(got) > 2 else None)
        self._client = await self._call("connecting", lambda: self._make_client(keys))

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                pass

    def _botocore_config(self) -> Any:
        from botocore.config import Config

        c = self.config
        return Config(
            connect_timeout=c.connect_timeout,
            read_timeout=c.read_timeout,
            retries={"total_max_attempts": c.max_attempts, "mode": "standard"},
            max_pool_connections=32,
            ignore_configured_endpoint_urls=True,  # no AWS_ENDPOINT_URL redirect of the credentials
        )

    def _make_client(self, keys: tuple[str, str, str | None] | None) -> Any:
        import botocore.session

        _quiet_botocore()
        c = self.config
        base = botocore.session.Session()
        if keys is not None:
            base.set_credentials(keys[0], keys[1], keys[2])
        session = base
        if c.assume_role is not None:
            session = botocore.session.Session()
            creds = self._role_credentials(base)
            from botocore.credentials import CredentialProvider, CredentialResolver

            class _RoleProvider(CredentialProvider):
                METHOD = CANONICAL_NAME = "credgate-assume-role"

                def load(self) -> Any:
                    return creds

            session.register_component("credential_provider", CredentialResolver([_RoleProvider()]))
        return session.create_client(
            "secretsmanager", region_name=c.region, endpoint_url=c.endpoint_url, config=self._botocore_config()
        )

    def _role_credentials(self, base: Any) -> Any:
        """Refreshable credentials for ``assume_role``, re-assumed when a fifth of their
        lifetime (at most 15 minutes) is left; the first AssumeRole happens at the first call."""
        from botocore.credentials import DeferredRefreshableCredentials
        from botocore.exceptions import ClientError

        c = self.config
        role = c.assume_role
        assert role is not None
        sts = base.create_client(
            "sts", region_name=c.region, endpoint_url=role.sts_endpoint_url or c.endpoint_url,
            config=self._botocore_config(),
        )

        def refresh() -> dict[str, str]:
            kwargs: dict[str, Any] = {
                "RoleArn": role.role_arn, "RoleSessionName": role.session_name,
                "DurationSeconds": role.duration_seconds,
            }
            if role.external_id:
                kwargs["ExternalId"] = role.external_id
            try:
                got = sts.assume_role(**kwargs)["Credentials"]
            except ClientError as exc:
                code = _error_code(exc) or "ClientError"
                if code in _THROTTLE_CODES or _status(exc) >= 500:
                    raise
                raise _RoleRefused(code) from None
            self.role_refreshes += 1
            return {
                "access_key": got["AccessKeyId"], "secret_key": got["SecretAccessKey"],
                "token": got["SessionToken"], "expiry_time": got["Expiration"].isoformat(),
            }

        creds = DeferredRefreshableCredentials(refresh_using=refresh, method="credgate-assume-role")
        # botocore refreshes 15 min (advisory) / 10 min (mandatory) before expiry by default,
        # which would be on every call for a 15-minute role; scale to the role's lifetime.
        advisory = min(15 * 60, role.duration_seconds // 5)
        creds._advisory_refresh_timeout = advisory
        creds._mandatory_refresh_timeout = max(30, advisory * 2 // 3)
        self._role_creds = creds
        return creds

    # -- errors --------------------------------------------------------------------

    @classmethod
    def sanitize(cls, exc: BaseException) -> str:
        """A botocore error as its class and AWS error code, never its message (AWS quotes
        ARNs, names and parameters there)."""
        if isinstance(exc, _RoleRefused):
            return f"AssumeRole ({exc.code})"
        code = _error_code(exc)
        return f"{type(exc).__name__} ({code})" if code is not None else generic_sanitize(exc)

    def _map(self, exc: BaseException, doing: str) -> CredgateError:
        from botocore.exceptions import ClientError, CredentialRetrievalError, HTTPClientError, NoCredentialsError
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import PartialCredentialsError

        what = self.sanitize(exc)
        if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
            return TargetUnreachable(
                f"AWS Secrets Manager did not answer in time while {doing}.", code="target_timeout"
            )
        if isinstance(exc, (HTTPClientError, BotoConnectionError, ConnectionError)):
            return TargetUnreachable(f"AWS Secrets Manager could not be reached while {doing} ({what}).")
        if isinstance(exc, (_RoleRefused, NoCredentialsError, PartialCredentialsError, CredentialRetrievalError)):
            return TargetError(
                f"AWS refused backend {self.name!r}'s credentials while {doing} ({what}).", code="target_auth_failed"
            )
        if isinstance(exc, ClientError):
            code = _error_code(exc) or ""
            if code in _AUTH_CODES:
                return TargetError(
                    f"AWS refused backend {self.name!r}'s credentials while {doing} ({what}).",
                    code="target_auth_failed",
                )
            if code in _PERMISSION_CODES:
                return TargetError(
                    f"AWS denied backend {self.name!r} permission for {doing} ({what}).",
                    code="target_permission_denied",
                )
            if code == "LimitExceededException":
                return TargetError(
                    f"AWS Secrets Manager refused {doing}: a quota is reached ({what}); a secret keeps at most "
                    f"about 100 versions younger than 24 hours.",
                    code="target_quota_exceeded",
                )
            if code in _THROTTLE_CODES:
                return TargetUnreachable(f"AWS Secrets Manager is throttling {doing} ({what}).", code="target_throttled")
            if _status(exc) >= 500:
                return TargetError(f"AWS Secrets Manager failed while {doing} ({what}).", code="backend_unavailable")
            return TargetError(f"AWS Secrets Manager refused {doing} ({what}).")
        if isinstance(exc, OSError):
            return TargetUnreachable(f"AWS Secrets Manager could not be reached while {doing} ({what}).")
        return TargetError(f"AWS Secrets Manager failed while {doing} ({what}).")

    async def _call(self, doing: str, fn: Callable[[], _T], *, passthrough: frozenset[str] = frozenset()) -> _T:
        """Run ``fn`` (a blocking botocore call) in a thread under ``call_timeout``. A
        ClientError whose code is in ``passthrough`` becomes :class:`_Passthrough` (its code
        only) for the caller to decide on; every other failure becomes a credgate error (``from None``)."""
        try:
            return await run_sync(fn, timeout=self.config.call_timeout, pool=f"backend:{self.name}")
        except CredgateError:
            raise
        except Exception as exc:  # noqa: BLE001 - every SDK failure is mapped, never quoted
            code = _error_code(exc)
            if code is not None and code in passthrough:
                raise _Passthrough(code) from None
            raise self._map(exc, doing) from None

    @property
    def _sm(self) -> Any:
        if self._client is None:
            raise TargetUnreachable(f"Backend {self.name!r} is not started.", code="backend_not_started")
        return self._client

    # -- names, ownership, values -------------------------------------------------------

    def _ref(self, path: str) -> str:
        return f"{self.name}/{path}"

    def _name(self, path: str) -> str:
        name = self.config.name_prefix + path
        if len(name) > NAME_MAX:
            raise ValidationFailed(
                f"Path {path!r} is too long for AWS Secrets Manager: name_prefix + path must be at most "
                f"{NAME_MAX} characters.",
                code="path_too_long",
            )
        return name

    def _adoptable(self, path: str) -> bool:
        return any(path.startswith(p) for p in self.config.adopt_prefixes)

    def _tagged(self, tags: Mapping[str, Any]) -> bool:
        return tags.get(self.config.owner_tag_key) == self.owner

    def _not_owned(self, path: str, writing: bool = False) -> CredgateError:
        msg = (
            f"Secret {self._ref(path)} exists in AWS Secrets Manager but was not created by this backend "
            f"(no {self.config.owner_tag_key}={self.owner} tag); credgate does not touch it."
        )
        return Conflict(msg, code="secret_not_owned") if writing else NotFound(msg, code="secret_not_owned")

    def _check_owned(self, d: _Described, path: str, writing: bool = False) -> bool:
        """True if owned through the tag; False if adoptable; refuses otherwise (404, or 409
        for a write that would take the name)."""
        if self._tagged(d.tags):
            return True
        if self._adoptable(path):
            return False
        raise self._not_owned(path, writing)

    def _wrap(self, data: Mapping[str, str], author: str) -> str:
        body = {
            "credgate": 1, "owner": self.owner, "by": author[:AUTHOR_MAX],
            "nonce": secrets.token_hex(8), "data": dict(data),
        }
        return json.dumps(body, separators=(",", ":"), ensure_ascii=False)

    def _unwrap(self, raw: Mapping[str, Any], path: str) -> tuple[dict[str, str], str | None] | None:
        """(data, author) of a credgate value of this owner; None for a foreign value;
        refuses a credgate value of another owner."""
        text = raw.get("SecretString")
        if not isinstance(text, str):
            return None
        try:
            body = json.loads(text)
        except ValueError:
            return None
        if not isinstance(body, dict) or body.get("credgate") != 1 or not isinstance(body.get("data"), dict):
            return None
        if body.get("owner") != self.owner:
            raise self._not_owned(path)
        return {str(k): str(v) for k, v in body["data"].items()}, body.get("by")

    def _foreign(self, raw: Mapping[str, Any], path: str) -> dict[str, str]:
        """An adopted secret's foreign value as a map (see "Ownership")."""
        text = raw.get("SecretString")
        if not isinstance(text, str):
            raise ValidationFailed(
                f"Secret {self._ref(path)} holds a binary value, which credgate can't read.", code="unsupported_value"
            )
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

    def _remember(self, name: str, n: int, keys: list[str], author: str | None) -> None:
        with self._facts_lock:
            self._facts[(name, n)] = (keys, author)
            self._facts.move_to_end((name, n))
            while len(self._facts) > _FACTS_MAX:
                self._facts.popitem(last=False)

    def _forget(self, name: str) -> None:
        with self._facts_lock:
            for key in [k for k in self._facts if k[0] == name]:
                del self._facts[key]

    def _lock(self, name: str) -> asyncio.Lock:
        lock = self._locks.get(name)
        if lock is None:
            lock = asyncio.Lock()
            self._locks[name] = lock
        return lock

    # -- reads ---------------------------------------------------------------------

    async def _describe(self, name: str) -> _Described | None:
        try:
            raw = await self._call(
                "describing a secret", lambda: self._sm.describe_secret(SecretId=name),
                passthrough=frozenset({"ResourceNotFoundException"}),
            )
        except _Passthrough:
            return None
        return _Described(raw)

    async def _live(self, path: str) -> tuple[str, _Described, bool]:
        name = self._name(path)
        d = await self._describe(name)
        if d is None:
            raise NotFound(f"Secret {self._ref(path)} does not exist.", code="secret_not_found")
        owned = self._check_owned(d, path)
        return name, d, owned

    def _deleted(self, path: str) -> NotFound:
        return NotFound(
            f"Secret {self._ref(path)} is deleted; restore it with `credgate secret restore {self._ref(path)}`.",
            code="secret_deleted",
        )

    async def _get_raw(self, name: str, **selector: str) -> Mapping[str, Any]:
        return await self._call(
            "reading a secret", lambda: self._sm.get_secret_value(SecretId=name, **selector),
            passthrough=frozenset({"ResourceNotFoundException", "InvalidRequestException"}),
        )

    async def get(self, path: str, version: int | None = None) -> SecretValue:
        name = self._name(path)
        selector = {"VersionStage": "AWSCURRENT"} if version is None else {"VersionId": version_id(version)}
        try:
            raw = await self._get_raw(name, **selector)
        except _Passthrough as exc:
            return await self._get_failed(path, name, version, exc.code)
        n = version_of(raw.get("VersionId"))
        unwrapped = self._unwrap(raw, path)
        if unwrapped is not None and n is not None:
            return SecretValue(path, n, unwrapped[0])
        # Not one of credgate's versions: an adopted secret's foreign value, or a foreign write.
        return await self._get_foreign(path, name, version, raw)

    async def _get_failed(self, path: str, name: str, version: int | None, code: str | None) -> SecretValue:
        """Explain a failed GetSecretValue (the error path may cost a DescribeSecret)."""
        d = await self._describe(name)
        if d is None:
            raise NotFound(f"Secret {self._ref(path)} does not exist.", code="secret_not_found")
        owned = self._check_owned(d, path)
        if d.deleted_at is not None:
            raise self._deleted(path)
        if version == 1 and not owned and d.max_version() == 0:
            return await self._adopted_v1(path, name)
        if code == "InvalidRequestException":
            raise TargetError(f"AWS Secrets Manager refused reading {self._ref(path)} (InvalidRequestException).")
        which = "current version" if version is None else f"version {version}"
        raise NotFound(f"Secret {self._ref(path)} has no {which}.", code="version_not_found")

    async def _adopted_v1(self, path: str, name: str) -> SecretValue:
        """Version 1 of an adoptable secret credgate never wrote: its current foreign value."""
        try:
            raw = await self._get_raw(name, VersionStage="AWSCURRENT")
        except _Passthrough:
            raise NotFound(f"Secret {self._ref(path)} has no version 1.", code="version_not_found") from None
        return SecretValue(path, 1, self._foreign(raw, path))

    async def _get_foreign(self, path: str, name: str, version: int | None, raw: Mapping[str, Any]) -> SecretValue:
        d = await self._describe(name)
        if d is None:
            raise NotFound(f"Secret {self._ref(path)} does not exist.", code="secret_not_found")
        owned = self._check_owned(d, path)
        if version is None and not owned and d.max_version() == 0:
            # An adoptable secret credgate never wrote (its first write tags it): version 1.
            return SecretValue(path, 1, self._foreign(raw, path))
        raise Conflict(
            f"The current value of {self._ref(path)} was written outside credgate; write a new version "
            f"through credgate to supersede it.",
            code="foreign_version",
        )

    async def metadata(self, path: str) -> SecretMetadata:
        name, d, owned = await self._live(path)
        if d.deleted_at is not None:
            raise self._deleted(path)
        return await self._metadata(path, name, d, owned)

    async def _metadata(
        self, path: str, name: str, d: _Described, owned: bool, written: int | None = None
    ) -> SecretMetadata:
        listed = await self._versions(name)
        versions: dict[int, tuple[str, datetime]] = {}
        for v in listed:
            vid = v.get("VersionId") or ""
            n = version_of(vid)
            if n is not None:
                versions[n] = (vid, v.get("CreatedDate") or d.created_at)
        current_vid = d.stage("AWSCURRENT")
        if not versions and not owned and current_vid:  # adoptable, never written by credgate
            created = next((v.get("CreatedDate") for v in listed if v.get("VersionId") == current_vid), None)
            versions[1] = (current_vid, created or d.created_at)
        if written is not None:
            current = written
        elif current_vid is not None and current_vid == versions.get(1, ("",))[0]:
            current = 1  # adoptable, never written
        else:
            current = version_of(current_vid) or max(versions, default=0)
        facts = await self._facts_for(path, name, versions)
        return SecretMetadata(
            backend=self.name,
            path=path,
            current_version=current,
            keys=list(facts[current][0]) if current in facts else [],
            created_at=d.created_at,
            updated_at=d.updated_at,
            deleted_at=d.deleted_at,
            versions=[VersionInfo(n, facts[n][0], versions[n][1], facts[n][1]) for n in sorted(versions) if n in facts],
        )

    async def _versions(self, name: str) -> list[dict[str, Any]]:
        def call() -> list[dict[str, Any]]:
            out: list[dict[str, Any]] = []
            token: str | None = None
            while True:
                kwargs: dict[str, Any] = {"SecretId": name, "IncludeDeprecated": True, "MaxResults": 100}
                if token:
                    kwargs["NextToken"] = token
                page = self._sm.list_secret_version_ids(**kwargs)
                out.extend(page.get("Versions") or [])
                token = page.get("NextToken")
                if not token:
                    return out

        try:
            return await self._call("listing a secret's versions", call, passthrough=frozenset({"ResourceNotFoundException"}))
        except _Passthrough:  # gone meanwhile
            return []

    async def _facts_for(
        self, path: str, name: str, versions: Mapping[int, tuple[str, datetime]]
    ) -> dict[int, tuple[list[str], str | None]]:
        out: dict[int, tuple[list[str], str | None]] = {}
        missing: list[int] = []
        with self._facts_lock:
            for n in versions:
                got = self._facts.get((name, n))
                if got is None:
                    missing.append(n)
                else:
                    out[n] = got
        sem = asyncio.Semaphore(8)

        async def fetch(n: int) -> None:
            async with sem:
                try:
                    raw = await self._get_raw(name, VersionId=versions[n][0])
                except _Passthrough:  # removed meanwhile: not listed
                    return
            unwrapped = self._unwrap(raw, path)
            if unwrapped is not None:
                keys, author = sorted(unwrapped[0]), unwrapped[1]
            else:
                keys, author = sorted(self._foreign(raw, path)), None
            self._remember(name, n, keys, author)
            out[n] = (keys, author)

        if missing:
            await asyncio.gather(*(fetch(n) for n in missing))
        return out

    # -- writes ----------------------------------------------------------------------

    def _cas_mismatch(self, path: str, current: int, cas: int) -> Conflict:
        return Conflict(f"Secret {self._ref(path)} is at version {current}, not {cas}.", code="cas_mismatch")

    async def put(
        self, path: str, data: Mapping[str, str], *, author: str, cas: int | None = None
    ) -> SecretMetadata:
        name = self._name(path)
        async with self._lock(name):
            d = await self._describe(name)
            if d is None:
                if cas not in (None, 0):
                    raise self._cas_mismatch(path, 0, cas)
                created = await self._create(path, name, data, author)
                if created is not None:
                    return created
                d = await self._describe(name)  # the name is taken: by another writer, or not ours
                if d is None:
                    raise TargetError(f"AWS Secrets Manager neither created nor found {self._ref(path)}.")
            owned = self._check_owned(d, path, writing=True)
            current = d.max_version() or await self._scan_current(name)
            if cas is not None and cas != max(current, 0 if owned else 1):
                raise self._cas_mismatch(path, max(current, 0 if owned else 1), cas)
            if d.deleted_at is not None:  # writing to a soft-deleted secret restores it
                await self._call("restoring a secret", lambda: self._sm.restore_secret(SecretId=name))
            if not owned:
                await self._adopt(path, name, d, current)
                current = max(current, 1)
            n = current + 1
            for _ in range(_MAX_COLLISIONS):
                if await self._put_version(name, n, data, author):
                    break
                if cas is not None:
                    raise self._cas_mismatch(path, n, cas)
                n += 1
            else:
                raise TargetError(f"Could not find a free version for {self._ref(path)}.", code="version_conflict")
            self._remember(name, n, sorted(data), author[:AUTHOR_MAX])
            d.deleted_at, d.updated_at = None, datetime.now(UTC)
            return await self._metadata(path, name, d, True, written=n)

    async def _create(self, path: str, name: str, data: Mapping[str, str], author: str) -> SecretMetadata | None:
        """CreateSecret as version 1; None if the name exists (someone created it meanwhile)."""
        kwargs: dict[str, Any] = {
            "Name": name, "ClientRequestToken": version_id(1), "SecretString": self._wrap(data, author),
            "Tags": [{"Key": self.config.owner_tag_key, "Value": self.owner}],
        }
        if self.config.kms_key_id:
            kwargs["KmsKeyId"] = self.config.kms_key_id
        try:
            await self._call(
                "creating a secret", lambda: self._sm.create_secret(**kwargs),
                passthrough=frozenset({"ResourceExistsException"}),
            )
        except _Passthrough:  # ResourceExistsException: the name is taken
            return None
        self._remember(name, 1, sorted(data), author[:AUTHOR_MAX])
        now = datetime.now(UTC)
        return SecretMetadata(
            backend=self.name, path=path, current_version=1, keys=sorted(data), created_at=now, updated_at=now,
            deleted_at=None, versions=[VersionInfo(1, sorted(data), now, author[:AUTHOR_MAX])],
        )

    async def _scan_current(self, name: str) -> int:
        """The highest credgate version when none carries AWSCURRENT/AWSPREVIOUS (foreign writes
        pushed them out): from ListSecretVersionIds, deprecated versions included."""
        versions = await self._versions(name)
        return max((n for n in (version_of(v.get("VersionId")) for v in versions) if n is not None), default=0)

    async def _adopt(self, path: str, name: str, d: _Described, current: int) -> None:
        """Adopt a foreign secret: if credgate never wrote it, its current value becomes credgate's
        version 1 (a copy, in credgate's wrapper: staging labels can't be relied on to survive
        later writes); then tag it. In this order, so an adoption cut short is simply done again."""
        if current == 0 and d.stage("AWSCURRENT"):
            raw = await self._get_raw(name, VersionStage="AWSCURRENT")
            data = self._foreign(raw, path)
            await self._put_version(name, 1, data, "adopted")
            self._remember(name, 1, sorted(data), "adopted")
        tag = [{"Key": self.config.owner_tag_key, "Value": self.owner}]
        await self._call("tagging an adopted secret", lambda: self._sm.tag_resource(SecretId=name, Tags=tag))

    async def _put_version(self, name: str, n: int, data: Mapping[str, str], author: str) -> bool:
        """Write version ``n``; False if its token is taken (another writer made version ``n``)."""
        text = self._wrap(data, author)
        try:
            await self._call(
                "writing a secret",
                lambda: self._sm.put_secret_value(SecretId=name, ClientRequestToken=version_id(n), SecretString=text),
                passthrough=frozenset({"ResourceExistsException"}),
            )
        except _Passthrough:  # ResourceExistsException: the token (version n) is taken
            return False
        return True

    async def delete(self, path: str, *, author: str, destroy: bool = False) -> None:
        name = self._name(path)
        async with self._lock(name):
            _, d, _ = await self._live(path)
            if destroy:
                if d.deleted_at is not None:
                    await self._call("restoring a secret", lambda: self._sm.restore_secret(SecretId=name))
                await self._call(
                    "destroying a secret",
                    lambda: self._sm.delete_secret(SecretId=name, ForceDeleteWithoutRecovery=True),
                )
                self._forget(name)
            elif d.deleted_at is None:
                days = self.config.recovery_window_days
                await self._call(
                    "deleting a secret", lambda: self._sm.delete_secret(SecretId=name, RecoveryWindowInDays=days)
                )

    async def restore(self, path: str) -> SecretMetadata:
        name = self._name(path)
        async with self._lock(name):
            _, d, owned = await self._live(path)
            if d.deleted_at is not None:
                await self._call("restoring a secret", lambda: self._sm.restore_secret(SecretId=name))
                d.deleted_at = None
            return await self._metadata(path, name, d, owned)

    # -- listing -----------------------------------------------------------------------

    async def _all(self, prefix: str, include_deleted: bool) -> list[tuple[str, bool]]:
        """(path, deleted) of every secret this backend may touch under ``prefix``."""
        start = self.config.name_prefix + prefix

        def call() -> list[dict[str, Any]]:
            out: list[dict[str, Any]] = []
            token: str | None = None
            while True:
                kwargs: dict[str, Any] = {"MaxResults": 100, "IncludePlannedDeletion": include_deleted}
                if start:
                    kwargs["Filters"] = [{"Key": "name", "Values": [start]}]
                if token:
                    kwargs["NextToken"] = token
                page = self._sm.list_secrets(**kwargs)
                out.extend(page.get("SecretList") or [])
                token = page.get("NextToken")
                if not token:
                    return out

        listed = await self._call("listing secrets", call)
        found: list[tuple[str, bool]] = []
        cut = len(self.config.name_prefix)
        for s in listed:
            name = s.get("Name") or ""
            if not name.startswith(start):
                continue
            path = name[cut:]
            if not _PATH_RE.match(path) or any(seg in (".", "..") for seg in path.split("/")):
                continue
            tags = {t.get("Key"): t.get("Value") for t in s.get("Tags") or []}
            if not self._tagged(tags) and not self._adoptable(path):
                continue
            deleted = s.get("DeletedDate") is not None
            if deleted and not include_deleted:
                continue
            found.append((path, deleted))
        return found

    async def list(
        self, prefix: str = "", *, after: str | None = None, limit: int = 100, include_deleted: bool = False
    ) -> Page:
        paths = sorted({p for p, _ in await self._all(prefix, include_deleted)})
        if after is not None:
            paths = [p for p in paths if p > after]
        more = len(paths) > limit
        paths = paths[:limit]
        return Page(paths, paths[-1] if more else None)

    async def count(self) -> int:
        return len(await self._all("", include_deleted=True))

    # -- health ----------------------------------------------------------------------

    async def check(self) -> Health:
        details: dict[str, str] = {}
        probe = self.config.name_prefix + _CHECK_SUFFIX
        prefix = self.config.name_prefix

        def listing() -> Any:
            kwargs: dict[str, Any] = {"MaxResults": 1}
            if prefix:
                kwargs["Filters"] = [{"Key": "name", "Values": [prefix]}]
            return self._sm.list_secrets(**kwargs)

        try:
            await self._call("listing secrets", listing)
            details["list"] = "ok"
        except TargetUnreachable as exc:
            return Health(False, exc.message, {"code": exc.code}, problem="unreachable")
        except TargetError as exc:
            if exc.code == "target_auth_failed":
                return Health(False, exc.message, {"code": exc.code}, problem="auth_refused")
            if exc.code != "target_permission_denied":
                return Health(False, exc.message, {"code": exc.code}, problem="misconfigured")
            details["list"] = "denied"

        # Read, then (only if the probe name does not exist) write: neither creates anything.
        try:
            await self._call(
                "probing read permission", lambda: self._sm.get_secret_value(SecretId=probe),
                passthrough=frozenset({"ResourceNotFoundException"}),
            )
            details["read"], details["write"] = "ok", "unknown"  # the probe name exists: don't write to it
        except _Passthrough:
            details["read"] = "ok"
        except TargetUnreachable as exc:
            return Health(False, exc.message, {**details, "code": exc.code}, problem="unreachable")
        except TargetError as exc:
            if exc.code == "target_auth_failed":
                return Health(False, exc.message, {**details, "code": exc.code}, problem="auth_refused")
            details["read"] = "denied" if exc.code == "target_permission_denied" else "error"
        if "write" not in details:
            try:
                await self._call(
                    "probing write permission",
                    lambda: self._sm.put_secret_value(
                        SecretId=probe, ClientRequestToken=version_id(1), SecretString="{}"
                    ),
                    passthrough=frozenset({"ResourceNotFoundException"}),
                )
                details["write"] = "ok"
            except _Passthrough:
                details["write"] = "ok"  # permitted; nothing there, nothing written
            except TargetUnreachable as exc:
                return Health(False, exc.message, {**details, "code": exc.code}, problem="unreachable")
            except TargetError as exc:
                details["write"] = "denied" if exc.code == "target_permission_denied" else "error"
        denied = [k for k in ("list", "read", "write") if details.get(k) not in ("ok", "unknown")]
        if denied:
            return Health(
                False, f"AWS Secrets Manager denies backend {self.name!r}: {', '.join(denied)}.", details,
                problem="permission_missing",
            )
        probed = ", ".join(k for k in ("list", "read", "write") if details.get(k) == "ok")
        return Health(True, f"AWS Secrets Manager answers in {self.config.region} and permits {probed}.", details)
