"""The ``gcp`` backend: secrets in Google Cloud Secret Manager (google-cloud-secret-manager,
REST transport).

Configuration (``PUT /v1/backends/NAME`` with ``{"type": "gcp", "config": {...}}``)::

    project                  "my-project"              the GCP project id (or number)
    name_prefix              "credgate-"               prepended to every secret id ("" = none)
    labels                   {"team": "a"}             added to every secret credgate creates
    adopt_prefixes           ["legacy/"]               credgate path prefixes under which secrets credgate did
                                                       not create may be read, written and destroyed (default: none)
    api_endpoint             "secretmanager.europe-west1.rep.googleapis.com", or "http://127.0.0.1:8085"
                                                       (default: Google's global endpoint; without a scheme: https)
    service_account_key_ref  {"backend": "local", "path": "gcp/sa", "key": "json"}
                                                       a service-account key file (JSON) held in another backend
    service_account_key      "<key file JSON>"         the key inline (a SecretStr: sealed at rest, shown
                                                       masked); a ref is preferred
    token_uri                "https://oauth2.example/token"   overrides the key's token_uri (auth_flow "token")
    auth_flow                "self_signed_jwt" | "token"
    ownership_cache_seconds  30                        how long a replica trusts an ownership check (0: every call)
    timeout_seconds          10                        each SDK call (connect and read)
    retries                  2                         extra attempts of an idempotent read that failed transiently

Auth
----
- Neither key field set: ambient credentials (``google.auth.default()``: the
  ``GOOGLE_APPLICATION_CREDENTIALS`` file, gcloud's application-default credentials, workload
  identity / the metadata server), resolved at ``start()``.
- A service-account key (ref or inline): read at ``start()`` (the ref through
  ``context.read_ref``). With ``auth_flow="self_signed_jwt"`` (the default, what Google's SDK
  does for service-account keys) each call carries a JWT signed with the key, audience
  ``https://secretmanager.googleapis.com/``; no token endpoint is called. With
  ``auth_flow="token"`` the key is exchanged at its ``token_uri`` (or the config's) for an
  OAuth2 access token (JWT-bearer grant, scope cloud-platform), refreshed by google-auth.
  Exactly one of the two key fields may be set.

Names: credgate paths -> GCP secret ids
---------------------------------------
A secret id allows ``[A-Za-z0-9_-]``, at most 255 characters; credgate paths also have ``.``
and ``/``. The id is ``name_prefix + encode(path)``, where ``encode`` escapes three
characters with ``_`` and leaves the rest as is::

    "_" -> "__"      "." -> "_d"      "/" -> "_s"

e.g. ``team-a/db.password`` -> ``team-a_sdb_dpassword``, ``a_b`` -> ``a__b``. It is
reversible (every ``_`` starts a two-character escape) and prefix-preserving (the ids of the
paths under a prefix all start with the prefix's encoding). Ids that do not decode to a
valid credgate path (e.g. the ``check()`` probe, which holds ``_c``) are never listed. A
path whose id would pass 255 characters is refused (422 ``path_too_long``): at worst an
encoded path is twice as long. Two mounts in one project must use name prefixes that are not
prefixes of one another.

Ownership
---------
Every secret credgate creates carries the label ``credgate-managed=true`` (plus ``labels``).
An existing secret without it is refused unless its path is under one of ``adopt_prefixes``
(as the ``aws`` backend does): ``get``, ``metadata`` and ``delete`` answer 404
``secret_not_owned`` (it does not exist for this mount; the code tells an administrator why),
``put`` 409 ``secret_not_owned`` (the name is taken), and ``list``/``count`` skip it. An
adopted secret is used as it is (credgate does not label it): a payload that is a JSON object
is its map (non-string values as their JSON text), any other text is ``{"value": <text>}``,
and a payload that is not UTF-8 is refused (422 ``unsupported_value``).

How the protocol maps onto Secret Manager
-----------------------------------------
- Values: each version's payload is the data as compact JSON (UTF-8), nothing around it.
- Versions: Secret Manager numbers versions 1, 2, 3... per secret; credgate uses those numbers
  as they are. ``put`` = ``addVersion`` (after ``create`` when the secret is new); it returns
  the number ``addVersion`` answered, so concurrent writers each get their own version and
  none is lost. The current version is the newest ENABLED one. A version that is DISABLED,
  DESTROYED or absent is ``version_not_found``. Only ENABLED versions are listed in
  ``metadata``; ``VersionInfo.keys`` is filled for the current version only (the others would
  cost one value read each) and ``created_by`` is None (Secret Manager keeps no author).
- Soft delete: Secret Manager has no secret-level soft delete, so ``capabilities.soft_delete``
  is False: the gateway answers 409 ``not_supported`` to a delete without destroy and to
  restore. ``destroy`` = ``DeleteSecret`` (every version, at once, with the etag read during
  the ownership check as a precondition).
- Check-and-set: ``addVersion`` has no precondition, so ``check_and_set`` is False (409
  ``not_supported`` from the gateway).
- Not cacheable: anyone with access to the project may change a secret.

Cost
----
Each replica remembers, per secret id, a passed ownership check (its label; the secret's
``createTime`` and etag) for ``ownership_cache_seconds`` (30 s; 10,000 ids), and the key names
of each version it has seen (a version's data never changes; keyed by the secret's
``createTime``, so a re-created secret is new). A remembered check is dropped on any 404 or
unreadable version, and by ``destroy``; ``destroy`` always checks afresh (its etag guards the
delete). So a secret re-created *without* the label by someone else is refused at most
``ownership_cache_seconds`` late (0 closes that window at one ``GetSecret`` per call; note that
anyone who can do that can also add versions to credgate's own secrets).

- ``get``: ``AccessSecretVersion`` (one call) while the ownership check is remembered;
  otherwise ``GetSecret`` and ``AccessSecretVersion`` in parallel (one round trip; the value
  is dropped unseen if the secret is not credgate's).
- ``metadata``: ``ListSecretVersions`` (plus ``GetSecret`` in parallel when not remembered),
  plus one access of the current version the first time its key names are needed.
  The API's read (metadata, then get) is thus two round trips once warm.
- ``put``: ``AddSecretVersion`` then ``ListSecretVersions`` (``GetSecret`` first when not
  remembered, ``CreateSecret`` the first time).
- ``list``: Secret Manager has no ordered prefix query (and the encoding does not keep
  lexical order), so every page lists all the mount's secrets under the prefix (server-side
  filter: the ownership label and ``name:<encoded prefix>``, 25,000 per page), decodes, sorts
  and slices: O(secrets under the prefix) per page, whatever ``limit`` is. ``count`` lists
  them all.

Size limit
----------
``max_value_bytes`` is 65,536: Secret Manager's payload limit is 64 KiB, and the payload is
the bare compact JSON the gateway measures.

Errors
------
- connection refused, DNS, TLS, timeouts (the SDK's and ``run_sync``'s), 503, 504, 429, and a
  token endpoint that did not answer -> :class:`TargetUnreachable` (the mounts: 503
  ``backend_unavailable`` + Retry-After).
- 401 UNAUTHENTICATED, a token endpoint refusing the key (``RefreshError``), a key that is not
  a service-account key, no ambient credentials -> ``TargetError(code="target_auth_failed")``.
- 403 PERMISSION_DENIED -> ``TargetError(code="target_permission_denied")``.
- 404 -> ``NotFound`` (``secret_not_found``, or ``version_not_found`` for a version).
- anything else -> ``TargetError(code="target_error")``.
Messages are the backend's own sentences plus at most :meth:`GCPSecretManagerBackend.sanitize`
(the exception's class, HTTP status and gRPC status name, never Google's text, which quotes
resource names and URLs).

Logs: the SDK logs each request and response *with its payload* (a value, base64) at DEBUG
(in the record's ``extra``), and google-auth its token exchanges; the backend holds those
loggers at INFO (``_QUIET_LOGGERS``) so no root or ``GOOGLE_SDK_PYTHON_LOGGING_SCOPE`` DEBUG
setting turns them on. urllib3's DEBUG lines name URLs (secret ids, i.e. paths), never values.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal

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

OWNER_LABEL = "credgate-managed"
OWNER_VALUE = "true"
CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"
MAX_ID = 255
PAGE_SIZE = 25_000  # Secret Manager's largest page
PROBE_SUFFIX = "_credgate-probe"  # "_c" is no escape: never a credgate path

_CACHE_ENTRIES = 10_000
# The SDK's DEBUG records carry request and response payloads (a value, base64) in their
# ``extra``, and google-auth's the token exchange: held at INFO, whatever the root level.
_QUIET_LOGGERS = (
    "google.cloud.secretmanager_v1.services.secret_manager_service.client",
    "google.cloud.secretmanager_v1.services.secret_manager_service.transports.rest",
    "google.auth.transport.requests",
    "google.oauth2._client",
)
_SEGMENT = re.compile(r"^[A-Za-z0-9._-]+$")
_ESCAPE = {"_": "__", ".": "_d", "/": "_s"}
_UNESCAPE = {"_": "_", "d": ".", "s": "/"}
_LABEL_KEY = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_LABEL_VALUE = re.compile(r"^[a-z0-9_-]{0,63}$")


def encode_path(path: str) -> str:
    """A credgate path (or prefix) as the tail of a secret id (see "Names" above)."""
    return "".join(_ESCAPE.get(c, c) for c in path)


def decode_id(text: str) -> str | None:
    """The inverse of :func:`encode_path`; None if ``text`` is not an encoding."""
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c == "_":
            if i + 1 >= len(text) or text[i + 1] not in _UNESCAPE:
                return None
            out.append(_UNESCAPE[text[i + 1]])
            i += 2
        elif c.isascii() and (c.isalnum() or c == "-"):
            out.append(c)
            i += 1
        else:
            return None
    return "".join(out)


def _valid_path(path: str) -> bool:
    return bool(path) and all(s not in (".", "..") and _SEGMENT.match(s) for s in path.split("/"))


@dataclass(frozen=True)
class _Owned:
    """What an ownership check learnt of a secret: when it was created (which incarnation) and its etag."""

    created_at: datetime
    etag: str


class GCPConfig(BaseModel):
    """See the module docstring."""

    model_config = ConfigDict(extra="forbid")

    project: str = Field(pattern=r"^([a-z][a-z0-9-]{4,28}[a-z0-9]|[0-9]{1,20})$")
    name_prefix: str = Field("", pattern=r"^[A-Za-z0-9_-]{0,100}$")
    labels: dict[str, str] = Field(default_factory=dict, max_length=63)
    adopt_prefixes: list[str] = Field(default_factory=list, max_length=50)
    api_endpoint: str | None = Field(None, min_length=1, max_length=512)
    service_account_key_ref: SecretRef | None = None
    service_account_key: SecretStr | None = None
    token_uri: str | None = Field(None, pattern=r"^https?://\S+$", max_length=512)
    auth_flow: Literal["self_signed_jwt", "token"] = "self_signed_jwt"
    ownership_cache_seconds: float = Field(30.0, ge=0, le=3600)
    timeout_seconds: float = Field(10.0, gt=0, le=120)
    retries: int = Field(2, ge=0, le=5)

    @field_validator("labels")
    @classmethod
    def _labels(cls, labels: dict[str, str]) -> dict[str, str]:
        for key, value in labels.items():
            if not _LABEL_KEY.match(key) or not _LABEL_VALUE.match(value):
                raise ValueError(
                    "label keys are 1-63 of a-z, 0-9, '_', '-' starting with a letter; values 0-63 of the same"
                )
            if key == OWNER_LABEL:
                raise ValueError(f"the label {OWNER_LABEL!r} is credgate's own")
        return labels

    @field_validator("adopt_prefixes")
    @classmethod
    def _adopt(cls, prefixes: list[str]) -> list[str]:
        for prefix in prefixes:
            if not _valid_path(prefix.rstrip("/")):
                raise ValueError("each adopt prefix is a credgate path prefix: segments of A-Z, a-z, 0-9, '.', '_', '-'")
        return prefixes

    @field_validator("service_account_key")
    @classmethod
    def _key(cls, key: SecretStr | None) -> SecretStr | None:
        if key is not None:
            try:
                _key_info(key.get_secret_value())
            except ValueError as exc:
                raise ValueError(str(exc)) from None
        return key

    @model_validator(mode="after")
    def _one_key(self) -> GCPConfig:
        if self.service_account_key_ref is not None and self.service_account_key is not None:
            raise ValueError("set service_account_key_ref or service_account_key, not both")
        if self.auth_flow == "token" and self.service_account_key_ref is None and self.service_account_key is None:
            raise ValueError('auth_flow "token" needs a service-account key (ambient credentials choose their own flow)')
        return self


def _key_info(text: str) -> dict[str, Any]:
    """Parse a service-account key file; ValueError (with a sentence of ours, never its content)."""
    try:
        info = json.loads(text)
    except ValueError:
        raise ValueError("the service-account key is not JSON") from None
    if not isinstance(info, dict) or info.get("type") != "service_account":
        raise ValueError('the service-account key is not a key file of type "service_account"')
    missing = [f for f in ("client_email", "private_key", "private_key_id", "token_uri") if not info.get(f)]
    if missing:
        raise ValueError(f"the service-account key lacks {', '.join(missing)}")
    return info


def _credentials(service_account: Any, info: dict[str, Any], scopes: list[str] | None) -> Any:
    try:
        return service_account.Credentials.from_service_account_info(info, scopes=scopes)
    except (ValueError, TypeError, KeyError):
        raise ValueError("the service-account key's private key can't be loaded") from None


_STATUS_NAMES = frozenset({
    "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
    "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
})


def _body_status(exc: Any) -> str | None:
    """The ``error.status`` of a REST error body, if it is one of Google's status names (a fixed
    vocabulary, so nothing of the message can come through)."""
    try:
        status = exc.response.json()["error"]["status"]
    except Exception:  # noqa: BLE001 - no response, not JSON, no such field
        return None
    return status if status in _STATUS_NAMES else None


def _parse_time(value: Any) -> datetime:
    """A proto-plus timestamp (a datetime subclass) or None, as an aware datetime."""
    if value is None:
        return datetime.fromtimestamp(0, UTC)
    if isinstance(value, datetime):  # DatetimeWithNanoseconds: made a plain datetime
        aware = value if value.tzinfo else value.replace(tzinfo=UTC)
        return datetime.fromtimestamp(aware.timestamp(), UTC)
    return datetime.fromtimestamp(0, UTC)


def _version_number(name: str) -> int:
    return int(name.rsplit("/", 1)[-1])


class GCPSecretManagerBackend(BackendBase):
    type: ClassVar[str] = "gcp"
    config_model: ClassVar[type[BaseModel]] = GCPConfig
    capabilities: ClassVar[BackendCapabilities] = BackendCapabilities(
        versions=True, soft_delete=False, check_and_set=False, cacheable=False, read_only=False,
        max_value_bytes=64 * 1024,
    )

    def __init__(self, name: str, config: GCPConfig, context: BackendContext) -> None:
        super().__init__(name, config, context)
        self._client: Any = None
        self._parent = f"projects/{config.project}"
        self._owners: OrderedDict[str, tuple[float, _Owned]] = OrderedDict()  # secret id -> (until, owner check)
        self._keys: OrderedDict[tuple[str, datetime, int], list[str]] = OrderedDict()  # a version's key names

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        info: dict[str, Any] | None = None
        if cfg.service_account_key_ref is not None:
            if self.context.read_ref is None:
                raise ValidationFailed("This gateway can't read credentials from another backend.", code="misconfigured")
            ref = cfg.service_account_key_ref
            text = await self.context.read_ref(ref)
            try:
                info = _key_info(text)
            except ValueError as exc:
                raise TargetError(
                    f"Backend {self.name!r}: the key at {ref.backend}/{ref.path} ({ref.key}) can't be used: {exc}.",
                    code="target_auth_failed",
                ) from None
        elif cfg.service_account_key is not None:
            info = _key_info(cfg.service_account_key.get_secret_value())
        try:
            self._client = await run_sync(self._build_client, info, timeout=cfg.timeout_seconds + 5, pool=f"backend:{self.name}")
        except Exception as exc:  # noqa: BLE001 - translated, never chained
            raise self._translate(exc, "loading its credentials") from None

    def _build_client(self, info: dict[str, Any] | None) -> Any:
        from google.api_core.client_options import ClientOptions
        from google.cloud.secretmanager_v1 import SecretManagerServiceClient

        for logger in _QUIET_LOGGERS:
            logging.getLogger(logger).setLevel(logging.INFO)
        cfg = self.config
        options = ClientOptions(api_endpoint=cfg.api_endpoint) if cfg.api_endpoint else None
        if info is None:
            return SecretManagerServiceClient(transport="rest", client_options=options)  # google.auth.default()
        from google.oauth2 import service_account

        if cfg.token_uri:
            info = {**info, "token_uri": cfg.token_uri}
        if cfg.auth_flow == "token":
            from google.cloud.secretmanager_v1.services.secret_manager_service.transports.rest import (
                SecretManagerServiceRestTransport,
            )

            creds = _credentials(service_account, info, [CLOUD_PLATFORM])
            transport = SecretManagerServiceRestTransport(
                host=cfg.api_endpoint or "secretmanager.googleapis.com", credentials=creds, always_use_jwt_access=False
            )
            return SecretManagerServiceClient(transport=transport)
        creds = _credentials(service_account, info, None)
        return SecretManagerServiceClient(transport="rest", credentials=creds, client_options=options)

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                client.transport.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                pass

    # --- errors -----------------------------------------------------------------------------

    @classmethod
    def sanitize(cls, exc: BaseException) -> str:
        """The exception's class, its HTTP status and gRPC status name: never Google's message."""
        try:
            from google.api_core import exceptions as gx
        except ImportError:  # pragma: no cover - the SDK is what raised it
            return generic_sanitize(exc)
        if isinstance(exc, gx.GoogleAPICallError):
            parts = [str(exc.code)] if isinstance(exc.code, int) else []
            status = getattr(exc.grpc_status_code, "name", None) or _body_status(exc)
            if status:
                parts.append(status)
            return f"{type(exc).__name__} ({' '.join(parts)})" if parts else type(exc).__name__
        return generic_sanitize(exc)

    def _translate(self, exc: BaseException, doing: str) -> CredgateError:
        """A Google/requests/google-auth exception as one of credgate's (message ours + sanitize)."""
        if isinstance(exc, CredgateError):
            return exc
        import requests
        from google.api_core import exceptions as gx
        from google.auth import exceptions as ga

        where = f"GCP Secret Manager (backend {self.name!r})"
        why = self.sanitize(exc)
        unreachable = (
            TimeoutError, ConnectionError, requests.exceptions.ConnectionError, requests.exceptions.Timeout,
            ga.TransportError, gx.ServiceUnavailable, gx.GatewayTimeout, gx.DeadlineExceeded, gx.TooManyRequests,
            gx.ResourceExhausted, gx.RetryError,
        )
        if isinstance(exc, unreachable):
            return TargetUnreachable(f"{where} did not answer while {doing} ({why}).")
        if isinstance(exc, (gx.Unauthorized, gx.Unauthenticated, ga.RefreshError, ga.DefaultCredentialsError)):
            return TargetError(f"{where} refused the backend's credentials while {doing} ({why}).", code="target_auth_failed")
        if isinstance(exc, ValueError) and "service-account key" in str(exc):
            return TargetError(f"{where}: {exc}.", code="target_auth_failed")
        if isinstance(exc, (gx.Forbidden, gx.PermissionDenied)):
            return TargetError(
                f"{where} denied the backend's service account permission while {doing} ({why}).",
                code="target_permission_denied",
            )
        return TargetError(f"{where} failed while {doing} ({why}).")

    def _transient(self, exc: BaseException) -> bool:
        import requests
        from google.api_core import exceptions as gx

        return isinstance(
            exc,
            (requests.exceptions.ConnectionError, gx.ServiceUnavailable, gx.TooManyRequests, gx.ResourceExhausted,
             gx.InternalServerError, gx.GatewayTimeout),
        )

    async def _call(self, doing: str, method: str, request: dict[str, Any], *, idempotent: bool = True,
                    passthrough: tuple[type[BaseException], ...] = ()) -> Any:
        """One SDK call, in a worker thread, with the SDK's own timeout, no SDK retry and at most
        ``retries`` more attempts for an idempotent call that failed transiently. Exceptions in
        ``passthrough`` are raised as they are (for the caller to interpret); the rest translated."""
        client = self._client
        if client is None:
            raise TargetUnreachable(f"Backend {self.name!r} is not started or was closed.")
        cfg = self.config
        attempts = 1 + (cfg.retries if idempotent else 0)

        def work() -> Any:
            fn = getattr(client, method)
            for attempt in range(attempts):
                try:
                    result = fn(request=request, timeout=cfg.timeout_seconds, retry=None)
                    return list(result) if method.startswith("list_") else result
                except Exception as exc:
                    if attempt + 1 >= attempts or not self._transient(exc):
                        raise
                time.sleep(min(0.1 * 2**attempt, 1.0))
            raise AssertionError("unreachable")

        budget = attempts * cfg.timeout_seconds + 2.0 * attempts + 1.0
        try:
            return await run_sync(work, timeout=budget, pool=f"backend:{self.name}")
        except passthrough:
            raise
        except Exception as exc:  # noqa: BLE001 - translated, never chained
            raise self._translate(exc, doing) from None

    # --- names ------------------------------------------------------------------------------

    def _ref(self, path: str) -> str:
        return f"{self.name}/{path}"

    def _secret_id(self, path: str) -> str:
        sid = self.config.name_prefix + encode_path(path)
        if len(sid) > MAX_ID:
            raise ValidationFailed(
                f"The path is too long for a GCP secret id on backend {self.name!r}: encoded with the name prefix it "
                f"takes {len(sid)} of at most {MAX_ID} characters ('_', '.' and '/' take two each).",
                code="path_too_long",
            )
        return sid

    def _secret_name(self, path: str) -> str:
        return f"{self._parent}/secrets/{self._secret_id(path)}"

    def _path_of(self, name: str) -> str | None:
        sid = name.rsplit("/", 1)[-1]
        prefix = self.config.name_prefix
        if not sid.startswith(prefix):
            return None
        path = decode_id(sid[len(prefix):])
        return path if path is not None and _valid_path(path) else None

    def _adopted(self, path: str) -> bool:
        return any(path.startswith(p) for p in self.config.adopt_prefixes)

    def _owned(self, secret: Any, path: str) -> bool:
        return dict(secret.labels).get(OWNER_LABEL) == OWNER_VALUE or self._adopted(path)

    def _not_owned(self, path: str, writing: bool) -> CredgateError:
        msg = (
            f"Secret {self._ref(path)} exists in GCP Secret Manager but was not created by credgate (no "
            f"{OWNER_LABEL} label); credgate leaves it alone unless the backend's adopt_prefixes cover it."
        )
        return Conflict(msg, code="secret_not_owned") if writing else NotFound(msg, code="secret_not_owned")

    def _missing(self, path: str) -> NotFound:
        return NotFound(f"Secret {self._ref(path)} does not exist.", code="secret_not_found")

    # --- what this replica remembers (see "Cost") ---------------------------------------------

    def _cached_owner(self, sid: str) -> _Owned | None:
        hit = self._owners.get(sid)
        if hit is None or hit[0] < time.monotonic():
            return None
        return hit[1]

    def _remember_owner(self, sid: str, owned: _Owned) -> None:
        ttl = self.config.ownership_cache_seconds
        if ttl > 0:
            self._owners[sid] = (time.monotonic() + ttl, owned)
            self._owners.move_to_end(sid)
            while len(self._owners) > _CACHE_ENTRIES:
                self._owners.popitem(last=False)

    def _forget_owner(self, sid: str) -> None:
        self._owners.pop(sid, None)

    def _remember_keys(self, sid: str, owned: _Owned, version: int, keys: list[str]) -> None:
        self._keys[(sid, owned.created_at, version)] = keys
        while len(self._keys) > _CACHE_ENTRIES:
            self._keys.popitem(last=False)

    async def _secret(self, path: str, doing: str, *, writing: bool = False) -> _Owned:
        """Read the Secret resource and check it is owned (or adopted): NotFound / Conflict otherwise."""
        from google.api_core import exceptions as gx

        sid = self._secret_id(path)
        try:
            secret = await self._call(doing, "get_secret", {"name": self._secret_name(path)}, passthrough=(gx.NotFound,))
        except gx.NotFound:
            self._forget_owner(sid)
            raise self._missing(path) from None
        if not self._owned(secret, path):
            self._forget_owner(sid)
            raise self._not_owned(path, writing)
        owned = _Owned(_parse_time(secret.create_time), secret.etag)
        self._remember_owner(sid, owned)
        return owned

    # --- values -----------------------------------------------------------------------------

    def _decode_payload(self, path: str, data: bytes) -> dict[str, str]:
        try:
            text = data.decode()
        except UnicodeDecodeError:
            raise ValidationFailed(
                f"Secret {self._ref(path)} holds binary data, which credgate can't read.", code="unsupported_value"
            ) from None
        try:
            value = json.loads(text)
        except ValueError:
            return {"value": text}
        if not isinstance(value, dict):
            return {"value": text}
        return {
            str(k): v if isinstance(v, str) else json.dumps(v, separators=(",", ":"), ensure_ascii=False)
            for k, v in value.items()
        }

    async def _gather(self, *calls: Any) -> list[Any]:
        """Run calls concurrently; every one finishes before the first error is raised."""
        results = await asyncio.gather(*calls, return_exceptions=True)
        return list(results)

    def _value(self, path: str, sid: str, owned: _Owned, access: Any) -> SecretValue:
        number = _version_number(access.name)
        data = self._decode_payload(path, access.payload.data)
        self._remember_keys(sid, owned, number, sorted(data))
        return SecretValue(path, number, data)

    async def get(self, path: str, version: int | None = None) -> SecretValue:
        from google.api_core import exceptions as gx

        unreadable = (gx.NotFound, gx.BadRequest, gx.FailedPrecondition)
        sid, name = self._secret_id(path), self._secret_name(path)
        ref = "latest" if version is None else str(version)
        request = {"name": f"{name}/versions/{ref}"}
        owned = self._cached_owner(sid)
        if owned is not None:  # the hot path: one call
            try:
                access = await self._call("reading a secret", "access_secret_version", request, passthrough=unreadable)
                return self._value(path, sid, owned, access)
            except unreadable:
                self._forget_owner(sid)  # look again: a missing secret and a missing version differ
        secret, access = await self._gather(
            self._secret(path, "reading a secret"),
            self._call("reading a secret", "access_secret_version", request, passthrough=unreadable),
        )
        if isinstance(secret, BaseException):
            raise secret  # the value read alongside, if any, is dropped unseen
        if isinstance(access, unreadable):
            if version is None and isinstance(access, gx.NotFound):
                raise NotFound(f"Secret {self._ref(path)} has no versions.", code="secret_not_found")
            want = "its latest version" if version is None else f"version {version}"
            raise NotFound(
                f"Secret {self._ref(path)} has no readable {want} (absent, disabled or destroyed).",
                code="version_not_found",
            )
        if isinstance(access, BaseException):
            raise access
        return self._value(path, sid, secret, access)

    async def _versions(self, path: str, doing: str) -> list[Any]:
        from google.api_core import exceptions as gx

        try:
            found = await self._call(
                doing, "list_secret_versions", {"parent": self._secret_name(path), "page_size": PAGE_SIZE},
                passthrough=(gx.NotFound,),
            )
        except gx.NotFound:
            self._forget_owner(self._secret_id(path))
            raise self._missing(path) from None
        from google.cloud.secretmanager_v1 import SecretVersion

        enabled = [v for v in found if v.state == SecretVersion.State.ENABLED]
        return sorted(enabled, key=lambda v: _version_number(v.name))

    def _metadata(self, path: str, owned: _Owned, versions: list[Any], current: int, keys: list[str]) -> SecretMetadata:
        infos = [
            VersionInfo(_version_number(v.name), keys if _version_number(v.name) == current else [],
                        _parse_time(v.create_time), None)
            for v in versions
        ]
        updated = next((i.created_at for i in infos if i.version == current), owned.created_at)
        return SecretMetadata(
            backend=self.name, path=path, current_version=current, keys=keys,
            created_at=owned.created_at, updated_at=updated, deleted_at=None, versions=infos,
        )

    async def metadata(self, path: str) -> SecretMetadata:
        from google.api_core import exceptions as gx

        sid = self._secret_id(path)
        owned = self._cached_owner(sid)
        if owned is not None:
            versions = await self._versions(path, "reading metadata")
        else:
            owned, versions = await self._gather(
                self._secret(path, "reading metadata"), self._versions(path, "reading metadata")
            )
            for result in (owned, versions):
                if isinstance(result, BaseException):
                    raise result
        if not versions:
            raise NotFound(f"Secret {self._ref(path)} has no enabled version.", code="secret_not_found")
        current = _version_number(versions[-1].name)
        keys = self._keys.get((sid, owned.created_at, current))
        if keys is None:
            try:
                access = await self._call(
                    "reading metadata", "access_secret_version", {"name": versions[-1].name},
                    passthrough=(gx.NotFound, gx.BadRequest, gx.FailedPrecondition),
                )
                keys = sorted(self._value(path, sid, owned, access).data)
            except (gx.NotFound, gx.BadRequest, gx.FailedPrecondition):
                keys = []  # disabled or destroyed between the two calls
        return self._metadata(path, owned, versions, current, keys)

    async def _owner_or_create(self, path: str) -> _Owned:
        from google.api_core import exceptions as gx

        try:
            return await self._secret(path, "writing a secret", writing=True)
        except NotFound as exc:
            if exc.code != "secret_not_found":
                raise
        body = {"replication": {"automatic": {}}, "labels": {**self.config.labels, OWNER_LABEL: OWNER_VALUE}}
        try:
            secret = await self._call(
                "creating a secret", "create_secret",
                {"parent": self._parent, "secret_id": self._secret_id(path), "secret": body},
                idempotent=False, passthrough=(gx.Conflict,),
            )
        except gx.Conflict:  # created meanwhile (another writer): check whose it is
            return await self._secret(path, "writing a secret", writing=True)
        owned = _Owned(_parse_time(secret.create_time), secret.etag)
        self._remember_owner(self._secret_id(path), owned)
        return owned

    async def put(
        self, path: str, data: Mapping[str, str], *, author: str, cas: int | None = None
    ) -> SecretMetadata:
        from google.api_core import exceptions as gx

        if cas is not None:
            raise Conflict(f"Backend {self.name!r} (type gcp) does not support check-and-set writes.", code="not_supported")
        sid, name = self._secret_id(path), self._secret_name(path)
        payload = json.dumps(dict(data), separators=(",", ":"), ensure_ascii=False, sort_keys=True).encode()
        owned = self._cached_owner(sid)
        for attempt in range(2):
            if owned is None:
                owned = await self._owner_or_create(path)
            try:
                added = await self._call(
                    "writing a secret", "add_secret_version", {"parent": name, "payload": {"data": payload}},
                    idempotent=False, passthrough=(gx.NotFound,),
                )
                break
            except gx.NotFound:  # destroyed since it was checked (or remembered): once more from the top
                self._forget_owner(sid)
                owned = None
                if attempt:
                    raise self._missing(path) from None
        assert owned is not None
        current = _version_number(added.name)
        self._remember_keys(sid, owned, current, sorted(data))
        versions = await self._versions(path, "writing a secret")
        if all(_version_number(v.name) != current for v in versions):
            versions = sorted([*versions, added], key=lambda v: _version_number(v.name))
        return self._metadata(path, owned, versions, current, sorted(data))

    async def delete(self, path: str, *, author: str, destroy: bool = False) -> None:
        from google.api_core import exceptions as gx

        if not destroy:  # (the gateway refuses this first; called directly, a missing secret is still 404)
            await self._secret(path, "deleting a secret")
            raise Conflict(
                f"Backend {self.name!r} (type gcp) does not support soft delete; destroy the secret instead.",
                code="not_supported",
            )
        sid = self._secret_id(path)
        for _ in range(3):
            owned = await self._secret(path, "destroying a secret")  # always fresh: its etag guards the delete
            self._forget_owner(sid)
            try:
                await self._call(
                    "destroying a secret", "delete_secret", {"name": self._secret_name(path), "etag": owned.etag},
                    passthrough=(gx.NotFound, gx.Conflict),
                )
                return
            except gx.NotFound:
                raise self._missing(path) from None
            except gx.Conflict:  # its etag changed since the ownership check: look again
                continue
        raise Conflict(f"Secret {self._ref(path)} kept changing while it was being destroyed; try again.", code="conflict")

    async def restore(self, path: str) -> SecretMetadata:
        await self._secret(path, "restoring a secret")
        raise Conflict(
            f"Backend {self.name!r} (type gcp) does not support soft delete and restore.", code="not_supported"
        )

    async def _all_paths(self, prefix: str, doing: str) -> list[str]:
        terms = [] if self.config.adopt_prefixes else [f"labels.{OWNER_LABEL}={OWNER_VALUE}"]
        encoded = self.config.name_prefix + encode_path(prefix)
        if encoded:
            terms.append(f"name:{encoded}")
        request = {"parent": self._parent, "page_size": PAGE_SIZE, "filter": " AND ".join(terms)}
        paths = []
        for secret in await self._call(doing, "list_secrets", request):
            path = self._path_of(secret.name)
            if path is not None and path.startswith(prefix) and self._owned(secret, path):
                paths.append(path)
        return sorted(paths)

    async def list(
        self, prefix: str = "", *, after: str | None = None, limit: int = 100, include_deleted: bool = False
    ) -> Page:
        paths = await self._all_paths(prefix, "listing secrets")
        if after is not None:
            paths = [p for p in paths if p > after]
        page = paths[:limit]
        return Page(page, page[-1] if len(paths) > limit else None)

    async def count(self) -> int:
        return len(await self._all_paths("", "counting secrets"))

    # --- health -----------------------------------------------------------------------------

    async def check(self) -> Health:
        """List (the mount's secrets), then read, write and destroy probed on a secret id that
        can't exist (``<name_prefix>_credgate-probe``): Secret Manager checks permissions before
        existence, so 404 means allowed and 403 denied, and nothing is created."""
        from google.api_core import exceptions as gx

        details: dict[str, str] = {}
        probe = f"{self._parent}/secrets/{self.config.name_prefix}{PROBE_SUFFIX}"
        steps: list[tuple[str, str, dict[str, Any]]] = [
            ("list", "list_secrets", {"parent": self._parent, "page_size": 1,
                                      "filter": f"labels.{OWNER_LABEL}={OWNER_VALUE}"}),
            ("read", "access_secret_version", {"name": f"{probe}/versions/latest"}),
            ("write", "add_secret_version", {"parent": probe, "payload": {"data": b"{}"}}),
            ("destroy", "delete_secret", {"name": probe}),
        ]
        for what, method, request in steps:
            try:
                await self._call(f"checking {what} permission", method, request, passthrough=(gx.NotFound,))
            except gx.NotFound:
                details[what] = "ok"
            except TargetUnreachable as exc:
                return Health(False, exc.message, {**details, what: "unreachable"}, problem="unreachable")
            except TargetError as exc:
                if exc.code == "target_auth_failed":
                    return Health(False, exc.message, {**details, "auth": "refused"}, problem="auth_refused")
                if exc.code != "target_permission_denied":
                    return Health(False, exc.message, {**details, what: "error"}, problem="misconfigured")
                details[what] = "denied"
            else:
                details[what] = "ok"
                if what == "read":  # someone created the probe id: never write to or delete it
                    details.update(write="unknown", destroy="unknown")
                    break
        denied = [k for k, v in details.items() if v == "denied"]
        if denied:
            return Health(
                False, f"GCP Secret Manager denies the backend's service account: {', '.join(denied)}.",
                details, problem="permission_missing",
            )
        return Health(True, "GCP Secret Manager is reachable; list, read, write and destroy are allowed.", details)
