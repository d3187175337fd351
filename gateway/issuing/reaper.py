"""The reaper: ends leases on time and keeps retrying revocations until they succeed.

Each tick (every ``reaper_interval_seconds``):

- active leases past ``expires_at``: revocable ones go to ``revoking``,
  expiry-only ones to ``expired`` (their wrap payloads are destroyed);
- ``pending`` leases older than the pending timeout (a crash or a hang
  between committing the plan and finishing the issue) go to ``revoking``:
  their planned names are revoked blindly, which is safe because revoke is
  idempotent;
- ``revoking`` leases that are due get one attempt each; a failure backs off
  exponentially (capped) and is retried forever, never dropped. A lease that
  another actor (an API request, another replica) has claimed for its own
  attempt is skipped: one revocation of a lease at a time;
- expired wrap payloads are destroyed.

With several replicas on PostgreSQL only the holder of a session-level
advisory lock runs the reaper; if its process dies, PostgreSQL releases the
lock with the session and another replica takes over at its next tick. On
SQLite the single process is always the leader.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.issuing.service import Credentials
from gateway.issuing.leases import ACTIVE, EXPIRED, PENDING, REVOKING, Leases
from gateway.store import Store
from gateway.store.models import utcnow
from gateway.issuing.wrapping import WrapTokens
from gateway.tasks import cancel_and_wait

log = logging.getLogger("credgate.reaper")

REAPER_LOCK_KEY = 0x63726561706572  # "creaper"


class Reaper:
    def __init__(
        self,
        store: Store,
        leases: Leases,
        credentials: Credentials,
        wraps: WrapTokens,
        *,
        interval: float = 5.0,
        pending_timeout: float = 120.0,
        batch: int = 200,
        concurrency: int = 8,
    ) -> None:
        self._store = store
        self._leases = leases
        self._credentials = credentials
        self._wraps = wraps
        self.interval = interval
        self.pending_timeout = pending_timeout
        self._batch = batch
        self._concurrency = concurrency
        self.audit: Any = None  # gateway.audit.trail.AuditLog, set by the runtime
        self._lock_conn: AsyncConnection | None = None
        self._task: asyncio.Task[None] | None = None
        self.is_leader = False
        self.ticks = 0

    # --- leadership --------------------------------------------------------

    async def _lead(self) -> bool:
        if self._store.dialect != "postgresql":
            self.is_leader = True
            return True
        if self._lock_conn is not None:
            try:
                await self._lock_conn.execute(text("SELECT 1"))
                return True
            except Exception:
                log.warning("lost the reaper lock's connection; leadership lost")
                await self._release()
        conn = await self._store.engine.connect()
        conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
        got = (await conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": REAPER_LOCK_KEY})).scalar()
        if got:
            self._lock_conn = conn
            self.is_leader = True
            log.info("this replica now runs the reaper")
            return True
        await conn.close()
        self.is_leader = False
        return False

    async def _release(self) -> None:
        conn, self._lock_conn = self._lock_conn, None
        self.is_leader = False
        if conn is not None:
            try:
                await conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": REAPER_LOCK_KEY})
            except Exception:
                pass
            try:
                await conn.close()
            except Exception:
                pass

    # --- work --------------------------------------------------------------

    async def tick(self) -> dict[str, int]:
        """One pass; returns what it did (for tests and logs)."""
        now = utcnow()
        done = {"expired": 0, "to_revoke": 0, "stale_pending": 0, "revoked": 0, "failed": 0, "wraps_purged": 0}
        events: list[dict[str, Any]] = []  # one audit event per lease the reaper moved
        try:
            for lease in await self._leases.due_for_expiry(now, self._batch):
                if lease.revocability == "revocable":
                    if await self._leases.transition(lease.id, (ACTIVE,), REVOKING, next_attempt_at=now):
                        done["to_revoke"] += 1
                        events.append(_event("leases:expire", lease, "expired: revoking"))
                elif await self._leases.transition(lease.id, (ACTIVE,), EXPIRED):
                    await self._wraps.end_for_lease(lease.id, "expired")
                    done["expired"] += 1
                    events.append(_event("leases:expire", lease, "expired"))
            cutoff = now - timedelta(seconds=self.pending_timeout)
            for lease in await self._leases.stale_pending(cutoff, self._batch):
                if await self._leases.transition(
                    lease.id, (PENDING,), REVOKING, next_attempt_at=now, last_error="issuance did not complete"
                ):
                    done["stale_pending"] += 1
                    events.append(_event("leases:revoke", lease, "issuance did not complete: revoking"))
            due = await self._leases.due_for_revocation(now, self._batch)
            sem = asyncio.Semaphore(self._concurrency)

            async def attempt(lease) -> bool | None:
                async with sem:
                    return await self._credentials.attempt_revoke(lease, wait=False)

            for lease, ok in zip(due, await asyncio.gather(*(attempt(lease) for lease in due))):
                if ok is None:
                    continue  # another actor is revoking it now: its outcome is its own to record
                done["revoked" if ok else "failed"] += 1
                events.append(_event("leases:revoke", lease, "revoked" if ok else f"revoke failed (attempt {lease.attempts + 1})"))
            done["wraps_purged"] = await self._wraps.purge_expired(now)
        finally:
            if events and self.audit is not None:
                # Not fail-closed: revocation must go on while a sink is down (the failure is logged).
                await self.audit.record_many(events, fail_closed=False)
        self.ticks += 1
        if any(done.values()):
            log.info("reaper: %s", ", ".join(f"{k}={v}" for k, v in done.items() if v))
        return done

    async def run(self) -> None:
        while True:
            try:
                if await self._lead():
                    await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep going: the next tick retries
                log.error("reaper tick failed (%s)", type(exc).__name__)
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="credgate-reaper")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        await self._release()


def _event(action: str, lease: Any, outcome: str) -> dict[str, Any]:
    """The reaper acts as the gateway itself: issuer credgate, subject reaper."""
    from gateway.audit.trail import gateway_event

    return gateway_event(action, subject="reaper", lease_id=lease.id, outcome=outcome,
                         details={"connector": lease.connector, "resource": lease.resource,
                                  "principal": lease.principal})
