"""KEK rotation: add a KEK version, then re-wrap every data key under it.

The gateway converges on one rule: *every sealed record is wrapped under the
current KEK version*. Re-wrapping runs in the background in small committed
batches, so reads and writes go on while it works; it is resumable by
construction (what is left to do is whatever still references an older
version) and it resumes by itself at start-up. Only the wrapped data keys
change; payload ciphertexts are untouched.

A KEK version whose references have dropped to zero is marked retired; it
stays loadable (a backup of the store taken earlier still needs it) and
``credgate keys status`` says it may be removed from the KEK file.

With a KEK held by a KMS (:mod:`gateway.crypto.kmsring`) the key manager also *follows*
the KMS key (:meth:`KeyManager.start_following`): every ``kek_check_seconds`` it asks the
KMS for the key's version and, when it moved, rotates as above under the new KMS key
version; it picks up KEK versions other replicas made, and re-wraps what this replica
wrote under an older one.

Every table with sealed columns is listed in
:data:`gateway.store.sealed_tables.SEALED`; a new one must be added there, or rotation
would leave it behind (a test checks the list
against the models).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select

from gateway.crypto.envelope import Envelope
from gateway.crypto.keyring import KeyRing
from gateway.errors import ConfigurationError
from gateway.store import Store
from gateway.store.sealed_tables import SEALED
from gateway.store.models import KekVersion, utcnow
from gateway.tasks import cancel_and_wait

log = logging.getLogger("credgate.rotation")


@dataclass(frozen=True)
class KekVersionStatus:
    version: int
    state: str  # current | in_use | retired
    fingerprint: str
    references: int
    created_at: datetime
    retired_at: datetime | None


@dataclass(frozen=True)
class KeyStatus:
    source: str
    current_version: int
    rewrap_pending: int  # records not yet under the current version
    rotating: bool
    versions: list[KekVersionStatus]


class KeyManager:
    def __init__(self, store: Store, keyring: KeyRing, envelope: Envelope, *, batch_size: int = 200) -> None:
        self._store = store
        self._keyring = keyring
        self._envelope = envelope
        self._batch = batch_size
        self._task: asyncio.Task[None] | None = None
        self._follower: asyncio.Task[None] | None = None
        self.last_error: str | None = None
        self.kms_error: str | None = None  # a KMS-held KEK: why the last look at the KMS failed

    async def sync(self) -> None:
        """At start-up: record new KEK versions and refuse a KEK that is not the store's."""
        loaded = set(self._keyring.versions())
        async with self._store.write() as s:
            known = {r.version: r for r in (await s.execute(select(KekVersion))).scalars()}
            for version in sorted(loaded):
                fp = self._keyring.fingerprint(version)
                row = known.get(version)
                if row is None:
                    s.add(KekVersion(version=version, fingerprint=fp, state="active", created_at=utcnow()))
                elif row.fingerprint != fp:
                    raise ConfigurationError(
                        f"KEK version {version} from {self._keyring.description} is not the key this store "
                        "was written with (fingerprint mismatch); refusing to start"
                    )
        refs = await self._references()
        missing = sorted(v for v, n in refs.items() if n and v not in loaded)
        if missing:
            raise ConfigurationError(
                f"the store has data under KEK version(s) {missing} that {self._keyring.description} "
                "does not hold; refusing to start"
            )

    async def _references(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        async with self._store.read() as s:
            for table in SEALED:
                col = table.model.kek_version
                q = select(col, func.count()).where(col.is_not(None)).group_by(col)
                for version, n in (await s.execute(q)).all():
                    counts[version] = counts.get(version, 0) + n
        return counts

    async def status(self) -> KeyStatus:
        refs = await self._references()
        current = self._keyring.current_version
        async with self._store.read() as s:
            rows = list((await s.execute(select(KekVersion).order_by(KekVersion.version))).scalars())
        versions = []
        for row in rows:
            n = refs.get(row.version, 0)
            state = "current" if row.version == current else ("in_use" if n else "retired")
            versions.append(KekVersionStatus(row.version, state, row.fingerprint, n, row.created_at, row.retired_at))
        pending = sum(n for v, n in refs.items() if v != current)
        return KeyStatus(self._keyring.description, current, pending, self.rotating, versions)

    @property
    def rotating(self) -> bool:
        return self._task is not None and not self._task.done()

    async def rotate(self) -> KeyStatus:
        """Make a newer KEK version current (adding one if the source is writable) and start re-wrapping."""
        async with self._store.read() as s:
            newest_known = (await s.execute(select(func.max(KekVersion.version)))).scalar_one() or 0
        await self._keyring.load_new()
        if self._keyring.current_version <= newest_known:
            await self._keyring.create_version()  # raises kek_read_only (file) or kms_unavailable if it can't
        await self.sync()
        log.info("KEK version %d is now current; re-wrapping data keys", self._keyring.current_version)
        self.start_rewrap()
        return await self.status()

    def start_rewrap(self) -> None:
        if not self.rotating:
            self._task = asyncio.create_task(self._rewrap_loop(), name="credgate-kek-rewrap")

    async def wait(self) -> None:
        if self._task is not None:
            await asyncio.shield(self._task)

    async def _rewrap_loop(self) -> None:
        delay = 0.5
        while True:
            try:
                await self.rewrap_all()
                self.last_error = None
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep serving; retry with backoff
                self.last_error = type(exc).__name__
                log.warning("re-wrap batch failed (%s); retrying in %.1fs", type(exc).__name__, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    async def rewrap_all(self) -> int:
        """Re-wrap until nothing references an older version; returns how many records moved."""
        moved = 0
        while True:
            n = await self._rewrap_batch()
            moved += n
            if n == 0:
                break
            await asyncio.sleep(0)  # let requests in between batches
        await self._mark_retired()
        return moved

    async def _rewrap_batch(self) -> int:
        current = self._keyring.current_version
        n = 0
        async with self._store.write() as s:
            for table in SEALED:
                q = (
                    table.select_rows()
                    .where(table.model.kek_version != current)
                    .limit(self._batch - n)
                    .with_for_update(of=table.model)
                )
                for r in (await s.execute(q)).all():
                    row = r[0]
                    row.sealed = self._envelope.rewrap(row.sealed, table.context_of(r), current)
                    n += 1
                if n >= self._batch:
                    break
        return n

    async def _mark_retired(self) -> None:
        refs = await self._references()
        current = self._keyring.current_version
        async with self._store.write() as s:
            for row in (await s.execute(select(KekVersion))).scalars():
                if row.version != current and not refs.get(row.version) and row.retired_at is None:
                    row.state = "retired"
                    row.retired_at = utcnow()
                elif row.version == current:
                    row.state = "active"

    async def needs_rewrap(self) -> bool:
        refs = await self._references()
        return any(n for v, n in refs.items() if v != self._keyring.current_version)

    # --- a KMS-held KEK (gateway/crypto/kmsring.py): following the KMS key ------------------

    def start_following(self, every: float) -> None:
        """Look at the KMS every ``every`` seconds (and at once when a wrap or unwrap needed
        it): pick up KEK versions other replicas made, and follow a rotation of the KMS key."""
        if self._follower is None or self._follower.done():
            self._keyring.watch()  # type: ignore[attr-defined]
            self._keyring.wake.set()  # type: ignore[attr-defined]  # a first look at once
            self._follower = asyncio.create_task(self._follow_loop(every), name="credgate-kek-follow")

    async def follow(self) -> bool:
        """One look (see :meth:`start_following`); returns whether the current KEK version changed.
        Raises KmsUnavailable when the KMS can't be reached."""
        ring = self._keyring
        before = ring.current_version
        await ring.load_new()
        if await ring.check_kms():  # type: ignore[attr-defined]
            await self.rotate()
            return True
        if not self.rotating and await self.needs_rewrap():
            # Another replica rotated: move what this one wrote under the older version meanwhile.
            self.start_rewrap()
        return ring.current_version != before

    async def _follow_loop(self, every: float) -> None:
        wake: asyncio.Event = self._keyring.wake  # type: ignore[attr-defined]
        retry = 0.0
        while True:
            if retry:  # after a failure: back off, however often requests wake us
                await asyncio.sleep(retry)
            else:
                try:
                    await asyncio.wait_for(wake.wait(), timeout=every)
                except TimeoutError:
                    pass
            wake.clear()
            try:
                await self.follow()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep serving; look again soon
                code = getattr(exc, "code", type(exc).__name__)
                if not retry:
                    log.warning("the KMS holding the KEK can't be used (%s); retrying", code)
                self.kms_error = code
                retry = min(max(retry * 2, 0.25), every, 5.0)
                continue
            if retry:
                log.info("the KMS holding the KEK answers again")
            self.kms_error = None
            retry = 0.0

    async def aclose(self) -> None:
        await cancel_and_wait(self._follower)
        await cancel_and_wait(self._task)
