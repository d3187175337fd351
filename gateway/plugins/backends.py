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

Every backend is handed out wrapped in a :class:`Guarded`: the one place that puts a
deadline on each call (``CREDGATE_BACKEND_TIMEOUT_SECONDS``), answers a store that did
not answer as 503 ``backend_unavailable`` with ``Retry-After``, refuses a version larger
than the type's ``max_value_bytes`` before anything is sent (413 ``value_too_large``),
and reports an exception a backend failed to translate by its sanitised form only.
A backend that fails to start is not kept: the next call tries again, so a store that
comes back is used again without a restart.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import json
import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel, SecretStr
from sqlalchemy import select

from backends.base import BackendCapabilities, BackendContext, Health, Page, SecretBackend, SecretMetadata, SecretRef, SecretValue
from gateway.store import changes
from gateway import paths
from gateway.store.cache import Cache
from gateway.crypto.envelope import Envelope
from gateway.errors import (
    Conflict,
    CredgateError,
    NotFound,
    PayloadTooLarge,
    TargetError,
    TargetUnreachable,
    ValidationFailed,
    validate_model,
)
from gateway.audit import trail as audit
from gateway.identity.principal import Principal
from gateway.plugins.registry import BACKEND_TYPES, backend_class
from gateway.store import Store
from gateway.store.models import BackendRow, utcnow
from gateway.store.sealed import backend_config_context
from gateway.store.rows import read_or_404

BUILTIN = "local"  # the built-in mount's name
BUILTIN_TYPE = "local"  # and its type: the gateway's own store

log = logging.getLogger("credgate.backends")

# The mounts being started in this task: a backend whose configuration reads a credential
# from another backend (SecretRef) starts that one first; a cycle is refused, not awaited.
_starting: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("credgate_backends_starting", default=())


def value_size(data: Mapping[str, str]) -> int:
    """A version's size as ``max_value_bytes`` measures it: compact JSON, UTF-8 bytes."""
    return len(json.dumps(dict(data), separators=(",", ":"), ensure_ascii=False).encode())


class Guarded:
    """A live backend as the rest of the gateway sees it (see the module docstring).

    Implements :class:`backends.base.SecretBackend` by delegation; anything else (its
    ``context``, ``config``) is read from the backend itself.
    """

    def __init__(self, backend: SecretBackend, timeout: float) -> None:
        self.inner = backend
        self.name = backend.name
        self.type = backend.type
        self.config_model = backend.config_model
        self.capabilities: BackendCapabilities = type(backend).capabilities
        self._timeout = timeout

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.inner, attr)

    def __repr__(self) -> str:
        return f"Guarded({self.type}:{self.name})"

    def unavailable(self, why: str) -> TargetUnreachable:
        return TargetUnreachable(f"Backend {self.name!r} is unavailable: {why}", code="backend_unavailable")

    async def _call(self, doing: str, call: Awaitable[Any]) -> Any:
        try:
            # asyncio.timeout, not wait_for: no task of its own per call (a cached read is a few µs).
            async with asyncio.timeout(self._timeout):
                return await call
        except TimeoutError:
            raise self.unavailable(f"it did not answer within {self._timeout:g} s ({doing}).") from None
        except TargetUnreachable as exc:
            raise self.unavailable(exc.message) from None
        except CredgateError:
            raise
        except Exception as exc:  # a vendor error the backend did not translate: its sanitised form only
            safe = type(self.inner).sanitize(exc)
            log.warning("backend %s (%s) failed while %s: %s", self.name, self.type, doing, safe)
            raise TargetError(f"Backend {self.name!r} failed while {doing} ({safe}).", code="backend_error") from None

    @classmethod
    def sanitize(cls, exc: BaseException) -> str:  # the protocol's; the inner type's is used above
        from backends.base import generic_sanitize

        return generic_sanitize(exc)

    async def start(self) -> None:
        await self._call("starting", self.inner.start())

    async def aclose(self) -> None:
        try:
            await asyncio.wait_for(self.inner.aclose(), self._timeout)
        except Exception as exc:  # closing must not fail a replacement or a shutdown
            log.warning("backend %s did not close cleanly: %s", self.name, type(self.inner).sanitize(exc))

    def status(self) -> Health:
        try:
            return self.inner.status()
        except Exception as exc:
            return Health(False, f"status failed ({type(self.inner).sanitize(exc)})", problem="misconfigured")

    async def get(self, path: str, version: int | None = None) -> SecretValue:
        return await self._call("reading a secret", self.inner.get(path, version))

    async def metadata(self, path: str) -> SecretMetadata:
        return await self._call("reading a secret's metadata", self.inner.metadata(path))

    async def put(self, path: str, data: Mapping[str, str], *, author: str, cas: int | None = None) -> SecretMetadata:
        limit = self.capabilities.max_value_bytes
        size = value_size(data)
        if size > limit:
            raise PayloadTooLarge(
                f"The secret's data is {size} bytes as JSON; backend {self.name!r} (type {self.type}) "
                f"takes at most {limit}.",
                code="value_too_large",
                limit=limit,
            )
        return await self._call("writing a secret", self.inner.put(path, data, author=author, cas=cas))

    async def delete(self, path: str, *, author: str, destroy: bool = False) -> None:
        return await self._call("deleting a secret", self.inner.delete(path, author=author, destroy=destroy))

    async def restore(self, path: str) -> SecretMetadata:
        return await self._call("restoring a secret", self.inner.restore(path))

    async def list(
        self, prefix: str = "", *, after: str | None = None, limit: int = 100, include_deleted: bool = False
    ) -> Page:
        return await self._call(
            "listing secrets", self.inner.list(prefix, after=after, limit=limit, include_deleted=include_deleted)
        )

    async def count(self) -> int:
        return await self._call("counting secrets", self.inner.count())

    async def check(self) -> Health:
        """Health as data: an unreachable backend is a report, not an error."""
        try:
            return await self._call("checking", self.inner.check())
        except TargetUnreachable as exc:
            return Health(False, exc.message, {"code": exc.code}, problem="unreachable")
        except CredgateError as exc:
            problem = {"target_auth_failed": "auth_refused", "target_permission_denied": "permission_missing"}
            return Health(False, exc.message, {"code": exc.code}, problem=problem.get(exc.code, "misconfigured"))


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
    caps = backend.capabilities
    for need in needs:
        if need == "write":
            if caps.read_only:
                raise Conflict(f"Backend {backend.name!r} is read-only through credgate.", code="backend_read_only")
        elif not getattr(caps, need):
            raise Conflict(
                f"Backend {backend.name!r} (type {backend.type}) does not support {_UNSUPPORTED[need]}.",
                code="not_supported",
            )


def secret_refs(value: Any) -> Iterator[SecretRef]:
    """Every :class:`SecretRef` in a validated configuration (models, lists, dicts), depth first."""
    if isinstance(value, SecretRef):
        yield value
    elif isinstance(value, BaseModel):
        for field in type(value).model_fields:
            yield from secret_refs(getattr(value, field))
        for extra in (value.model_extra or {}).values():
            yield from secret_refs(extra)
    elif isinstance(value, dict):
        for item in value.values():
            yield from secret_refs(item)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            yield from secret_refs(item)


def _ref_dicts(value: Any) -> Iterator[dict[str, Any]]:
    """The SecretRefs in a stored (public) configuration: dicts of exactly backend, path, key."""
    if isinstance(value, dict):
        if set(value) == {"backend", "path", "key"}:
            yield value
        else:
            for item in value.values():
                yield from _ref_dicts(item)
    elif isinstance(value, list):
        for item in value:
            yield from _ref_dicts(item)


def _validate_config(type_name: str, config: dict[str, Any]) -> BaseModel:
    return validate_model(backend_class(type_name).config_model, config, f"{type_name} backend config", "config.")


class Mounts:
    def __init__(self, store: Store, envelope: Envelope, *, timeout: float = 10.0) -> None:
        self._store = store
        self._envelope = envelope
        self._timeout = timeout
        self._live: dict[str, tuple[datetime, Guarded]] = {}
        self._fresh: set[str] = set()  # live backends known current (cleared by the change feed)
        self._locks: dict[str, asyncio.Lock] = {}  # one per mount: a slow start holds up only its own
        self._feed = store.changes
        self.metadata: Cache[tuple[str, str], Any] = Cache("secret_metadata", self._feed, max_entries=50_000)
        self._feed.subscribe("backend", self._backend_changed)
        self._feed.subscribe("secret", self._secret_changed)
        # Set by the runtime: how many connectors draw on a backend.
        self.in_use_by: Callable[[str], Awaitable[int]] | None = None
        # "backend/path" of a SecretRef -> the live backends whose credentials it holds.
        self._credential_of: dict[str, set[str]] = {}
        self._closing: set[asyncio.Task[None]] = set()

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
            stale = {name for names in self._credential_of.values() for name in names}
        else:
            backend, _, path = ref.partition("/")
            self.metadata.invalidate((backend, path))
            stale = self._credential_of.get(ref, set())
        # A backend whose credentials live in this secret reads them again: rebuilt at next use.
        for name in list(stale):
            self._fresh.discard(name)
            live = self._live.pop(name, None)
            if live is not None:
                self._closing.add(task := asyncio.get_running_loop().create_task(live[1].aclose()))
                task.add_done_callback(self._closing.discard)

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

    async def read_ref(self, owner: str, ref: SecretRef) -> str:
        """One key of a secret in another backend, for ``owner``'s configuration."""
        if ref.backend == owner:
            raise ValidationFailed(f"Backend {owner!r} can't read its own credentials from itself.", code="backend_ref_cycle")
        value = await (await self.get(ref.backend)).get(paths.secret_path(ref.path))
        data = value.data
        if ref.key not in data:
            raise NotFound(
                f"Secret {ref.backend}/{ref.path} has no key {ref.key!r} (backend {owner!r} needs it).",
                code="secret_key_not_found",
            )
        return data[ref.key]

    def live(self) -> dict[str, Guarded]:
        """The backends started on this replica, by name (for ``/readyz``: their ``status()``)."""
        return {name: backend for name, (_, backend) in self._live.items()}

    async def get(self, name: str) -> Guarded:
        """The live backend for ``name``, rebuilt when its row changed (on any replica)."""
        cached = self._live.get(name)
        if cached and name in self._fresh and self._feed.serving:
            return cached[1]
        self._fresh.discard(name)
        generation = self.metadata.generation
        row = await self._row(paths.backend_name(name))
        cached = self._live.get(name)
        if cached and cached[0] == row.updated_at:
            self._mark_fresh(name, generation)
            return cached[1]
        starting = _starting.get()
        if name in starting:
            chain = " -> ".join((*starting, name))
            raise ValidationFailed(f"Backends read their credentials from each other in a cycle: {chain}.", code="backend_ref_cycle")
        async with self._locks.setdefault(name, asyncio.Lock()):
            cached = self._live.get(name)
            if cached and cached[0] == row.updated_at:
                return cached[1]
            cls = backend_class(row.type)
            raw = self._envelope.open(row.sealed, backend_config_context(name)) if row.sealed else b"{}"
            config = cls.config_model.model_validate(json.loads(raw))
            cache = self.metadata if cls.capabilities.cacheable else None

            async def read_ref(ref: SecretRef, _owner: str = name) -> str:
                return await self.read_ref(_owner, ref)

            backend = Guarded(cls(name, config, BackendContext(self._store, self._envelope, cache, read_ref)), self._timeout)
            token = _starting.set((*starting, name))
            try:
                await backend.start()  # a failure keeps nothing: the next call starts it again
            finally:
                _starting.reset(token)
            old = self._live.pop(name, None)
            self._live[name] = (row.updated_at, backend)
            for names in self._credential_of.values():
                names.discard(name)
            for ref in secret_refs(config):
                self._credential_of.setdefault(f"{ref.backend}/{ref.path}", set()).add(name)
            self._mark_fresh(name, generation)
        if old:
            await old[1].aclose()
        return backend

    def _mark_fresh(self, name: str, generation: int) -> None:
        # Not if a change was heard while the row was being read.
        if generation == self.metadata.generation and self._feed.live:
            self._fresh.add(name)

    def authorize_refs(self, principal: Principal, name: str, type_name: str, config: dict[str, Any]) -> None:
        """Whoever points a backend at a credential held in another backend must be allowed to
        reveal it (the backend will read it on their behalf); a backend can't hold its own."""
        model = _validate_config(type_name, config)
        for ref in secret_refs(model):
            if ref.backend == name:
                raise ValidationFailed(
                    f"Backend {name!r} can't read its own credentials from itself ({ref.backend}/{ref.path}); "
                    "keep them in another backend.",
                    code="backend_ref_cycle",
                )
            paths.backend_name(ref.backend)
            paths.secret_path(ref.path)
            principal.require("secrets:reveal", resource=f"{ref.backend}/{ref.path}")  # 403 and audited if not

    async def authorize_credential_change(self, principal: Principal, backend: str, path: str) -> None:
        """Changing (writing, deleting, restoring) a secret that holds another backend's
        credentials changes where that backend reads and writes: it needs ``backends:manage``,
        as replacing the backend's configuration does (403 and audited otherwise)."""
        ref = f"{backend}/{path}"
        holders = [
            info.name for info in await self.list()
            if any(f"{r.get('backend')}/{r.get('path')}" == ref for r in _ref_dicts(info.config))
        ]
        if holders:
            principal.require("backends:manage")
            audit.note(details={"credentials_of": holders[:20]})

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
                if await self._holds_secrets(name, row.type):
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

    async def _holds_secrets(self, name: str, type_name: str) -> int:
        """How many secrets removing (or retyping) mount ``name`` would orphan in the gateway's
        own store. Only ``local`` keeps its secrets there; a vendor store's secrets are the
        customer's and stay in it when the mount goes (and its store need not answer)."""
        if type_name != BUILTIN_TYPE:
            return 0
        return await (await self.get(name)).count()

    async def delete(self, name: str) -> None:
        row = await self._row(paths.backend_name(name))
        if row.builtin:
            raise Conflict(f"The built-in backend {name!r} can't be removed.", code="backend_builtin")
        in_use = await self._holds_secrets(name, row.type)
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
        """Reachability as data: an unreachable backend (or one that can't start) is a report, not an error."""
        try:
            backend = await self.get(name)
        except TargetUnreachable as exc:
            return Health(False, exc.message, {"code": exc.code}, problem="unreachable")
        except TargetError as exc:
            problem = {"target_auth_failed": "auth_refused", "target_permission_denied": "permission_missing"}
            return Health(False, exc.message, {"code": exc.code}, problem=problem.get(exc.code, "misconfigured"))
        return await backend.check()

    async def aclose(self) -> None:
        for _, backend in self._live.values():
            await backend.aclose()
        self._live.clear()



def backend_type_info(type_name: str) -> dict[str, Any]:
    """What ``GET /v1/backend-types`` says about one type (as ``type_info`` does for connector
    types): its configuration's JSON schema and capabilities, or why it is unavailable (its
    optional SDK is not installed)."""
    try:
        cls = backend_class(type_name)
    except CredgateError as exc:
        return {"type": type_name, "available": False, "reason": exc.message}
    return {
        "type": type_name,
        "available": True,
        "config_schema": cls.config_model.model_json_schema(),
        "capabilities": dataclasses.asdict(cls.capabilities),
    }


def all_backend_type_info() -> list[dict[str, Any]]:
    return [backend_type_info(t) for t in sorted(BACKEND_TYPES)]
