"""The reaper: ends leases on time and keeps retrying revocations until they succeed.

Each tick (every ``reaper_interval_seconds``):

- active leases past ``expires_at``: revocable ones go to ``revoking``,
  expiry-only ones to ``expired`` (their wrap payloads are destroyed);
- active leases still *undelivered* past their delivery deadline (the response
  carrying the credential was never confirmed handed to the server: a crash
  between activation and the response, a client gone before it) go to
  ``revoking``, audited ``undelivered``. Nothing is needed at start-up: the
  markers are in the store, so after a crash whichever replica leads revokes
  them once the deadline passes;
- ``pending`` leases older than the pending timeout (a crash or a hang
  between committing the plan and finishing the issue) go to ``revoking``:
  their planned names are revoked blindly, which is safe because revoke is
  idempotent;
- ``revoking`` leases that are due get one attempt each; a failure backs off
  exponentially (capped) and is retried forever, never dropped. A lease that
  another actor (an API request, another replica) has claimed for its own
  attempt is skipped: one revocation of a lease at a time;
- expired wrap payloads are destroyed.

Leadership (several replicas on PostgreSQL): one replica leads, by a lease
row (``reaper_leadership``, id 1): holder, a fencing ``epoch`` incremented on
every takeover, and ``renewed_until``, computed by the database's clock (now()
+ ``leader_ttl``), so replica clocks don't matter. Every replica runs a
heartbeat every min(interval, leader_ttl / 3):

- the leader renews the row (``WHERE holder = me AND epoch = mine``); it stops
  acting on its own, without asking the store, once ``leader_ttl`` has passed on
  its monotonic clock since it sent its last successful renewal (that is never
  later than the row's ``renewed_until``), and a renewal that finds the epoch
  changed ends its leadership. Either way it logs "lost reaper leadership".
- a follower takes the row (epoch + 1) when ``renewed_until`` has passed, so a
  leader that stops without dying (SIGSTOP, a stall, a partition) is replaced
  within leader_ttl + one heartbeat + a store round trip. The leader also holds
  a session-level advisory lock and says so in the row (``locked``): a follower
  that gets the lock while the row says its holder had it knows that holder's
  session is gone (a crash) and takes over at once, as before.

Fencing: the reaper's own writes (active -> revoking/expired, undelivered ->
revoking, stale pending -> revoking) are conditional UPDATEs that also require
the row to still name this replica and epoch with ``renewed_until`` in the future, in the same statement;
a revived old leader's writes match nothing, so it records no transition and no
audit event. Revocation attempts at the target go through the per-lease claim
(``Credentials.attempt_revoke``): the batch starts only after a fence check
against the store, and each attempt only while the local deadline holds; the
claim keeps it to one attempt at a time even in the remaining window. (A reaper
only ever ticked by hand, with no leadership round, as tests do, is unfenced.)

On SQLite a single process is always the leader (no row, no fence). The workers of one
``credgate serve --workers N`` on SQLite lead by a file lock instead
(:meth:`Store.try_lead <gateway.store.Store.try_lead>`): the worker holding
``<store file>.reaper.lock`` leads until it stops or dies (the kernel frees the lock with the
process); the others ask every tick and the first to get it takes over. A stalled leader
keeps the lock, so there are never two.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from datetime import timedelta
from typing import Any

from sqlalchemy import exists, func, text, update
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.issuing.service import Credentials
from gateway.issuing.leases import ACTIVE, EXPIRED, PENDING, REVOKING, Leases, transition_values
from gateway.store import Store
from gateway.store.models import LeaseRow, ReaperLeadershipRow, utcnow
from gateway.issuing.wrapping import WrapTokens
from gateway.tasks import cancel_and_wait

log = logging.getLogger("credgate.reaper")

REAPER_LOCK_KEY = 0x63726561706572  # "creaper"
UNDELIVERED = "undelivered: the response carrying the credential was not confirmed sent by its delivery deadline"


_L = ReaperLeadershipRow.__table__.c
_ENSURE = text("INSERT INTO reaper_leadership (id, holder, epoch, renewed_until, locked) "
               "VALUES (1, NULL, 0, now(), false) ON CONFLICT (id) DO NOTHING")
# A follower takes the row when its holder stopped renewing (or stepped down), or, having
# just got the advisory lock itself, when nobody ever held the row or the row says its holder
# held the lock (that holder's session is gone). A row nobody held yet needs the lock: a
# previous release's replica, which knows only the lock, may be leading by it.
_TAKE = text("UPDATE reaper_leadership SET holder = :me, epoch = epoch + 1, locked = :locked, taken_at = now(), "
             "renewed_until = now() + make_interval(secs => :ttl) "
             "WHERE id = 1 AND ((holder IS NOT NULL AND renewed_until < now()) "
             "OR (:locked AND (holder IS NULL OR locked))) RETURNING epoch")
_RENEW = text("UPDATE reaper_leadership SET renewed_until = now() + make_interval(secs => :ttl), locked = :locked "
              "WHERE id = 1 AND holder = :me AND epoch = :epoch RETURNING epoch")
_RESIGN = text("UPDATE reaper_leadership SET locked = false, renewed_until = now() - interval '1 second' "
               "WHERE id = 1 AND holder = :me AND epoch = :epoch")
_FENCE = text("SELECT 1 FROM reaper_leadership WHERE id = 1 AND holder = :me AND epoch = :epoch "
              "AND renewed_until > now()")


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
        leader_ttl: float = 15.0,
        revoke_undelivered: bool = True,
    ) -> None:
        self._store = store
        self._leases = leases
        self._credentials = credentials
        self._wraps = wraps
        self.interval = interval
        self.pending_timeout = pending_timeout
        self.leader_ttl = leader_ttl
        self.revoke_undelivered = revoke_undelivered
        self._batch = batch
        self._concurrency = concurrency
        self.audit: Any = None  # gateway.audit.trail.AuditLog, set by the runtime
        self.replica_id = f"{socket.gethostname()[:60]}:{os.getpid()}:{secrets.token_hex(4)}"
        self._lock_conn: AsyncConnection | None = None
        self._task: asyncio.Task[None] | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._sqlite_leader = False
        self._ensured = False
        # Fenced once this replica takes part in leadership (start(), or a heartbeat() by
        # hand); a reaper only ever ticked by hand (tests; reaper_enabled false) acts unfenced.
        self._fenced = False
        self.epoch: int | None = None  # the fencing epoch this replica leads with; None: not leading
        self._deadline = 0.0  # monotonic: stop acting at this moment unless renewed
        self.takeovers = 0  # times this replica became the leader
        self.undelivered_revoked = 0  # leases this replica sent to revoking as undelivered
        self.ticks = 0

    # --- leadership --------------------------------------------------------

    @property
    def _pg(self) -> bool:
        return self._store.dialect == "postgresql"

    @property
    def is_leader(self) -> bool:
        """Leading now: on PostgreSQL, an epoch whose local deadline has not passed."""
        if not self._pg:
            return self._sqlite_leader
        return self.epoch is not None and time.monotonic() < self._deadline

    def _may_act(self) -> bool:
        return not self._fenced or self.is_leader

    def _lapsed(self) -> bool:
        """Drop a leadership whose local deadline passed (the process stalled, or could not
        renew in time): from here on it must not act. True if it did."""
        if self.epoch is not None and time.monotonic() >= self._deadline:
            log.warning("lost reaper leadership: epoch %d not renewed within %.1fs (stalled or cut off); "
                        "not acting on it", self.epoch, self.leader_ttl)
            self.epoch = None
            return True
        return False

    async def _lead(self) -> bool:
        """The work loop's question: may this replica run a tick now?"""
        if not self._pg:
            self._sqlite_leader = self._store.try_lead()
            return self._sqlite_leader
        self._lapsed()
        return self.is_leader

    async def _row(self, stmt: Any, params: dict[str, Any]) -> Any:
        async with self._store.engine.connect() as conn:
            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            result = await conn.execute(stmt, params)
            return result.first() if result.returns_rows else None

    async def _try_lock(self) -> bool:
        if self._lock_conn is not None:
            return True
        conn = await self._store.engine.connect()
        try:
            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            got = (await conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": REAPER_LOCK_KEY})).scalar()
        except BaseException:
            await conn.close()
            raise
        if got:
            self._lock_conn = conn
            return True
        await conn.close()
        return False

    async def heartbeat(self) -> None:
        """One leadership round: renew (leader) or try to take over (follower)."""
        self._fenced = True
        if not self._ensured:
            await self._row(_ENSURE, {})
            self._ensured = True
        self._lapsed()
        if self.epoch is not None:
            sent = time.monotonic()
            locked = await self._try_lock()
            row = await self._row(_RENEW, {"me": self.replica_id, "epoch": self.epoch, "ttl": self.leader_ttl,
                                           "locked": locked})
            if row is not None:
                if self.epoch is not None:  # not lapsed while renewing
                    self._deadline = sent + self.leader_ttl
                return
            log.warning("lost reaper leadership: epoch %s was taken over by another replica", self.epoch)
            self.epoch = None
            await self._unlock()
            return
        sent = time.monotonic()
        locked = await self._try_lock()
        row = await self._row(_TAKE, {"me": self.replica_id, "ttl": self.leader_ttl, "locked": locked})
        if row is None:
            await self._unlock()  # somebody else leads: let them (or the next follower) have the lock
            return
        self.epoch, self._deadline = int(row[0]), sent + self.leader_ttl
        self.takeovers += 1
        log.info("this replica now runs the reaper (epoch %d)", self.epoch)

    async def _heartbeats(self) -> None:
        every = min(self.interval, self.leader_ttl / 3)
        while True:
            try:
                # A round stuck on an unreachable store is abandoned (the local deadline has
                # ended leadership by then); the next one starts afresh.
                await asyncio.wait_for(self.heartbeat(), self.leader_ttl)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the store is away: the local deadline ends leadership in time
                log.warning("reaper leadership heartbeat failed (%s)", type(exc).__name__)
            await asyncio.sleep(every)

    async def still_leading(self) -> bool:
        """The fence, asked of the store: the row still names this replica and epoch, unexpired."""
        if not self._fenced:
            return True
        if self._lapsed() or self.epoch is None:
            return False
        return await self._row(_FENCE, {"me": self.replica_id, "epoch": self.epoch}) is not None

    def _fence(self) -> Any:
        """The same condition as a clause, for the reaper's own conditional UPDATEs."""
        return exists().where(_L.id == 1, _L.holder == self.replica_id, _L.epoch == self.epoch,
                              _L.renewed_until > func.now())

    async def transition(
        self, lease_id: str, frm: tuple[str, ...], to: str, *, where: tuple[Any, ...] = (), **values: Any
    ) -> bool:
        """``Leases.transition`` fenced by this replica's epoch (in the same statement) on
        PostgreSQL: a stale leader's transition matches nothing."""
        if not self._fenced:
            return await self._leases.transition(lease_id, frm, to, where=where, **values)
        if self._lapsed() or self.epoch is None:
            return False
        values = transition_values(to, values)  # as Leases.transition
        async with self._store.write() as s:
            res = await s.execute(
                update(LeaseRow).where(LeaseRow.id == lease_id, LeaseRow.state.in_(frm), *where, self._fence())
                .values(**values).execution_options(synchronize_session=False)
            )
            return res.rowcount == 1

    async def _unlock(self) -> None:
        conn, self._lock_conn = self._lock_conn, None
        if conn is not None:
            try:
                await conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": REAPER_LOCK_KEY})
            except Exception:
                pass
            try:
                await conn.close()
            except Exception:
                pass

    async def _release(self) -> None:
        """Step down (a clean stop): free the row at once so another replica need not wait."""
        epoch, self.epoch = self.epoch, None
        if self._sqlite_leader:
            self._store.resign()
        self._sqlite_leader = False
        if self._pg and epoch is not None:
            try:
                await self._row(_RESIGN, {"me": self.replica_id, "epoch": epoch})
            except Exception:
                pass
        await self._unlock()

    # --- work --------------------------------------------------------------

    async def tick(self) -> dict[str, int]:
        """One pass; returns what it did (for tests and logs)."""
        now = utcnow()
        done = {"expired": 0, "to_revoke": 0, "undelivered": 0, "stale_pending": 0, "revoked": 0, "failed": 0,
                "wraps_purged": 0}
        events: list[dict[str, Any]] = []  # one audit event per lease the reaper moved
        try:
            for lease in await self._leases.due_for_expiry(now, self._batch):
                if lease.revocability == "revocable":
                    if await self.transition(lease.id, (ACTIVE,), REVOKING, next_attempt_at=now):
                        done["to_revoke"] += 1
                        events.append(_event("leases:expire", lease, "expired: revoking"))
                elif await self.transition(lease.id, (ACTIVE,), EXPIRED):
                    await self._wraps.end_for_lease(lease.id, "expired")
                    done["expired"] += 1
                    events.append(_event("leases:expire", lease, "expired"))
            if self.revoke_undelivered:
                for lease in await self._leases.undelivered(now, self._batch):
                    # Only if still undelivered and due when the UPDATE runs: a delivery confirmed, or
                    # a replay that restarted the deadline, meanwhile keeps the lease.
                    if await self.transition(lease.id, (ACTIVE,), REVOKING, where=(LeaseRow.delivery_due_at <= now,),
                                             next_attempt_at=now, last_error=UNDELIVERED):
                        done["undelivered"] += 1
                        events.append(_event("leases:revoke", lease, "undelivered: revoking"))
                if done["undelivered"]:
                    self.undelivered_revoked += done["undelivered"]
                    log.warning("reaper: revoking %d lease(s) whose response was never confirmed sent (undelivered)",
                                done["undelivered"])
            cutoff = now - timedelta(seconds=self.pending_timeout)
            for lease in await self._leases.stale_pending(cutoff, self._batch):
                if await self.transition(
                    lease.id, (PENDING,), REVOKING, next_attempt_at=now, last_error="issuance did not complete"
                ):
                    done["stale_pending"] += 1
                    events.append(_event("leases:revoke", lease, "issuance did not complete: revoking"))
            due = await self._leases.due_for_revocation(now, self._batch)
            if due and not await self.still_leading():
                due = []  # fenced: this replica no longer leads
            sem = asyncio.Semaphore(self._concurrency)

            async def attempt(lease) -> bool | None:
                async with sem:
                    if not self._may_act():  # the local deadline passed (a stall): not this replica's to do
                        return None
                    return await self._credentials.attempt_revoke(lease, wait=False)

            for lease, ok in zip(due, await asyncio.gather(*(attempt(lease) for lease in due))):
                if ok is None:
                    continue  # another actor is revoking it now: its outcome is its own to record
                done["revoked" if ok else "failed"] += 1
                events.append(_event("leases:revoke", lease, "revoked" if ok else f"revoke failed (attempt {lease.attempts + 1})"))
            if self._may_act():
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
        if self._pg and self._heartbeat_task is None:
            self._fenced = True
            self._heartbeat_task = asyncio.create_task(self._heartbeats(), name="credgate-reaper-leadership")
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="credgate-reaper")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        await cancel_and_wait(self._heartbeat_task)
        self._task = self._heartbeat_task = None
        await self._release()


def _event(action: str, lease: Any, outcome: str) -> dict[str, Any]:
    """The reaper acts as the gateway itself: issuer credgate, subject reaper."""
    from gateway.audit.trail import gateway_event

    return gateway_event(action, subject="reaper", lease_id=lease.id, outcome=outcome,
                         details={"connector": lease.connector, "resource": lease.resource,
                                  "principal": lease.principal})
