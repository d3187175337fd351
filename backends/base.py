"""The SecretBackend protocol: what a store of long-lived secret material offers.

This module is the whole contract a backend author needs: what the gateway
constructs and calls, what a backend declares, which errors it may raise, and
the helpers (:class:`BackendBase`, :func:`run_sync`) it may use.

A backend is a named mount of one backend *type* (``local``, and later
``vault``, ``aws``, ``gcp``, ``azure``). The gateway validates paths and
authorises the caller before it calls a backend; a backend only stores and
fetches.

Writing one
-----------

1. Subclass :class:`BackendBase` in ``backends/<type>.py``; declare ``type``,
   ``config_model`` (a pydantic model; ``SecretStr`` fields are sealed and shown
   masked) and ``capabilities`` (:class:`BackendCapabilities`).
2. Register it in ``gateway/plugins/registry.py`` (``BACKEND_TYPES``) with the
   pip extra that brings its SDK; ``tests/contract/test_protocols.py`` checks its
   shape and ``tests/contract/backend_suite.py`` its behaviour.
3. Implement the methods of :class:`SecretBackend`; override
   :meth:`BackendBase.sanitize` for your SDK's exceptions.

Construction and lifecycle
--------------------------

The gateway (:mod:`gateway.plugins.backends`, the mounts) builds a backend as
``cls(name, config, context)``: ``name`` the mount's name, ``config`` an
instance of ``cls.config_model`` (validated, secrets revealed), ``context`` a
:class:`BackendContext` (exactly: the gateway's ``store``, its ``envelope``
cipher, and ``metadata_cache``, which is None unless ``capabilities.cacheable``, and
``read_ref``, which reads a credential held in another backend: :class:`SecretRef`).
The constructor does no I/O. The mounts then await ``start()`` (begin
background work, open a client); when the mount's configuration changes or it
is removed, or at shutdown, they await ``aclose()``. Both default to no-ops in
:class:`BackendBase`. Calls may still be in flight on a backend being closed.

Contract
--------

- ``path`` is already validated: segments of ``[A-Za-z0-9._-]`` joined by
  ``/``, no ``.``/``..``, no empty segment.
- A secret is a map of string keys to string values with integer versions
  starting at 1. ``put`` writes a new version and returns its metadata.
- ``SecretValue`` never prints its data (``repr`` is redacted), so a value
  can't reach a log line by accident.
- ``check`` reports reachability and permissions without revealing anything.
- Every method is safe to call concurrently. Every call to a remote store has a
  timeout; a synchronous SDK runs through :func:`run_sync` with
  ``pool=f"backend:{self.name}"`` (a bounded thread pool of the mount's own, so a store
  that hangs can't starve anything else), never directly in a coroutine (it would block
  the event loop). Give the SDK its own connect/read timeouts and few retries too: the
  mounts' deadline ends the caller's wait, not the thread.
- Vendor SDKs log request and response bodies at DEBUG: hold those loggers above DEBUG
  in the backend's module (see ``backends/aws.py``, ``backends/gcp.py``), so a value can't
  reach a log at any level.
- Vendor SDK imports stay inside the backend's module (inside methods, so the
  type is listable without its SDK).

Errors a backend may raise (all from :mod:`gateway.errors`, re-exported here)
------------------------------------------------------------------------------

Anything else escaping a method is reported by its ``sanitize``d form only (502
``backend_error``). The codes in use, by class:

- :class:`NotFound` (404): ``secret_not_found`` (no such path), ``secret_deleted``
  (soft-deleted: ``get``/``metadata``), ``version_not_found`` (``get`` of a version that
  does not exist, was destroyed, disabled or pruned by the store), ``secret_not_owned``
  (the store holds a secret at that name that credgate did not create and may not adopt:
  aws, gcp, azure; reads and deletes look as if it were absent).
- :class:`Conflict` (409): ``cas_mismatch`` (``put`` with ``cas`` not equal to the
  current version), ``secret_not_owned`` (a ``put`` onto a name credgate does not own),
  ``foreign_version`` (the current version was written behind credgate's back in a shape
  it can't read), ``purge_forbidden`` (destroy where the store's purge protection
  forbids it), ``version_conflict``. What the capabilities say a type lacks is refused by
  the gateway before the backend is called (``backend_read_only``, ``not_supported``:
  :func:`gateway.plugins.backends.require`), and so is a value past ``max_value_bytes``
  (413 ``value_too_large``), so a backend need not check them again.
- :class:`ValidationFailed` (422): the configuration can't work (constructor, ``start``:
  ``invalid_certificate``, ``invalid_ca_bundle``), or a path can't be named in this store
  (``path_too_long``: the vendor's name limit once encoded) or a value can't be read as a
  map of strings (``unsupported_value``).
- :class:`TargetUnreachable` (503): the store did not answer (connection refused, DNS,
  TLS handshake, its own timeout, sealed, throttled: ``target_unreachable``,
  ``target_timeout``, ``target_throttled``, ``target_busy``). The mounts answer every one
  of these, and a call that outlives ``CREDGATE_BACKEND_TIMEOUT_SECONDS``, as 503
  ``backend_unavailable`` with ``Retry-After``; the gateway itself stays healthy.
- :class:`TargetError` (502): the store answered and failed: ``target_auth_failed`` (it
  refused the backend's credentials; a :class:`SecretRef` that can't be read is
  ``secret_ref_unavailable``), ``target_permission_denied``, ``target_quota_exceeded``,
  ``target_error``.

A vendor SDK's exception is translated inside the backend's module, with a
sentence of its own plus at most ``sanitize(exc)``, and never chained into a
message (raise ``from None``): its text can quote a request, a token or a value.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from connectors.base import generic_sanitize, run_sync
from gateway.errors import (  # the plugin-facing errors a backend raises (see "Errors" above)
    Conflict,
    CredgateError,
    NotFound,
    TargetError,
    TargetUnreachable,
    ValidationFailed,
)

if TYPE_CHECKING:
    from gateway.store.cache import Cache
    from gateway.crypto.envelope import Envelope
    from gateway.store import Store

__all__ = [
    "Conflict", "CredgateError", "NotFound", "TargetError", "TargetUnreachable", "ValidationFailed",
    "BackendBase", "BackendCapabilities", "BackendContext", "Health", "Page", "SecretBackend",
    "SecretMetadata", "SecretRef", "SecretValue", "VersionInfo", "generic_sanitize", "run_sync",
]


@dataclass(frozen=True)
class BackendCapabilities:
    """What a backend type can do, as data the gateway decides by (never by type name).

    - ``versions``: it keeps numbered versions (``get(path, version)``, metadata lists them).
    - ``soft_delete``: ``delete`` without ``destroy`` is recoverable with ``restore``.
    - ``check_and_set``: ``put(..., cas=N)`` is honoured atomically.
    - ``cacheable``: every write goes through the gateway (no one changes the store behind
      its back), so the mounts lend it ``context.metadata_cache``. A vendor secret manager
      that others can write to is not cacheable.
    - ``read_only``: the gateway only reads it; a write is refused before the backend is
      called (409 ``backend_read_only``), as is ``cas`` without ``check_and_set`` or a soft
      delete/restore without ``soft_delete`` (409 ``not_supported``).
    - ``max_value_bytes``: the largest version the store accepts, measured as the data's
      compact JSON (``json.dumps(data, separators=(",", ":"), ensure_ascii=False)``) in
      UTF-8 bytes, from the vendor's documented limit less what the backend adds around it.
      A larger ``put`` is refused by the gateway before the backend is called (413
      ``value_too_large``), so nothing is written.
    """

    versions: bool = True
    soft_delete: bool = True
    check_and_set: bool = True
    cacheable: bool = False
    read_only: bool = False
    max_value_bytes: int = 64 * 1024


class SecretRef(BaseModel):
    """A credential a backend's configuration keeps in *another* backend (an AppRole
    secret id, AWS keys, a GCP service-account key, an Azure client secret): one ``key``
    of the secret at ``backend``/``path``. Read with ``context.read_ref(ref)`` when needed
    (at ``start()`` or on re-authentication), never stored in the backend's own config.
    Whoever configures a backend with a reference must be allowed to reveal that secret
    (the API checks ``secrets:reveal`` on it), and a backend can't reference itself."""

    model_config = ConfigDict(extra="forbid")

    backend: str = Field(min_length=1, max_length=64)
    path: str = Field(min_length=1, max_length=512)
    key: str = Field(min_length=1, max_length=256)


@dataclass(frozen=True)
class BackendContext:
    """What the gateway lends a backend: its store, its envelope cipher, and a
    metadata cache keyed by ``(backend name, path)``.

    ``metadata_cache`` is given only to a backend whose ``capabilities.cacheable``
    is True (every write goes through the gateway): it drops an entry on every
    replica by noting the change
    (``gateway.store.changes.note(session, "secret", "backend/path")``) in the
    write's transaction.
    """

    store: Store
    envelope: Envelope
    metadata_cache: Cache[tuple[str, str], SecretMetadata] | None = None
    # Reads one key of a secret in another backend (see SecretRef); raises NotFound/TargetError.
    read_ref: Callable[[SecretRef], Awaitable[str]] | None = None


@dataclass(frozen=True)
class VersionInfo:
    version: int
    keys: list[str]
    created_at: datetime
    created_by: str | None


@dataclass(frozen=True)
class SecretMetadata:
    """Everything about a secret except its values."""

    backend: str
    path: str
    current_version: int
    keys: list[str]  # keys of the current version
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None
    versions: list[VersionInfo] = field(default_factory=list)


class SecretValue:
    """One version's data. ``repr`` and ``str`` never show the values."""

    __slots__ = ("path", "version", "_data")

    def __init__(self, path: str, version: int, data: Mapping[str, str]) -> None:
        self.path = path
        self.version = version
        self._data = dict(data)

    @property
    def data(self) -> dict[str, str]:
        return dict(self._data)

    def __repr__(self) -> str:
        return f"SecretValue(path={self.path!r}, version={self.version}, keys={sorted(self._data)})"

    __str__ = __repr__


@dataclass(frozen=True)
class Health:
    """A backend's health, as data (never a value, a token or a vendor message).

    ``problem`` names what is wrong when ``ok`` is False, one of:
    ``unreachable`` (no answer), ``auth_refused`` (the store refused the backend's
    credentials), ``permission_missing`` (authenticated, but list/read/write is denied:
    ``details`` says which, e.g. ``{"list": "ok", "read": "ok", "write": "denied"}``),
    ``expiring`` (its credentials run out soon and can't be renewed) or
    ``misconfigured``. ``check()`` probes list, read and write where it can without
    changing a secret a caller can see.
    """

    ok: bool
    message: str
    details: dict[str, str] = field(default_factory=dict)
    problem: str | None = None


@dataclass(frozen=True)
class Page:
    items: list[str]
    next_after: str | None  # pass back as ``after`` for the next page


@runtime_checkable
class SecretBackend(Protocol):
    type: ClassVar[str]
    config_model: ClassVar[type[BaseModel]]
    capabilities: ClassVar[BackendCapabilities]
    name: str

    def __init__(self, name: str, config: Any, context: BackendContext) -> None:
        """See "Construction and lifecycle" in the module docstring. No I/O."""
        ...

    async def start(self) -> None:
        """Begin background work, once, after construction (default: nothing)."""
        ...

    @classmethod
    def sanitize(cls, exc: BaseException) -> str:
        """What may be shown of an exception this type's SDK raised: its class name and a
        vendor error code, never its message."""
        ...

    async def get(self, path: str, version: int | None = None) -> SecretValue:
        """Return one version (default: current). Raises NotFound if absent or deleted."""
        ...

    async def metadata(self, path: str) -> SecretMetadata:
        """Keys, versions and timestamps, never values."""
        ...

    async def put(
        self, path: str, data: Mapping[str, str], *, author: str, cas: int | None = None
    ) -> SecretMetadata:
        """Write a new version; with ``cas``, only if the current version equals it (409 otherwise).
        Writing to a soft-deleted secret restores it with the new version."""
        ...

    async def delete(self, path: str, *, author: str, destroy: bool = False) -> None:
        """Soft-delete (recoverable with ``restore``), or destroy every version for good."""
        ...

    async def restore(self, path: str) -> SecretMetadata:
        """Undo a soft delete."""
        ...

    async def list(
        self, prefix: str = "", *, after: str | None = None, limit: int = 100, include_deleted: bool = False
    ) -> Page:
        """Paths starting with ``prefix`` in lexical order, after ``after``, at most ``limit``."""
        ...

    async def count(self) -> int:
        """How many secrets (deleted included) the backend holds through credgate."""
        ...

    async def check(self) -> Health:
        """Reachability and permissions, never values (see :class:`Health` for ``problem``)."""
        ...

    def status(self) -> Health:
        """What the backend's background work knows, without I/O (``/readyz`` asks every
        live backend): e.g. a non-renewable token that expires soon is
        ``Health(False, ..., problem="expiring")``. Default: ok."""
        ...

    async def aclose(self) -> None:
        """Stop background work and release clients (default: nothing)."""
        ...


class BackendBase:
    """The base every backend shares: the constructor (keeps ``name``, ``config`` and
    ``context``), the no-op lifecycle and the generic sanitizer. Subclasses call
    ``super().__init__`` and declare ``type``, ``config_model`` and ``capabilities``."""

    type: ClassVar[str]
    config_model: ClassVar[type[BaseModel]]
    capabilities: ClassVar[BackendCapabilities]

    def __init__(self, name: str, config: Any, context: BackendContext) -> None:
        self.name = name
        self.config = config
        self.context = context

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    def status(self) -> Health:
        return Health(True, "serving")

    @classmethod
    def sanitize(cls, exc: BaseException) -> str:
        """The generic fallback (:func:`generic_sanitize`); a backend with an SDK overrides it."""
        return generic_sanitize(exc)
