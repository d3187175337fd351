"""The ``local`` backend: credgate's own encrypted store.

Each version is a JSON map sealed with a fresh data key (see
:mod:`gateway.crypto.envelope`) under the context ``("secret", backend, path,
version)``; only key names and timestamps are kept in clear.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping
from typing import ClassVar

from pydantic import BaseModel, ConfigDict
from sqlalchemy import func, select
from sqlalchemy.orm import selectinload

from backends.base import BackendBase, BackendCapabilities, BackendContext, Health, Page, SecretMetadata, SecretValue, VersionInfo
from gateway.store import changes
from gateway.errors import Conflict, NotFound
from gateway.store.database import insert_if_absent
from gateway.store.models import SecretRow, SecretVersionRow, utcnow
from gateway.store.sealed import Sealed, secret_context


class LocalConfig(BaseModel):
    """The local backend has nothing to configure: its secrets live in the gateway's store."""

    model_config = ConfigDict(extra="forbid")




def _size(sealed: Sealed) -> int:
    return len(sealed.wrapped_dek) + len(sealed.ciphertext)


class _SealedCache:
    """The sealed (still encrypted) values of recently read versions, so a read costs no store
    round trip. An entry belongs to the metadata object it was read under: the metadata cache drops
    that object on any change to the secret (a write, delete, destroy, here or on another replica,
    through the change feed), and an entry whose metadata is no longer the cached one is read again.
    Bounded in bytes; a value larger than ``max_value`` is never kept. Each read still opens the
    value under the KEK: nothing is kept in clear."""

    def __init__(self, budget: int = 16 * 1024 * 1024, max_value: int = 64 * 1024) -> None:
        self._entries: OrderedDict[tuple[str, int], tuple[SecretMetadata, Sealed]] = OrderedDict()
        self._budget = budget
        self._max_value = max_value
        self._bytes = 0

    def get(self, path: str, version: int, meta: SecretMetadata) -> Sealed | None:
        entry = self._entries.get((path, version))
        if entry is None or entry[0] is not meta:
            return None
        self._entries.move_to_end((path, version))
        return entry[1]

    def drop(self, path: str, version: int) -> None:
        old = self._entries.pop((path, version), None)
        if old is not None:
            self._bytes -= _size(old[1])

    def put(self, path: str, version: int, meta: SecretMetadata, sealed: Sealed) -> None:
        if _size(sealed) > self._max_value:
            return
        self.drop(path, version)
        self._entries[(path, version)] = (meta, sealed)
        self._bytes += _size(sealed)
        while self._bytes > self._budget:
            _, (_, dropped) = self._entries.popitem(last=False)
            self._bytes -= _size(dropped)


class LocalBackend(BackendBase):
    type: ClassVar[str] = "local"
    config_model: ClassVar[type[BaseModel]] = LocalConfig
    # Every write goes through the gateway, so its metadata may be cached.
    capabilities: ClassVar[BackendCapabilities] = BackendCapabilities(
        versions=True, soft_delete=True, check_and_set=True, cacheable=True, read_only=False,
        max_value_bytes=512 * 1024,  # half the default request body limit, so escaped JSON fits
    )

    def __init__(self, name: str, config: LocalConfig, context: BackendContext) -> None:
        super().__init__(name, config, context)
        self._store = context.store
        self._envelope = context.envelope
        self._cache = context.metadata_cache
        self._sealed = _SealedCache()

    def _ref(self, path: str) -> str:
        return f"{self.name}/{path}"

    async def _row(self, session, path: str, *, with_versions: bool = False, lock: bool = False) -> SecretRow | None:
        q = select(SecretRow).where(SecretRow.backend == self.name, SecretRow.path == path)
        if with_versions:
            q = q.options(selectinload(SecretRow.versions))
        if lock:
            q = q.with_for_update()
        return (await session.execute(q)).scalar_one_or_none()

    def _live(self, row: SecretRow | None, path: str) -> SecretRow:
        if row is None:
            raise NotFound(f"Secret {self._ref(path)} does not exist.", code="secret_not_found")
        if row.deleted_at is not None:
            raise NotFound(
                f"Secret {self._ref(path)} is deleted; restore it with `credgate secret restore {self._ref(path)}`.",
                code="secret_deleted",
            )
        return row

    def _metadata(self, row: SecretRow) -> SecretMetadata:
        current = next((v for v in row.versions if v.version == row.current_version), None)
        return SecretMetadata(
            backend=self.name,
            path=row.path,
            current_version=row.current_version,
            keys=list(current.keys) if current else [],
            created_at=row.created_at,
            updated_at=row.updated_at,
            deleted_at=row.deleted_at,
            versions=[VersionInfo(v.version, list(v.keys), v.created_at, v.created_by) for v in row.versions],
        )

    async def get(self, path: str, version: int | None = None) -> SecretValue:
        if self._cache is None:
            row_version, sealed = await self._load_sealed(path, version)
        else:
            # The metadata (cached, kept honest by the change feed) says whether the secret is live
            # and which version is current; the sealed value is kept beside it (:class:`_SealedCache`).
            meta = await self.metadata(path)
            row_version = version if version is not None else meta.current_version
            sealed = self._sealed.get(path, row_version, meta)
            if sealed is not None:
                try:
                    return self._open(path, row_version, sealed)
                except Exception:  # noqa: BLE001 - e.g. re-wrapped since under a KEK version now gone: read again
                    self._sealed.drop(path, row_version)
            row_version, sealed = await self._load_sealed(path, row_version)
            self._sealed.put(path, row_version, meta, sealed)
        return self._open(path, row_version, sealed)

    def _open(self, path: str, version: int, sealed: Sealed) -> SecretValue:
        plaintext = self._envelope.open(sealed, secret_context(self.name, path, version))
        return SecretValue(path, version, json.loads(plaintext))

    async def _load_sealed(self, path: str, version: int | None) -> tuple[int, Sealed]:
        async with self._store.read() as s:
            row = self._live(await self._row(s, path), path)
            want = version if version is not None else row.current_version
            ver = (
                await s.execute(
                    select(SecretVersionRow).where(
                        SecretVersionRow.secret_id == row.id, SecretVersionRow.version == want
                    )
                )
            ).scalar_one_or_none()
        if ver is None or ver.sealed is None:
            raise NotFound(f"Secret {self._ref(path)} has no version {want}.", code="version_not_found")
        return want, ver.sealed

    async def metadata(self, path: str) -> SecretMetadata:
        if self._cache is None:
            return await self._load_metadata(path)
        return await self._cache.get((self.name, path), lambda: self._load_metadata(path))

    async def _load_metadata(self, path: str) -> SecretMetadata:
        async with self._store.read() as s:
            return self._metadata(self._live(await self._row(s, path, with_versions=True), path))

    async def _changed(self, session, path: str) -> None:
        await changes.note(session, "secret", self._ref(path))

    async def put(
        self, path: str, data: Mapping[str, str], *, author: str, cas: int | None = None
    ) -> SecretMetadata:
        plaintext = json.dumps(dict(data), separators=(",", ":"), sort_keys=True).encode()
        now = utcnow()
        async with self._store.write() as s:
            # Create-if-absent first, then lock: two first writers of a path queue here.
            await s.execute(
                insert_if_absent(
                    self._store.dialect,
                    SecretRow,
                    dict(backend=self.name, path=path, current_version=0, created_at=now, updated_at=now),
                    ["backend", "path"],
                )
            )
            row = await self._row(s, path, with_versions=True, lock=True)
            assert row is not None
            if cas is not None and cas != row.current_version:
                raise Conflict(
                    f"Secret {self._ref(path)} is at version {row.current_version}, not {cas}.",
                    code="cas_mismatch",
                )
            version = row.current_version + 1
            ver = SecretVersionRow(version=version, keys=sorted(data), created_at=now, created_by=author)
            ver.sealed = self._envelope.seal(plaintext, secret_context(self.name, path, version))
            row.versions.append(ver)
            row.current_version = version
            row.updated_at = now
            row.deleted_at = None
            row.deleted_by = None
            await s.flush()
            await self._changed(s, path)
            return self._metadata(row)

    async def delete(self, path: str, *, author: str, destroy: bool = False) -> None:
        async with self._store.write() as s:
            row = await self._row(s, path, lock=True)
            if row is None:
                raise NotFound(f"Secret {self._ref(path)} does not exist.", code="secret_not_found")
            if destroy:
                await s.delete(row)
            elif row.deleted_at is None:
                row.deleted_at = utcnow()
                row.deleted_by = author
            await self._changed(s, path)

    async def restore(self, path: str) -> SecretMetadata:
        async with self._store.write() as s:
            row = await self._row(s, path, with_versions=True, lock=True)
            if row is None:
                raise NotFound(f"Secret {self._ref(path)} does not exist.", code="secret_not_found")
            row.deleted_at = None
            row.deleted_by = None
            await s.flush()
            await self._changed(s, path)
            return self._metadata(row)

    async def list(
        self, prefix: str = "", *, after: str | None = None, limit: int = 100, include_deleted: bool = False
    ) -> Page:
        q = select(SecretRow.path).where(SecretRow.backend == self.name)
        if prefix:
            q = q.where(SecretRow.path.startswith(prefix, autoescape=True))
        if after is not None:
            q = q.where(SecretRow.path > after)
        if not include_deleted:
            q = q.where(SecretRow.deleted_at.is_(None))
        q = q.order_by(SecretRow.path).limit(limit + 1)
        async with self._store.read() as s:
            paths = list((await s.execute(q)).scalars())
        more = len(paths) > limit
        paths = paths[:limit]
        return Page(paths, paths[-1] if more else None)

    async def count(self) -> int:
        async with self._store.read() as s:
            return (
                await s.execute(select(func.count()).select_from(SecretRow).where(SecretRow.backend == self.name))
            ).scalar_one()

    async def check(self) -> Health:
        await self._store.ping()
        return Health(True, "the gateway's own store is reachable", {"secrets": str(await self.count())})
