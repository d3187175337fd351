"""The SecretBackend protocol: what a store of long-lived secret material offers.

A backend is a named mount of one backend *type* (``local``, and later
``vault``, ``aws``, ``gcp``, ``azure``). The gateway validates paths and
authorises the caller before it calls a backend; a backend only stores and
fetches. Contract for implementers:

- ``path`` is already validated: segments of ``[A-Za-z0-9._-]`` joined by
  ``/``, no ``.``/``..``, no empty segment.
- A secret is a map of string keys to string values with integer versions
  starting at 1. ``put`` writes a new version and returns its metadata.
- Errors are raised as :mod:`gateway.errors` classes with a stable code
  (``secret_not_found``, ``secret_deleted``, ``version_not_found``,
  ``backend_unavailable``...). A vendor SDK's exception is translated inside
  the backend's module and never chained into a message: its text can quote
  a request, a token or a value.
- ``SecretValue`` never prints its data (``repr`` is redacted), so a value
  can't reach a log line by accident.
- ``check`` reports reachability and permissions without revealing anything.
- Every method is safe to call concurrently; ``aclose`` releases clients.

A backend class is constructed by the registry as ``cls(name, config, context)``
where ``config`` is an instance of ``cls.config_model`` and ``context`` is a
:class:`BackendContext`. Vendor SDK imports stay inside the backend's module.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, ClassVar, Protocol, runtime_checkable

from pydantic import BaseModel

if TYPE_CHECKING:
    from gateway.store.cache import Cache
    from gateway.crypto.envelope import Envelope
    from gateway.store import Store


@dataclass(frozen=True)
class BackendContext:
    """What the gateway lends a backend: its store, its envelope cipher, and a
    metadata cache keyed by ``(backend name, path)``.

    Only a backend whose every write goes through the gateway (``local``) may
    use the cache: it drops an entry on every replica by noting the change
    (``gateway.store.changes.note(session, "secret", "backend/path")``) in the write's
    transaction. A backend that can change behind the gateway's back (a vendor
    secret manager) must not cache.
    """

    store: Store
    envelope: Envelope
    metadata_cache: Cache[tuple[str, str], SecretMetadata] | None = None


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
    ok: bool
    message: str
    details: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Page:
    items: list[str]
    next_after: str | None  # pass back as ``after`` for the next page


@runtime_checkable
class SecretBackend(Protocol):
    type: ClassVar[str]
    config_model: ClassVar[type[BaseModel]]
    name: str

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
        """Reachability and permissions, never values."""
        ...

    async def aclose(self) -> None: ...
