"""Mounts: the registered backends, by name, and their live client instances.

A backend's configuration is sealed in the store like any secret; a redacted
copy (``SecretStr`` fields masked) is kept for display.

A live backend is reused without reading its row while the change feed is
live; a change to the backend, made on any replica, marks it stale
(:mod:`gateway.store.changes`). The mounts also own the secret-metadata cache lent
to backends whose capabilities say ``cacheable`` (see :class:`backends.base.BackendContext`).

Lifecycle: a backend is built as ``cls(name, config, context)`` and its ``start()``
awaited before it serves; ``aclose()`` is awaited when it is replaced (its row
changed), removed, or at shutdown.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel, SecretStr
from sqlalchemy import select

from backends.base import BackendContext, Health, SecretBackend
from gateway.store import changes
from gateway import paths
from gateway.store.cache import Cache
from gateway.crypto.envelope import Envelope
from gateway.errors import Conflict, CredgateError, validate_model
from gateway.plugins.registry import backend_class
from gateway.store import Store
from gateway.store.models import BackendRow, utcnow
from gateway.store.sealed import backend_config_context
from gateway.store.rows import read_or_404

BUILTIN = "local"  # the built-in mount's name
BUILTIN_TYPE = "local"  # and its type: the gateway's own store


@dataclass(frozen=True)
class MountInfo:
    name: str
    type: str
    config: dict[str, Any]  # redacted
    builtin: bool
    created_at: datetime
    updated_at: datetime




def _reveal(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, dict):
        return {k: _reveal(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_reveal(v) for v in value]
    return value


_UNSUPPORTED = {
    "check_and_set": "check-and-set writes (cas)",
    "soft_delete": "soft delete and restore (destroy instead)",
    "versions": "reading an older version",
}


def require(backend: SecretBackend, *needs: str) -> None:
    """Refuse, before the backend is called, what its declared capabilities say it can't do:
    ``write`` on a ``read_only`` backend is 409 ``backend_read_only``; ``check_and_set``,
    ``soft_delete`` or ``versions`` it does not declare is 409 ``not_supported``."""
    caps = type(backend).capabilities
    for need in needs:
        if need == "write":
            if caps.read_only:
                raise Conflict(f"Backend {backend.name!r} is read-only through credgate.", code="backend_read_only")
        elif not getattr(caps, need):
            raise Conflict(
                f"Backend {backend.name!r} (type {backend.type}) does not support {_UNSUPPORTED[need]}.",
                code="not_supported",
            )


def _validate_config(type_name: str, config: dict[str, Any]) -> BaseModel:
    return validate_model(backend_class(type_name).config_model, config, f"{type_name} backend config", "config.")


class Mounts:
    def __init__(self, store: Store, envelope: Envelope) -> None:
        self._store = store
        self._envelope = envelope
        self._live: dict[str, tuple[datetime, SecretBackend]] = {}
        self._fresh: set[str] = set()  # live backends known current (cleared by the change feed)
        self._lock = asyncio.Lock()
        self._feed = store.changes
        self.metadata: Cache[tuple[str, str], Any] = Cache("secret_metadata", self._feed, max_entries=50_000)
        self._feed.subscribe("backend", self._backend_changed)
        self._feed.subscribe("secret", self._secret_changed)
        # Set by the runtime: how many connectors draw on a backend.
        self.in_use_by: Callable[[str], Awaitable[int]] | None = None

    def _backend_changed(self, name: str | None) -> None:
        if name is None:
            self._fresh.clear()
            self.metadata.invalidate()
        else:
            self._fresh.discard(name)
            self.metadata.invalidate_where(lambda key, _v: key[0] == name)

    def _secret_changed(self, ref: str | None) -> None:
        if ref is None:
            self.metadata.invalidate()
        else:
            backend, _, path = ref.partition("/")
            self.metadata.invalidate((backend, path))

    def _info(self, row: BackendRow) -> MountInfo:
        return MountInfo(row.name, row.type, dict(row.config_public), row.builtin, row.created_at, row.updated_at)

    async def ensure_builtin(self) -> None:
        async with self._store.write() as s:
            if await s.get(BackendRow, BUILTIN) is None:
                s.add(BackendRow(name=BUILTIN, type=BUILTIN_TYPE, config_public={}, builtin=True))

    async def list(self) -> list[MountInfo]:
        async with self._store.read() as s:
            rows = (await s.execute(select(BackendRow).order_by(BackendRow.name))).scalars()
            return [self._info(r) for r in rows]

    async def _row(self, name: str) -> BackendRow:
        return await read_or_404(self._store, BackendRow, name, "Backend", "backend_not_found")

    async def info(self, name: str) -> MountInfo:
        return self._info(await self._row(paths.backend_name(name)))

    async def get(self, name: str) -> SecretBackend:
        """The live backend for ``name``, rebuilt when its row changed (on any replica)."""
        cached = self._live.get(name)
        if cached and name in self._fresh and self._feed.live:
            return cached[1]
        self._fresh.discard(name)
        generation = self.metadata.generation
        row = await self._row(paths.backend_name(name))
        cached = self._live.get(name)
        if cached and cached[0] == row.updated_at:
            self._mark_fresh(name, generation)
            return cached[1]
        async with self._lock:
            cached = self._live.get(name)
            if cached and cached[0] == row.updated_at:
                return cached[1]
            cls = backend_class(row.type)
            raw = self._envelope.open(row.sealed, backend_config_context(name)) if row.sealed else b"{}"
            config = cls.config_model.model_validate(json.loads(raw))
            cache = self.metadata if cls.capabilities.cacheable else None
            backend = cls(name, config, BackendContext(self._store, self._envelope, cache))
            await backend.start()
            old = self._live.pop(name, None)
            self._live[name] = (row.updated_at, backend)
            self._mark_fresh(name, generation)
        if old:
            await old[1].aclose()
        return backend

    def _mark_fresh(self, name: str, generation: int) -> None:
        # Not if a change was heard while the row was being read.
        if generation == self.metadata.generation and self._feed.live:
            self._fresh.add(name)

    async def put(self, name: str, type_name: str, config: dict[str, Any]) -> tuple[MountInfo, bool]:
        """Create or replace a backend; returns (info, created)."""
        paths.backend_name(name)
        model = _validate_config(type_name, config)
        public = model.model_dump(mode="json")
        full = json.dumps(_reveal(model.model_dump(mode="python")), separators=(",", ":")).encode()
        created = False
        async with self._store.write() as s:
            row = await s.get(BackendRow, name, with_for_update=True)
            if row is None:
                row = BackendRow(name=name, type=type_name, builtin=False, created_at=utcnow())
                s.add(row)
                created = True
            elif row.type != type_name:
                if row.builtin:
                    raise Conflict(f"The built-in backend {name!r} can't change type.", code="backend_builtin")
                if await (await self.get(name)).count():
                    raise Conflict(
                        f"Backend {name!r} holds secrets; it can't change type from {row.type} to {type_name}.",
                        code="backend_in_use",
                    )
                row.type = type_name
            row.config_public = public
            row.sealed = self._envelope.seal(full, backend_config_context(name))
            row.updated_at = utcnow()
            await s.flush()
            await changes.note(s, "backend", name)
            info = self._info(row)
        return info, created

    async def delete(self, name: str) -> None:
        row = await self._row(paths.backend_name(name))
        if row.builtin:
            raise Conflict(f"The built-in backend {name!r} can't be removed.", code="backend_builtin")
        in_use = await (await self.get(name)).count()
        if in_use:
            raise Conflict(
                f"Backend {name!r} holds {in_use} secret(s); destroy them first.", code="backend_in_use"
            )
        connectors = await self.in_use_by(name) if self.in_use_by else 0
        if connectors:
            raise Conflict(
                f"Backend {name!r} is used by {connectors} connector(s); remove them first.", code="backend_in_use"
            )
        async with self._store.write() as s:
            row = await s.get(BackendRow, name, with_for_update=True)
            if row is not None:
                await s.delete(row)
                await changes.note(s, "backend", name)
        live = self._live.pop(name, None)
        if live:
            await live[1].aclose()

    async def check(self, name: str) -> Health:
        """Reachability as data: an unreachable backend is a report, not an error."""
        backend = await self.get(name)
        try:
            return await backend.check()
        except CredgateError as exc:
            return Health(False, exc.message, {"code": exc.code})
        except Exception as exc:  # vendor SDK errors: report the type only, never the text
            return Health(False, f"check failed ({type(exc).__name__})")

    async def aclose(self) -> None:
        for _, backend in self._live.values():
            await backend.aclose()
        self._live.clear()

