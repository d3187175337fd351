"""The ``vault`` backend: secrets in a HashiCorp Vault or OpenBao KV version 2 engine (hvac).

Configuration (``PUT /v1/backends/NAME`` with ``{"type": "vault", "config": {...}}``)::

    url           "https://vault.example:8200"   (http or https)
    mount_point   "secret"                        the KV v2 engine's mount
    path_prefix   "team-a/"                       every credgate path lives under it ("" = the mount's root)
    namespace     "team-a"                        sent as X-Vault-Namespace (Enterprise / OpenBao 2.x)
    tls           {"ca_cert": "/etc/ssl/vault-ca.pem", "verify": true}
    timeout       10                              seconds, each HTTP call (connect and read)
    auth          exactly one of:
      {"token": {"token": "s.xxx", "expiry_warning_seconds": 300}}
      {"approle": {"role_id": "...", "secret_id_file": "/run/secrets/sid" | "secret_id_ref":
                   {"backend": "local", "path": "vault/approle", "key": "secret_id"}, "mount": "approle"}}
      {"kubernetes": {"role": "credgate", "token_file": "/var/run/secrets/kubernetes.io/serviceaccount/token",
                      "mount": "kubernetes"}}
      {"jwt": {"role": "credgate", "jwt_file": "/run/secrets/jwt", "mount": "jwt"}}

Auth
----
Whatever the method, the Vault token needs OpenBao/Vault's ``default`` policy (token
``lookup-self``/``renew-self`` and ``sys/capabilities-self``): a 403 is told apart by
looking the token up (it fails: expired or revoked; it works: a policy denial).

- ``token``: used as given. A background task (``start()``/``aclose()``) looks the token up
  and renews a renewable one at half its TTL. A token that can't be renewed (not renewable,
  or capped by its max TTL) and runs out within ``expiry_warning_seconds`` makes
  ``status()`` (and so ``/readyz``) and ``check()`` report ``problem="expiring"``.
- ``approle`` / ``kubernetes`` / ``jwt``: a login at the first call (lazy), and again when
  the Vault token is about to expire or Vault answers 403 and the token no longer looks
  itself up (expired or revoked). The secret id (from its file, or from another backend via
  ``context.read_ref``) and the service-account / JWT file are read afresh at each login,
  so a rotated file is picked up at the next login.

How the protocol maps onto KV v2
--------------------------------
- ``put`` is a KV v2 write; ``cas`` is KV v2's ``options.cas`` (``cas=0``: only if absent),
  so Vault serialises concurrent writers and no version is lost; the returned metadata's
  ``current_version`` is the version this write created. A 400 "check-and-set" is 409
  ``cas_mismatch``.
- ``delete`` is KV v2's "delete the latest version" (soft: ``deletion_time`` set);
  ``restore`` undeletes that version; ``destroy`` deletes the metadata and every version.
  A secret whose current version is deleted is ``secret_deleted``; a version Vault no longer
  has (destroyed, pruned past the engine's ``max_versions`` -- 10 by default --, missing) is
  ``version_not_found``.
- ``created_by``: Vault stores no author. After each write the backend records credgate's
  author in the secret's KV v2 ``custom_metadata`` as ``credgate-author-v<N>`` (one extra
  PATCH, best effort: without the ``patch`` capability on the metadata path, or past Vault's
  64-entry custom_metadata limit, it is skipped and ``created_by`` is None). Entries of
  versions older than the newest 32 are dropped as new ones are written.

Cost (Vault has no server-side query)
-------------------------------------
- ``metadata``: one metadata read, plus one read of each kept version whose key names the
  backend has not seen yet (a version's data never changes, so key names are remembered per
  ``(path, version, created_time)`` in the process; values are dropped at once). A secret
  written through this replica costs one call.
- ``get`` of the current version: one read; of a given version: that read plus a metadata
  read (to tell a soft-deleted secret from a deleted version).
- ``list``: Vault lists one folder at a time. The backend walks the folders under the
  prefix depth first in lexical order, skipping folders wholly before ``after`` and stopping
  after ``limit + 1`` paths: one LIST per folder visited, plus (unless ``include_deleted``)
  one metadata read per candidate path to leave out soft-deleted ones. ``count`` lists
  every folder under the prefix. Names that are not credgate paths are skipped.

Size limit
----------
``max_value_bytes`` is 128 KiB. Vault and OpenBao accept requests up to 32 MiB
(listener ``max_request_size``), but KV v2 keeps each version as one storage entry, and
integrated storage (raft) refuses entries over ``max_entry_size``, 1 MiB by default (Consul
storage, Vault only: 512 KiB). Vault re-encodes the data as JSON with Go's HTML-safe
escaping, where ``<``, ``>`` and ``&`` take 6 bytes each (control characters already count 6
in the gateway's measure): 128 KiB of the gateway's compact UTF-8 JSON stays under 1 MiB
stored even in that worst case. Measured on OpenBao 2.7 with raft: 128 KiB of ``<`` is
kept, 176 KiB of ``<`` is refused ("value being too large"); behind Consul, expect less.

Errors
------
- connection refused, DNS, TLS, timeouts -> :class:`TargetUnreachable` (the mounts: 503
  ``backend_unavailable`` + Retry-After); so are 5xx answers, a sealed or uninitialised
  server (503/501) and 429.
- 403 with a token that no longer looks itself up, or a failed login (400/403 from
  ``auth/*/login``), 401 -> ``TargetError(code="target_auth_failed")``.
- 403 with a live token -> ``TargetError(code="target_permission_denied")``.
- a credential file that can't be read, or a ``secret_id_ref`` that can't be read ->
  ``target_auth_failed`` (never a 404/422 about the caller's own path).
- anything else -> ``TargetError(code="target_error")``.
Reads and writes after a version is written never fail the write: recording the author and
reading the metadata back degrade (``created_by`` None, or only the new version listed).
``check()`` reports ``engine`` (``sys/internal/ui/mounts``: not KV v2, or no mount, is
``misconfigured``) and the ``list``/``read``/``write``/``delete`` capabilities of the token
under the prefix (``sys/capabilities-self``, nothing written).

Messages are the backend's own sentences plus at most :meth:`VaultBackend.sanitize`
(the hvac exception's class name and its HTTP status, never Vault's text).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

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
    VersionInfo,
    generic_sanitize,
    run_sync,
)

log = logging.getLogger("credgate.backends.vault")

_SEGMENT = re.compile(r"^[A-Za-z0-9._-]+$")
_AUTHOR_KEY = "credgate-author-v"
_AUTHORS_KEPT = 32
_KEYS_CACHE_MAX = 20_000
_DEFAULT_SA_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"

# hvac's exception classes by HTTP status (hvac.exceptions.VaultError.from_status).
_STATUS = {
    "InvalidRequest": 400, "Unauthorized": 401, "Forbidden": 403, "InvalidPath": 404,
    "UnsupportedOperation": 405, "PreconditionFailed": 412, "RateLimitExceeded": 429,
    "InternalServerError": 500, "VaultNotInitialized": 501, "BadGateway": 502, "VaultDown": 503,
}
_UNREACHABLE_STATUS = {429, 500, 501, 502, 503, 504}


def _segments_ok(value: str) -> bool:
    return all(_SEGMENT.match(s) and s not in (".", "..") for s in value.split("/"))


# --- configuration ----------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TLSConfig(_Model):
    """``ca_cert``: a PEM file of the CA(s) to trust; ``verify``: False turns verification off
    (tests only)."""

    ca_cert: str | None = Field(None, min_length=1, max_length=4096)
    verify: bool = True


class TokenAuth(_Model):
    token: SecretStr
    expiry_warning_seconds: int = Field(300, ge=1, le=86400)

    @field_validator("token")
    @classmethod
    def _not_empty(cls, v: SecretStr) -> SecretStr:
        if not v.get_secret_value().strip():
            raise ValueError("the token is empty")
        return v


class AppRoleAuth(_Model):
    role_id: str = Field(min_length=1, max_length=256)
    secret_id_file: str | None = Field(None, min_length=1, max_length=4096)
    secret_id_ref: SecretRef | None = None
    mount: str = Field("approle", min_length=1, max_length=128)

    @model_validator(mode="after")
    def _one_secret_id(self) -> AppRoleAuth:
        if (self.secret_id_file is None) == (self.secret_id_ref is None):
            raise ValueError("give exactly one of secret_id_file and secret_id_ref")
        return self


class KubernetesAuth(_Model):
    role: str = Field(min_length=1, max_length=256)
    token_file: str = Field(_DEFAULT_SA_TOKEN, min_length=1, max_length=4096)
    mount: str = Field("kubernetes", min_length=1, max_length=128)


class JWTAuth(_Model):
    role: str = Field(min_length=1, max_length=256)
    jwt_file: str = Field(min_length=1, max_length=4096)
    mount: str = Field("jwt", min_length=1, max_length=128)


class AuthConfig(_Model):
    """Exactly one auth method."""

    token: TokenAuth | None = None
    approle: AppRoleAuth | None = None
    kubernetes: KubernetesAuth | None = None
    jwt: JWTAuth | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> AuthConfig:
        given = [n for n in ("token", "approle", "kubernetes", "jwt") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one auth method: token, approle, kubernetes or jwt")
        return self

    @property
    def method(self) -> str:
        return next(n for n in ("token", "approle", "kubernetes", "jwt") if getattr(self, n) is not None)


class VaultConfig(_Model):
    """See the module docstring."""

    url: str = Field(min_length=1, max_length=2048)
    mount_point: str = Field("secret", min_length=1, max_length=256)
    path_prefix: str = Field("", max_length=256)
    namespace: str | None = Field(None, min_length=1, max_length=256)
    tls: TLSConfig = Field(default_factory=TLSConfig)
    timeout: float = Field(10.0, gt=0, le=300)
    auth: AuthConfig

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^https?://[^/\s?#]+(/[^\s?#]*)?$", v):
            raise ValueError("the url must be http(s)://host[:port]")
        return v.rstrip("/")

    @field_validator("mount_point")
    @classmethod
    def _mount(cls, v: str) -> str:
        v = v.strip("/")
        if not v or not _segments_ok(v):
            raise ValueError("the mount point is segments of A-Z a-z 0-9 . _ - joined by /")
        return v

    @field_validator("path_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        v = v.strip("/")
        if v and not _segments_ok(v):
            raise ValueError("the path prefix is segments of A-Z a-z 0-9 . _ - joined by /")
        return v + "/" if v else ""

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, v: str | None) -> str | None:
        if v is None:
            return v
        v = v.strip("/")
        if not v or not _segments_ok(v):
            raise ValueError("the namespace is segments of A-Z a-z 0-9 . _ - joined by /")
        return v


# --- helpers ------------------------------------------------------------------------


def _parse_time(value: str | None) -> datetime | None:
    """Vault's RFC 3339 times (nanoseconds) as aware datetimes; '' is None."""
    if not value:
        return None
    m = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)$", value)
    if not m:
        return None
    frac = (m.group(2) or ".0")[:7]
    tz = "+00:00" if m.group(3) == "Z" else m.group(3)
    return datetime.fromisoformat(m.group(1) + frac + tz)


def _deleted(entry: Mapping[str, Any], now: datetime) -> bool:
    when = _parse_time(entry.get("deletion_time"))
    return when is not None and when <= now


def _status_of(exc: BaseException) -> int | None:
    return _STATUS.get(type(exc).__name__)


class VaultBackend(BackendBase):
    type: ClassVar[str] = "vault"
    config_model: ClassVar[type[BaseModel]] = VaultConfig
    # Others can write to Vault behind the gateway's back: never cached.
    capabilities: ClassVar[BackendCapabilities] = BackendCapabilities(
        versions=True, soft_delete=True, check_and_set=True, cacheable=False, read_only=False,
        max_value_bytes=128 * 1024,  # see "Size limit" in the module docstring
    )

    def __init__(self, name: str, config: VaultConfig, context: BackendContext) -> None:
        super().__init__(name, config, context)
        self.config: VaultConfig = config
        self._client: Any = None
        self._token: str | None = None
        self._token_deadline: float | None = None  # monotonic; None: no expiry known
        self._login_lock = asyncio.Lock()
        self._keys: OrderedDict[tuple[str, int, str], list[str]] = OrderedDict()
        self._renewer: asyncio.Task[None] | None = None
        self._authors_denied = False  # set when Vault refuses the custom_metadata patch
        # What the renewer knows (token auth): for status(), without I/O.
        self._health = Health(True, "serving")

    # --- sanitising and translating -----------------------------------------------

    @classmethod
    def sanitize(cls, exc: BaseException) -> str:
        """The hvac exception's class name and HTTP status; a transport error's class name."""
        status = _status_of(exc)
        name = type(exc).__name__
        if status is not None:
            return f"{name} (HTTP {status})"
        if type(exc).__module__.startswith("hvac"):
            return name
        return generic_sanitize(exc)

    def _unreachable(self, exc: BaseException, doing: str) -> TargetUnreachable:
        return TargetUnreachable(
            f"Vault at {self.config.url} did not answer while {doing} ({self.sanitize(exc)}).",
            code="target_unreachable",
        )

    def _translate(self, exc: BaseException, doing: str) -> Exception:
        """An exception from hvac/requests as a gateway error (never Vault's text)."""
        import requests

        if isinstance(exc, (TimeoutError, asyncio.TimeoutError, requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
            return self._unreachable(exc, doing)
        if isinstance(exc, (requests.exceptions.SSLError, ConnectionError)):
            return self._unreachable(exc, doing)
        status = _status_of(exc)
        if status in _UNREACHABLE_STATUS:
            return self._unreachable(exc, doing)
        if status == 401:
            return TargetError(f"Vault refused the backend's credentials while {doing} ({self.sanitize(exc)}).", code="target_auth_failed")
        if status == 403:
            return TargetError(
                f"Vault denied permission while {doing} ({self.sanitize(exc)}); check the token's policies "
                f"for {self.config.mount_point}/data/{self.config.path_prefix}* and {self.config.mount_point}/metadata/{self.config.path_prefix}*.",
                code="target_permission_denied",
            )
        if isinstance(exc, requests.exceptions.RequestException):
            return self._unreachable(exc, doing)
        return TargetError(f"Vault failed while {doing} ({self.sanitize(exc)}).", code="target_error")

    # --- the client and logins ------------------------------------------------------

    def _make_client(self) -> Any:
        import hvac
        import requests
        from requests.adapters import HTTPAdapter

        session = requests.Session()
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=64)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        tls = self.config.tls
        verify: bool | str = tls.ca_cert if (tls.ca_cert and tls.verify) else tls.verify
        session.verify = verify  # hvac takes a given session's own verify, not its argument
        return hvac.Client(
            url=self.config.url, namespace=self.config.namespace, verify=verify,
            timeout=self.config.timeout, session=session,
        )

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = self._make_client()
            if self._token is not None:
                self._client.token = self._token
        return self._client

    def _read_file(self, path: str, what: str) -> str:
        try:
            value = Path(path).read_text().strip()
        except OSError as exc:
            raise TargetError(
                f"Backend {self.name!r} can't read its {what} file ({generic_sanitize(exc)}).", code="target_auth_failed"
            ) from None
        if not value:
            raise TargetError(f"Backend {self.name!r}: its {what} file is empty.", code="target_auth_failed")
        return value

    async def _login_material(self) -> tuple[str, str, dict[str, str]]:
        """(method, mount, parameters) for a login; reads files/references afresh."""
        auth = self.config.auth
        if auth.approle is not None:
            a = auth.approle
            if a.secret_id_file is not None:
                secret_id = self._read_file(a.secret_id_file, "AppRole secret id")
            else:
                ref = a.secret_id_ref
                assert ref is not None
                if self.context.read_ref is None:
                    raise TargetError(
                        f"Backend {self.name!r} reads its AppRole secret id from another backend, "
                        "but this gateway lends no reader.", code="target_auth_failed",
                    )
                try:
                    secret_id = await self.context.read_ref(ref)
                except TargetUnreachable:
                    raise
                except CredgateError as exc:
                    raise TargetError(
                        f"Backend {self.name!r} can't read its AppRole secret id from "
                        f"{ref.backend}/{ref.path} ({exc.code}).", code="target_auth_failed",
                    ) from None
            return "approle", a.mount, {"role_id": a.role_id, "secret_id": secret_id}
        if auth.kubernetes is not None:
            k = auth.kubernetes
            return "kubernetes", k.mount, {"role": k.role, "jwt": self._read_file(k.token_file, "service-account token")}
        assert auth.jwt is not None
        j = auth.jwt
        return "jwt", j.mount, {"role": j.role, "jwt": self._read_file(j.jwt_file, "JWT")}

    def _do_login(self, mount: str, params: dict[str, str]) -> dict[str, Any]:
        # A plain POST (same as hvac's approle/kubernetes/jwt login helpers), without
        # touching the shared client's token.
        return self.client.adapter.post(f"/v1/auth/{mount}/login", json=params)

    async def _login(self) -> None:
        method, mount, params = await self._login_material()
        try:
            result = await run_sync(self._do_login, mount, params, timeout=self.config.timeout, pool=f"backend:{self.name}")
        except Exception as exc:
            err = self._translate(exc, f"logging in ({method})")
            if _status_of(exc) in (400, 403):
                err = TargetError(
                    f"Vault refused the backend's {method} login ({self.sanitize(exc)}).", code="target_auth_failed"
                )
            if isinstance(err, TargetError) and not isinstance(err, TargetUnreachable):
                self._health = Health(False, err.message, problem="auth_refused")
            raise err from None
        auth = (result or {}).get("auth") or {}
        token = auth.get("client_token")
        if not token:
            raise TargetError(f"Vault's {method} login returned no token.", code="target_auth_failed")
        ttl = int(auth.get("lease_duration") or 0)
        self._token = token
        # log in again a little before the end: 10 % of the TTL, at most 30 s
        self._token_deadline = time.monotonic() + ttl - min(30.0, ttl * 0.1) if ttl > 0 else None
        self.client.token = token
        self._health = Health(True, "serving")
        log.info("backend %s logged in to Vault (%s, ttl %ss)", self.name, method, ttl)

    def _token_stale(self) -> bool:
        if self._token is None:
            return True
        if self._token_deadline is None:
            return False
        return time.monotonic() > self._token_deadline

    async def _ensure_token(self, *, force: bool = False, seen: str | None = None) -> None:
        if self.config.auth.token is not None:
            if self._token is None:
                self._token = self.config.auth.token.token.get_secret_value()
                self.client.token = self._token
            return
        async with self._login_lock:
            if force and self._token is not None and self._token != seen:
                return  # someone else logged in meanwhile
            if force or self._token_stale():
                await self._login()

    # --- calling Vault -------------------------------------------------------------

    async def _raw(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await run_sync(fn, *args, timeout=self.config.timeout, pool=f"backend:{self.name}")

    async def _token_alive(self) -> bool:
        try:
            await self._raw(self.client.auth.token.lookup_self)
            return True
        except Exception as exc:
            if _status_of(exc) in (401, 403):
                return False
            raise self._translate(exc, "looking up its token") from None

    async def _call(self, doing: str, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in a thread, logged in, with a 403 told apart (expired token: log in
        again once; live token: permission denied); errors translated."""
        await self._ensure_token()
        for attempt in (1, 2):
            seen = self._token
            try:
                return await self._raw(fn, *args)
            except Exception as exc:
                if _status_of(exc) not in (401, 403):
                    raise self._translate(exc, doing) from None
                if await self._token_alive():
                    raise self._translate(exc, doing) from None
                if self.config.auth.token is not None or attempt == 2:
                    raise TargetError(
                        f"Vault refused the backend's token while {doing} (expired or revoked).",
                        code="target_auth_failed",
                    ) from None
                await self._ensure_token(force=True, seen=seen)
        raise AssertionError("unreachable")

    def _full(self, path: str) -> str:
        return self.config.path_prefix + path

    def _ref(self, path: str) -> str:
        return f"{self.name}/{path}"

    @property
    def _kv(self) -> Any:
        return self.client.secrets.kv.v2

    # --- reading ---------------------------------------------------------------------

    def _read_meta_sync(self, full: str) -> dict[str, Any] | None:
        import hvac.exceptions

        try:
            return self._kv.read_secret_metadata(full, mount_point=self.config.mount_point)["data"]
        except hvac.exceptions.InvalidPath:
            return None

    def _read_version_sync(self, full: str, version: int | None) -> dict[str, Any] | None:
        import hvac.exceptions

        try:
            return self._kv.read_secret_version(
                full, version=version, mount_point=self.config.mount_point, raise_on_deleted_version=False
            )["data"]
        except hvac.exceptions.InvalidPath:
            return None

    async def _meta(self, path: str) -> dict[str, Any] | None:
        meta = await self._call("reading a secret's metadata", self._read_meta_sync, self._full(path))
        if meta is not None and not meta.get("versions"):
            return None  # metadata without any version: nothing credgate can show
        return meta

    def _live_meta(self, meta: dict[str, Any] | None, path: str) -> dict[str, Any]:
        if meta is None:
            raise NotFound(f"Secret {self._ref(path)} does not exist.", code="secret_not_found")
        current = (meta.get("versions") or {}).get(str(meta.get("current_version")), {})
        if _deleted(current, datetime.now(UTC)):
            raise NotFound(
                f"Secret {self._ref(path)} is deleted; restore it with `credgate secret restore {self._ref(path)}`.",
                code="secret_deleted",
            )
        return meta

    async def get(self, path: str, version: int | None = None) -> SecretValue:
        full = self._full(path)
        if version is not None:
            self._live_meta(await self._meta(path), path)
        got = await self._call("reading a secret", self._read_version_sync, full, version)
        data = (got or {}).get("data")
        meta = (got or {}).get("metadata") or {}
        if data is None:
            if version is None:
                # Current version unreadable: absent, deleted, or destroyed.
                self._live_meta(await self._meta(path), path)
            raise NotFound(
                f"Secret {self._ref(path)} has no version {version if version is not None else 'current'}.",
                code="version_not_found",
            )
        number = int(meta.get("version") or version or 0)
        values = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in data.items()}
        self._remember_keys(path, number, meta.get("created_time") or "", sorted(values))
        return SecretValue(path, number, values)

    def _remember_keys(self, path: str, version: int, created: str, keys: list[str]) -> None:
        self._keys[(path, version, created)] = keys
        self._keys.move_to_end((path, version, created))
        while len(self._keys) > _KEYS_CACHE_MAX:
            self._keys.popitem(last=False)

    async def _keys_of(self, path: str, version: int, created: str) -> list[str]:
        cached = self._keys.get((path, version, created))
        if cached is not None:
            return list(cached)
        got = await self._call("reading a version's key names", self._read_version_sync, self._full(path), version)
        data = (got or {}).get("data")
        meta = (got or {}).get("metadata") or {}
        if data is None:
            return []  # deleted or destroyed meanwhile: no key names to show
        keys = sorted(str(k) for k in data)
        del data
        if meta.get("created_time") == created:
            self._remember_keys(path, version, created, keys)
        return keys

    async def _to_metadata(self, path: str, meta: dict[str, Any], *, current: int | None = None) -> SecretMetadata:
        now = datetime.now(UTC)
        versions = meta.get("versions") or {}
        custom = meta.get("custom_metadata") or {}
        kept = sorted((int(n), v) for n, v in versions.items() if not v.get("destroyed"))
        limiter = asyncio.Semaphore(8)

        async def keys(n: int, entry: dict[str, Any]) -> list[str]:
            if _deleted(entry, now):
                return []
            async with limiter:
                return await self._keys_of(path, n, entry.get("created_time") or "")

        all_keys = await asyncio.gather(*(keys(n, e) for n, e in kept))
        infos = [
            VersionInfo(
                version=n,
                keys=k,
                created_at=_parse_time(e.get("created_time")) or now,
                created_by=custom.get(f"{_AUTHOR_KEY}{n}"),
            )
            for (n, e), k in zip(kept, all_keys)
        ]
        cur = current if current is not None else int(meta.get("current_version") or 0)
        cur_info = next((i for i in infos if i.version == cur), None)
        cur_entry = versions.get(str(cur), {})
        deletion = _parse_time(cur_entry.get("deletion_time"))
        return SecretMetadata(
            backend=self.name,
            path=path,
            current_version=cur,
            keys=list(cur_info.keys) if cur_info else [],
            created_at=_parse_time(meta.get("created_time")) or now,
            updated_at=_parse_time(meta.get("updated_time")) or now,
            deleted_at=deletion if deletion is not None and deletion <= now else None,
            versions=infos,
        )

    async def metadata(self, path: str) -> SecretMetadata:
        meta = self._live_meta(await self._meta(path), path)
        return await self._to_metadata(path, meta)

    # --- writing ---------------------------------------------------------------------

    def _write_sync(self, full: str, data: dict[str, str], cas: int | None) -> dict[str, Any]:
        return self._kv.create_or_update_secret(full, secret=data, cas=cas, mount_point=self.config.mount_point)["data"]

    def _patch_custom_sync(self, full: str, custom: dict[str, str | None]) -> None:
        self.client.adapter.request(
            "PATCH", f"/v1/{self.config.mount_point}/metadata/{full}",
            json={"custom_metadata": custom}, headers={"Content-Type": "application/merge-patch+json"},
        )

    async def _record_author(self, full: str, version: int, author: str) -> None:
        """Best effort: credgate's author of ``version`` in custom_metadata (see the docstring)."""
        if not author or len(author) > 512 or self._authors_denied:
            return
        custom: dict[str, str | None] = {f"{_AUTHOR_KEY}{version}": author}
        if version > _AUTHORS_KEPT:
            custom[f"{_AUTHOR_KEY}{version - _AUTHORS_KEPT}"] = None
        try:
            await self._call("recording the author", self._patch_custom_sync, full, custom)
        except TargetError as exc:  # the version is written: never fail the put for this
            if exc.code == "target_permission_denied":
                self._authors_denied = True  # no `patch` on the metadata path: stop asking
            log.info("backend %s: author of a version not recorded (%s)", self.name, exc.code)

    async def put(
        self, path: str, data: Mapping[str, str], *, author: str, cas: int | None = None
    ) -> SecretMetadata:
        import hvac.exceptions

        full = self._full(path)
        values = {str(k): str(v) for k, v in data.items()}
        await self._ensure_token()
        try:
            written = await self._call_raw_write(full, values, cas)
        except hvac.exceptions.InvalidRequest as exc:
            if cas is not None and any("check-and-set" in str(e) for e in (exc.errors or [])):
                raise Conflict(f"Secret {self._ref(path)} is not at version {cas}.", code="cas_mismatch") from None
            raise self._translate(exc, "writing a secret") from None
        version = int(written["version"])
        created = written.get("created_time") or ""
        self._remember_keys(path, version, created, sorted(values))
        await self._record_author(full, version, author)
        # The version is written: if the metadata can't be read now, answer with what the
        # write itself returned rather than an error that would invite a duplicate write.
        try:
            meta = await self._meta(path)
            if meta is not None:
                return await self._to_metadata(path, meta, current=version)
        except TargetError as exc:
            log.info("backend %s: metadata after a write unreadable (%s)", self.name, exc.code)
        when = _parse_time(created) or datetime.now(UTC)
        return SecretMetadata(
            backend=self.name, path=path, current_version=version, keys=sorted(values),
            created_at=when, updated_at=when, deleted_at=None,
            versions=[VersionInfo(version, sorted(values), when, author)],
        )

    async def _call_raw_write(self, full: str, values: dict[str, str], cas: int | None) -> dict[str, Any]:
        """The write, with a 400 passed through (check-and-set) and the rest as in _call."""
        import hvac.exceptions

        holder: dict[str, BaseException] = {}

        def write() -> dict[str, Any] | None:
            try:
                return self._write_sync(full, values, cas)
            except hvac.exceptions.InvalidRequest as exc:
                holder["bad"] = exc
                return None

        written = await self._call("writing a secret", write)
        if written is None:
            raise holder["bad"]
        return written

    async def delete(self, path: str, *, author: str, destroy: bool = False) -> None:
        full = self._full(path)
        meta = await self._meta(path)
        if meta is None:
            raise NotFound(f"Secret {self._ref(path)} does not exist.", code="secret_not_found")
        if destroy:
            await self._call(
                "destroying a secret", self._kv.delete_metadata_and_all_versions, full, self.config.mount_point
            )
            for key in [k for k in self._keys if k[0] == path]:
                self._keys.pop(key, None)
            return
        current = (meta.get("versions") or {}).get(str(meta.get("current_version")), {})
        if _deleted(current, datetime.now(UTC)):
            return  # already soft-deleted
        await self._call("deleting a secret", self._kv.delete_latest_version_of_secret, full, self.config.mount_point)

    async def restore(self, path: str) -> SecretMetadata:
        full = self._full(path)
        meta = await self._meta(path)
        if meta is None:
            raise NotFound(f"Secret {self._ref(path)} does not exist.", code="secret_not_found")
        current = int(meta.get("current_version") or 0)
        entry = (meta.get("versions") or {}).get(str(current), {})
        if entry.get("deletion_time"):
            await self._call(
                "restoring a secret", self._kv.undelete_secret_versions, full, [current], self.config.mount_point
            )
            meta = self._live_meta(await self._meta(path), path)
        return await self._to_metadata(path, meta)

    # --- listing -----------------------------------------------------------------------

    def _list_sync(self, folder: str) -> list[str]:
        import hvac.exceptions

        try:
            keys = self._kv.list_secrets(folder, mount_point=self.config.mount_point)["data"]["keys"]
        except hvac.exceptions.InvalidPath:
            return []
        return [str(k) for k in keys or []]

    async def _children(self, folder: str) -> list[str]:
        """Entries of ``folder`` (relative to the prefix, '' or ending in '/'), sorted, folders
        with a trailing '/', names that are not credgate segments dropped."""
        names = await self._call("listing secrets", self._list_sync, self.config.path_prefix + folder)
        out = []
        for n in names:
            base = n[:-1] if n.endswith("/") else n
            if _SEGMENT.match(base) and base not in (".", ".."):
                out.append(folder + n)
        return sorted(out)

    async def _walk_folder(self, folder: str, prefix: str, after: str | None) -> AsyncIterator[str]:
        """Every secret path under ``folder`` starting with ``prefix`` and after ``after``, in
        lexical order: depth first over sorted siblings (a folder's paths share its ``name/``
        prefix, so they sort as one block at the folder's place); folders wholly before
        ``after`` or outside ``prefix`` are not listed."""
        children = await self._children(folder)
        for child in children:
            if child.endswith("/"):
                inside = child.startswith(prefix) or prefix.startswith(child)
                later = after is None or child > after or after.startswith(child)
                if inside and later:
                    async for path in self._walk_folder(child, prefix, after):
                        yield path
            elif child.startswith(prefix) and (after is None or child > after):
                yield child

    async def _is_deleted(self, path: str) -> bool:
        meta = await self._meta(path)
        if meta is None:
            return True  # gone meanwhile
        current = (meta.get("versions") or {}).get(str(meta.get("current_version")), {})
        return _deleted(current, datetime.now(UTC)) or bool(current.get("destroyed"))

    async def list(
        self, prefix: str = "", *, after: str | None = None, limit: int = 100, include_deleted: bool = False
    ) -> Page:
        found: list[str] = []
        batch: list[str] = []

        async def flush() -> None:
            if include_deleted:
                found.extend(batch)
            else:
                limiter = asyncio.Semaphore(8)

                async def gone(p: str) -> bool:
                    async with limiter:
                        return await self._is_deleted(p)

                flags = await asyncio.gather(*(gone(p) for p in batch))
                found.extend(p for p, f in zip(batch, flags) if not f)
            batch.clear()

        async for path in self._walk_folder(prefix[: prefix.rfind("/") + 1], prefix, after):
            batch.append(path)
            if len(found) + len(batch) > limit:
                await flush()
                if len(found) > limit:
                    break
        else:
            await flush()
        more = len(found) > limit
        items = found[:limit]
        return Page(items, items[-1] if more else None)

    async def count(self) -> int:
        n = 0
        async for _ in self._walk_folder("", "", None):
            n += 1
        return n

    # --- health ------------------------------------------------------------------------

    def _mount_info_sync(self, probe: str) -> tuple[str, str] | None:
        """(engine type, options.version) of the mount, from ``sys/internal/ui/mounts``
        (readable with any access under the mount; in the ``default`` policy)."""
        import hvac.exceptions

        try:
            data = self.client.adapter.get(f"/v1/sys/internal/ui/mounts/{self.config.mount_point}/{probe}")["data"]
        except (hvac.exceptions.InvalidPath, hvac.exceptions.InvalidRequest):
            return None
        return str(data.get("type") or ""), str((data.get("options") or {}).get("version") or "")

    def _capabilities_sync(self, paths: list[str]) -> dict[str, list[str]]:
        result = self.client.adapter.post("/v1/sys/capabilities-self", json={"paths": paths})
        data = result.get("data") or result
        return {p: list(data.get(p) or []) for p in paths}

    async def check(self) -> Health:
        details: dict[str, str] = {"auth_method": self.config.auth.method}
        try:
            await self._ensure_token()
            if not await self._token_alive():
                if self.config.auth.token is not None:
                    return Health(False, "Vault refused the backend's token.", details | {"auth": "refused"}, problem="auth_refused")
                await self._ensure_token(force=True, seen=self._token)
        except TargetUnreachable as exc:
            return Health(False, exc.message, details | {"reachable": "no"}, problem="unreachable")
        except TargetError as exc:
            problem = "auth_refused" if exc.code == "target_auth_failed" else "misconfigured"
            return Health(False, exc.message, details | {"auth": "refused"}, problem=problem)
        details |= {"reachable": "ok", "auth": "ok"}
        mount, prefix = self.config.mount_point, self.config.path_prefix
        try:
            engine = await self._call("reading the mount's type", self._mount_info_sync, f"{prefix}credgate-check-probe")
        except TargetUnreachable as exc:
            return Health(False, exc.message, details | {"reachable": "no"}, problem="unreachable")
        except TargetError:
            engine = None  # no access under the mount (or no such mount): the probes below say which
        if engine is not None:
            kind, version = engine
            details["engine"] = f"{kind} v{version}" if version else kind
            if kind != "kv" or version != "2":
                return Health(
                    False, f"The mount {mount}/ is not a KV version 2 engine ({details['engine']}).",
                    details, problem="misconfigured",
                )
        else:
            details["engine"] = "not visible"
        probe = f"{prefix}credgate-check-probe"
        paths = {
            "list": f"{mount}/metadata/{prefix}",
            "read": f"{mount}/data/{probe}",
            "write": f"{mount}/data/{probe}",
            "delete": f"{mount}/metadata/{probe}",
        }
        need = {"list": {"list"}, "read": {"read"}, "write": {"create", "update"}, "delete": {"delete"}}
        try:
            caps = await self._call("checking permissions", self._capabilities_sync, sorted(set(paths.values())))
        except TargetUnreachable as exc:
            return Health(False, exc.message, details | {"reachable": "no"}, problem="unreachable")
        except TargetError as exc:
            return Health(False, exc.message, details | {"permissions": "unknown"}, problem="permission_missing")
        missing = []
        for what, p in paths.items():
            have = set(caps.get(p, []))
            ok = "root" in have or (need[what] <= have and "deny" not in have)
            details[what] = "ok" if ok else "denied"
            if not ok:
                missing.append(what)
        if missing:
            return Health(
                False, f"Vault denies the backend {', '.join(missing)} under {mount}/{prefix}.",
                details, problem="permission_missing",
            )
        if engine is None:
            return Health(False, f"Vault shows no secrets engine at {mount}/.", details, problem="misconfigured")
        status = self.status()
        if not status.ok:
            return Health(False, status.message, details | status.details, problem=status.problem)
        return Health(True, f"Vault answers; list, read, write and delete allowed under {mount}/{prefix}.", details)

    def status(self) -> Health:
        return self._health

    # --- token renewal (token auth) ---------------------------------------------------

    async def start(self) -> None:
        if self.config.auth.token is not None and self._renewer is None:
            self._renewer = asyncio.create_task(self._renew_loop(), name=f"vault-renew-{self.name}")

    async def aclose(self) -> None:
        task, self._renewer = self._renewer, None
        if task is not None:
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        client, self._client = self._client, None
        if client is not None:
            try:
                client.adapter.close()
            except Exception:  # noqa: BLE001 - closing a session must not fail
                pass

    async def _renew_loop(self) -> None:
        """Look the token up; renew a renewable one at half its TTL; note one that can't
        be renewed and runs out within ``expiry_warning_seconds`` (``status()``)."""
        assert self.config.auth.token is not None
        warn = self.config.auth.token.expiry_warning_seconds
        await self._ensure_token()
        while True:
            try:
                info = (await self._raw(self.client.auth.token.lookup_self))["data"]
                ttl = int(info.get("ttl") or 0)
                renewable = bool(info.get("renewable"))
                if ttl <= 0:  # a token without expiry (root, or period-less with no TTL)
                    self._health = Health(True, "serving (the token does not expire)")
                    await asyncio.sleep(300)
                    continue
                if renewable:
                    await asyncio.sleep(max(ttl / 2, 0.2))
                    renewed = await self._raw(self.client.auth.token.renew_self)
                    new_ttl = int((renewed.get("auth") or {}).get("lease_duration") or 0)
                    if new_ttl < ttl and new_ttl <= warn:
                        self._set_expiring(new_ttl, "its renewal is capped by its max TTL")
                    else:
                        self._health = Health(True, "serving (token renewed)", {"token_ttl": str(new_ttl)})
                    continue
                if ttl <= warn:
                    self._set_expiring(ttl, "it is not renewable")
                else:
                    self._health = Health(True, "serving", {"token_ttl": str(ttl)})
                await asyncio.sleep(max(min(ttl - warn, 60), 0.5) if ttl > warn else max(min(ttl, 30), 0.5))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if _status_of(exc) in (401, 403):
                    self._health = Health(False, "Vault refuses the backend's token (expired or revoked).", problem="auth_refused")
                    await asyncio.sleep(30)
                else:
                    # unreachable or failing: keep the last knowledge, try again soon
                    log.info("backend %s: token lookup/renewal failed (%s)", self.name, self.sanitize(exc))
                    await asyncio.sleep(2)

    def _set_expiring(self, ttl: int, why: str) -> None:
        self._health = Health(
            False, f"The backend's Vault token expires in {ttl} s and {why}; give it a new token.",
            {"token_ttl": str(ttl)}, problem="expiring",
        )
