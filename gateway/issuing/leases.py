"""Leases: the durable record of every credential issued, and its state machine.

    pending ──> active ──> revoking ──> revoked
       │           │  ╲
       │           │   ╲──> expired        (expiry-only types, at expires_at)
       └───────────┴──────> revoking       (revocable types, at expires_at; or a pending row
                                            older than the pending timeout: a crash mid-issue)

Every transition is a conditional UPDATE (``WHERE state = <from>``), so two
replicas, or the reaper and an admin, can race without a lease being
resurrected. A ``revoking`` lease is revoked at its target by one actor at a
time: each attempt first claims it (:meth:`Leases.claim`, owner and deadline
in the row); the others wait for, or report, that attempt's outcome.

TTLs are decided in one place, :func:`calculate_ttl`.

Delivery: a revocable lease is activated with ``delivery_due_at`` set (the delivery
deadline); once its response has been handed to the server whole the marker is
cleared (:meth:`Leases.delivered`). The reaper revokes an active lease whose marker
passed (:meth:`Leases.undelivered`): a credential made but never delivered. A NULL
marker (delivered, or activated by a release before the column) is never undelivered.

Reads for the API (:meth:`Leases.view`, :meth:`Leases.views`) use Core, not
the ORM: they select only the view's columns, never the sealed ones, and
return plain dicts shaped like ``LeaseOut``.
"""

from __future__ import annotations

import functools
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import BigInteger, Integer, Select, Update, and_, bindparam, cast, func, or_, select, update

from gateway.identity.principal import GATEWAY
from gateway.errors import NotFound, ValidationFailed
from gateway.store import Store
from gateway.store.models import LeaseRow, utcnow

PENDING, ACTIVE, REVOKING, REVOKED, EXPIRED = "pending", "active", "revoking", "revoked", "expired"
STATES = (PENDING, ACTIVE, REVOKING, REVOKED, EXPIRED)
LIVE = (PENDING, ACTIVE, REVOKING)


_c = LeaseRow.__table__.c

# What the API shows of a lease, named as ``LeaseOut`` names it (the same
# fields as ``credentials.lease_view``); never the sealed columns or revoke_state.
VIEW_COLUMNS = (
    _c.id.label("lease_id"), _c.connector, _c.connector_type, _c.resource, _c.principal, _c.run_id,
    _c.state, _c.revocability, _c.renewable, _c.wrapped, _c.issued_at, _c.expires_at,
    _c.max_expires_at, _c.revoked_at, _c.attempts, _c.last_error,
)
VIEW_KEYS = tuple(col.name for col in VIEW_COLUMNS)

_VIEW_ONE = select(*VIEW_COLUMNS).where(_c.id == bindparam("id"))
# The list's filters, by the name of the keyword Leases.views takes.
_FILTERS = {
    "connector": _c.connector == bindparam("connector"),
    "principal": _c.principal == bindparam("principal"),
    "state": _c.state == bindparam("state"),
    "run_id": _c.run_id == bindparam("run_id"),
    "expiring_before": _c.expires_at < bindparam("expiring_before"),
    "after": _c.id > bindparam("after"),
}


@functools.cache
def _view_page(used: tuple[str, ...]) -> Select[Any]:
    """The page statement for one combination of filters, built once (then only bound)."""
    return select(*VIEW_COLUMNS).where(*(_FILTERS[f] for f in used)).order_by(_c.id).limit(bindparam("limit"))


def new_lease_id() -> str:
    """Time-ordered (48-bit milliseconds) then 64 random bits: sortable and unguessable."""
    return f"lease_{int(time.time() * 1000):012x}{secrets.token_hex(8)}"




@dataclass(frozen=True)
class TTLDecision:
    ttl: timedelta
    requested: timedelta | None
    capped: bool  # the request asked for more than the cap
    cap: timedelta  # the smallest max that applied: it bounds the lease's whole life too


def calculate_ttl(
    requested_seconds: int | None,
    *,
    default: timedelta,
    maximum: timedelta,
    type_min: timedelta,
    type_max: timedelta,
    policy_max: timedelta | None = None,
    run_max: timedelta | None = None,
) -> TTLDecision:
    """The one place a lease's TTL is decided, at issuance and at every renewal:
    the smallest of the request (or the connector default), the connector's
    max, the type's max, the policy's max and the run token's max; a request
    under the type's minimum is refused. ``cap``, the smallest of the maxima,
    also bounds the lease's whole life (``max_expires_at`` is issue time +
    cap), so renewals can't outlive what issuance allowed."""
    requested = timedelta(seconds=requested_seconds) if requested_seconds is not None else None
    cap = min(c for c in (maximum, type_max, policy_max, run_max) if c is not None)
    want = requested if requested is not None else default
    if want < type_min:
        raise ValidationFailed(
            f"ttl_seconds must be at least {int(type_min.total_seconds())} for this connector type.",
            code="ttl_too_short",
        )
    ttl = min(want, cap)
    return TTLDecision(ttl, requested, capped=requested is not None and requested > cap, cap=cap)


def transition_values(to: str, values: dict[str, Any]) -> dict[str, Any]:
    """What a transition to ``to`` writes besides ``values``: the state and the time; once out of
    ``active``, no delivery marker; once over, nothing to replay and no claim."""
    values = {**values, "state": to, "updated_at": utcnow()}
    if to != ACTIVE:
        values.setdefault("delivery_due_at", None)
    if to in (REVOKED, EXPIRED):
        # The lease is over: nothing may be replayed from it any more, nobody revokes it.
        values.update(kek_version=None, wrapped_dek=None, ciphertext=None, revoke_owner=None, revoke_claim_until=None)
    return values


def transition_statement(
    lease_id: str, frm: tuple[str, ...], to: str, *, where: tuple[Any, ...] = (), **values: Any
) -> Update:
    """The UPDATE of :meth:`Leases.transition`, for a caller that runs it in a transaction of its
    own making (a group commit). Core semantics: no ORM session objects are synchronised."""
    return (
        update(LeaseRow).where(LeaseRow.id == lease_id, LeaseRow.state.in_(frm), *where)
        .values(**transition_values(to, values)).execution_options(synchronize_session=False)
    )


def owner_filter(value: str) -> str:
    """A principal as the lease list and bulk revocation take it: an owner key
    (``ISSUER/SUBJECT``, see ``Principal.owner``) as it is, or a bare gateway
    subject (``client:x``, ``admin_key:x``, ``run:x``; these never hold a '/')
    read as ``credgate/<subject>``. A trusted issuer's subject must be qualified."""
    return value if "/" in value else f"{GATEWAY}/{value}"


def _live(*, lease_ids: list[str] | None = None, connector: str | None = None, principal: str | None = None,
          run_id: str | None = None) -> list[Any]:
    """The leases a revocation matches: live (pending, active, or already revoking) and each
    filter given."""
    conds: list[Any] = [LeaseRow.state.in_((PENDING, ACTIVE, REVOKING))]
    if lease_ids is not None:
        conds.append(LeaseRow.id.in_(lease_ids))
    if connector:
        conds.append(LeaseRow.connector == connector)
    if principal:
        conds.append(LeaseRow.principal == principal)
    if run_id:
        conds.append(LeaseRow.run_id == run_id)
    return conds


class Leases:
    def __init__(self, store: Store) -> None:
        self._store = store
        # Views are one SELECT each: on PostgreSQL they run without BEGIN/ROLLBACK round trips.
        self._reader = (
            store.engine.execution_options(isolation_level="AUTOCOMMIT")
            if store.dialect == "postgresql" else store.engine
        )

    async def view(self, lease_id: str) -> dict[str, Any]:
        """The API view of one lease (``LeaseOut``'s fields), read without the ORM."""
        async with self._reader.connect() as conn:
            row = (await conn.execute(_VIEW_ONE, {"id": lease_id})).first()
        if row is None:
            raise NotFound(f"Lease {lease_id} does not exist.", code="lease_not_found")
        return dict(zip(VIEW_KEYS, row))

    async def views(
        self,
        *,
        connector: str | None = None,
        principal: str | None = None,
        state: str | None = None,
        run_id: str | None = None,
        expiring_before: datetime | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """One page of lease views in id order (keyset: ids after ``after``) and
        the next page's token, or None on the last page."""
        given = {
            "connector": connector, "principal": principal, "state": state, "run_id": run_id,
            "expiring_before": expiring_before, "after": after,
        }
        params: dict[str, Any] = {k: v for k, v in given.items() if v}
        q = _view_page(tuple(params))
        params["limit"] = limit + 1
        async with self._reader.connect() as conn:
            rows = (await conn.execute(q, params)).all()
        more = len(rows) > limit
        items = [dict(zip(VIEW_KEYS, r)) for r in rows[:limit]]
        return items, (items[-1]["lease_id"] if more else None)

    async def get(self, lease_id: str) -> LeaseRow:
        """The whole row, sealed columns and revoke_state included: for code that acts on the lease."""
        async with self._store.read() as s:
            row = await s.get(LeaseRow, lease_id)
        if row is None:
            raise NotFound(f"Lease {lease_id} does not exist.", code="lease_not_found")
        return row

    async def find_idempotent(self, owner: str, key: str) -> LeaseRow | None:
        """The lease an earlier request of this owner (``Principal.owner``) made with this key."""
        async with self._store.read() as s:
            q = select(LeaseRow).where(LeaseRow.principal == owner, LeaseRow.idempotency_key == key)
            return (await s.execute(q)).scalar_one_or_none()

    async def transition(
        self, lease_id: str, frm: tuple[str, ...], to: str, *, where: tuple[Any, ...] = (), **values: Any
    ) -> bool:
        """Move a lease from one of ``frm`` to ``to`` (and whatever else ``where`` asks of the
        row, in the same statement); False if it was not so."""
        async with self._store.write() as s:
            res = await s.execute(transition_statement(lease_id, frm, to, where=where, **values))
            return res.rowcount == 1

    # --- delivery ------------------------------------------------------------

    async def delivered(self, lease_ids: list[str]) -> int:
        """Clear the delivery marker of leases whose response was handed to the server whole
        (through the group commit: concurrent confirmations share a commit); how many had it."""
        ids = list(dict.fromkeys(lease_ids))

        def clear(s: Any) -> int:
            return s.execute(
                update(LeaseRow).where(LeaseRow.id.in_(ids), LeaseRow.delivery_due_at.is_not(None))
                .values(delivery_due_at=None).execution_options(synchronize_session=False)
            ).rowcount

        return await self._store.grouped(clear)

    async def redeliver(self, lease_id: str, due: datetime) -> bool:
        """Before an Idempotency-Key replay hands out an undelivered lease again: restart its
        delivery deadline at ``due`` (a marker cleared meanwhile stays cleared). False when the
        lease is no longer active (the reaper took it first): it must not be handed out. One
        statement with the state check, so the reaper can't revoke it under the replay's answer."""

        def extend(s: Any) -> bool:
            res = s.execute(
                update(LeaseRow)
                .where(LeaseRow.id == lease_id, LeaseRow.state == ACTIVE, LeaseRow.delivery_due_at.is_not(None))
                .values(delivery_due_at=due).execution_options(synchronize_session=False)
            )
            if res.rowcount == 1:
                return True
            return s.execute(select(LeaseRow.state).where(LeaseRow.id == lease_id)).scalar() == ACTIVE

        return await self._store.grouped(extend)

    async def undelivered(self, now: datetime, limit: int) -> list[LeaseRow]:
        """Active leases whose response was not confirmed sent by their delivery deadline."""
        async with self._store.read() as s:
            q = (
                select(LeaseRow)
                .where(LeaseRow.delivery_due_at <= now, LeaseRow.state == ACTIVE)
                .order_by(LeaseRow.delivery_due_at)
                .limit(limit)
            )
            return list((await s.execute(q)).scalars())

    async def claim(self, lease_id: str, owner: str, now: datetime, until: datetime) -> bool:
        """Claim a ``revoking`` lease for one revocation attempt at the target: a conditional
        UPDATE that succeeds only while nobody else's claim holds (NULL or lapsed). On
        PostgreSQL a concurrent claim waits for this row's lock, then re-reads the row and
        finds it taken; SQLite runs one writer at a time. True when ``owner`` holds it."""
        async with self._store.write() as s:
            res = await s.execute(
                update(LeaseRow)
                .where(
                    LeaseRow.id == lease_id,
                    LeaseRow.state == REVOKING,
                    or_(LeaseRow.revoke_claim_until.is_(None), LeaseRow.revoke_claim_until <= now),
                )
                .values(revoke_owner=owner, revoke_claim_until=until)
                .execution_options(synchronize_session=False)
            )
            return res.rowcount == 1

    async def revoke_and_claim(self, lease_id: str, owner: str, now: datetime, until: datetime) -> LeaseRow | None:
        """Mark one live lease ``revoking`` (due now) and claim its revocation attempt for
        ``owner``, in one statement of a group commit: what :meth:`mark_revoking` then
        :meth:`claim` do for a single lease. The claimed row as it is now, or None when there
        is no such lease, it is over, or another actor's claim on it holds (the caller then
        waits for that actor as :meth:`claim`'s callers do)."""
        statement = (
            update(LeaseRow)
            .where(
                LeaseRow.id == lease_id,
                or_(
                    LeaseRow.state.in_((PENDING, ACTIVE)),
                    and_(
                        LeaseRow.state == REVOKING,
                        or_(LeaseRow.revoke_claim_until.is_(None), LeaseRow.revoke_claim_until <= now),
                    ),
                ),
            )
            .values(
                state=REVOKING, next_attempt_at=now, updated_at=now, delivery_due_at=None,
                revoke_owner=owner, revoke_claim_until=until,
            )
            .returning(LeaseRow)
            .execution_options(synchronize_session=False)
        )
        return await self._store.grouped(lambda s: s.execute(statement).scalar_one_or_none())

    async def revoke_failed(self, lease_id: str, owner: str, **values: Any) -> bool:
        """Record a failed attempt (``attempts``, ``next_attempt_at``, ``last_error``) and
        release the claim, only if ``owner`` still holds it: a holder whose claim lapsed
        and was taken over does not overwrite its successor's record."""
        async with self._store.write() as s:
            res = await s.execute(
                update(LeaseRow)
                .where(LeaseRow.id == lease_id, LeaseRow.state == REVOKING, LeaseRow.revoke_owner == owner)
                .values(**values, revoke_owner=None, revoke_claim_until=None, updated_at=utcnow())
                .execution_options(synchronize_session=False)
            )
            return res.rowcount == 1

    async def revoke_progress(self, lease_id: str) -> tuple[str, datetime | None] | None:
        """A lease's state and its revoke claim's deadline (None: nobody holds one), or None
        when there is no such lease: what a revocation waiting for another one polls."""
        async with self._reader.connect() as conn:
            row = (await conn.execute(
                select(_c.state, _c.revoke_claim_until).where(_c.id == lease_id)
            )).first()
        return None if row is None else (row[0], row[1])

    async def mark_revoking(
        self, *, lease_ids: list[str] | None = None, connector: str | None = None,
        principal: str | None = None, run_id: str | None = None,
        permit: Callable[[str, str], bool] | None = None,
    ) -> list[str]:
        """Move matching live leases to ``revoking`` (due now); return their ids. ``permit``
        (connector, resource) -> bool leaves out the leases it refuses."""
        conds = _live(lease_ids=lease_ids, connector=connector, principal=principal, run_id=run_id)
        now = utcnow()
        async with self._store.write() as s:
            rows = (await s.execute(
                # in id order: two bulk revocations over overlapping leases lock them in one order
                select(LeaseRow.id, LeaseRow.connector, LeaseRow.resource).where(and_(*conds))
                .order_by(LeaseRow.id).with_for_update()
            )).all()
            ids = [r.id for r in rows if permit is None or permit(r.connector, r.resource)]
            if ids:
                await s.execute(
                    update(LeaseRow)
                    .where(LeaseRow.id.in_(ids), LeaseRow.state.in_((PENDING, ACTIVE)))
                    .values(state=REVOKING, next_attempt_at=now, updated_at=now, delivery_due_at=None)
                    .execution_options(synchronize_session=False)
                )
        return ids

    async def count_live(
        self, *, connector: str | None = None, principal: str | None = None,
        permit: Callable[[str, str], bool] | None = None,
    ) -> int:
        """How many leases :meth:`mark_revoking` would match now (nothing changes): one grouped
        query, ``permit`` asked once per (connector, resource)."""
        conds = _live(connector=connector, principal=principal)
        async with self._store.read() as s:
            rows = (await s.execute(
                select(LeaseRow.connector, LeaseRow.resource, func.count()).where(and_(*conds))
                .group_by(LeaseRow.connector, LeaseRow.resource)
            )).all()
        return sum(n for c, r, n in rows if permit is None or permit(c, r))

    async def due_for_expiry(self, now: datetime, limit: int) -> list[LeaseRow]:
        async with self._store.read() as s:
            q = (
                select(LeaseRow)
                .where(LeaseRow.state == ACTIVE, LeaseRow.expires_at <= now)
                .order_by(LeaseRow.expires_at)
                .limit(limit)
            )
            return list((await s.execute(q)).scalars())

    async def stale_pending(self, older_than: datetime, limit: int) -> list[LeaseRow]:
        async with self._store.read() as s:
            q = select(LeaseRow).where(LeaseRow.state == PENDING, LeaseRow.updated_at <= older_than).limit(limit)
            return list((await s.execute(q)).scalars())

    async def due_for_revocation(self, now: datetime, limit: int) -> list[LeaseRow]:
        async with self._store.read() as s:
            q = (
                select(LeaseRow)
                .where(
                    LeaseRow.state == REVOKING,
                    or_(LeaseRow.next_attempt_at.is_(None), LeaseRow.next_attempt_at <= now),
                    # not while another actor is revoking it (its claim holds)
                    or_(LeaseRow.revoke_claim_until.is_(None), LeaseRow.revoke_claim_until <= now),
                )
                .order_by(LeaseRow.next_attempt_at)
                .limit(limit)
            )
            return list((await s.execute(q)).scalars())

    async def counts(self, *, stuck_after_attempts: int) -> dict[str, int]:
        async with self._store.read() as s:
            rows = (await s.execute(select(LeaseRow.state, func.count()).group_by(LeaseRow.state))).all()
            stuck = (
                await s.execute(
                    select(func.count()).where(
                        LeaseRow.state == REVOKING, LeaseRow.attempts >= stuck_after_attempts
                    )
                )
            ).scalar_one()
        out = {state: 0 for state in STATES}
        out.update({state: n for state, n in rows})
        out["stuck_revoking"] = stuck
        return out

    async def counts_by_run(self, run_ids: list[str]) -> dict[str, dict[str, int]]:
        """Lease counts by state (every state, zeros too) of each of ``run_ids``: one grouped
        query (``GROUP BY run_id, state``) over the (run_id, id) index, whatever the page size."""
        out = {run_id: {state: 0 for state in STATES} for run_id in run_ids}
        if not run_ids:
            return out
        q = (select(_c.run_id, _c.state, func.count()).where(_c.run_id.in_(run_ids))
             .group_by(_c.run_id, _c.state))
        async with self._reader.connect() as conn:
            for run_id, state, n in (await conn.execute(q)).all():
                out[run_id][state] = n
        return out

    async def issued_per_hour(self, hours: int, now: datetime | None = None) -> list[tuple[datetime, int]]:
        """Leases issued in each of the last ``hours`` UTC hours (the current one last, zeros
        too): ``[(hour start, count)]``. One ``GROUP BY`` hour over a range of the issued_at
        index (migration 0016): counted in SQL, never by fetching rows. The hour is the
        whole hours since the epoch, computed the same way on PostgreSQL and SQLite (where
        timestamps are naive UTC text, ``YYYY-MM-DD HH:MM:SS.ffffff``), so no session time
        zone enters it."""
        now = now or utcnow()
        current = now.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
        first = current - timedelta(hours=hours - 1)
        if self._store.dialect == "postgresql":
            bucket = cast(func.floor(func.extract("epoch", _c.issued_at)), BigInteger) // 3600
        else:
            # Whole seconds first: SQLite's date functions round to the millisecond, which
            # would move 10:59:59.9996 into the next hour.
            bucket = cast(func.strftime("%s", func.substr(_c.issued_at, 1, 19)), Integer) // 3600
        q = select(bucket.label("bucket"), func.count()).where(_c.issued_at >= first).group_by("bucket")
        async with self._reader.connect() as conn:
            counted = {int(h): n for h, n in (await conn.execute(q)).all()}
        base = int(first.timestamp()) // 3600
        return [(first + timedelta(hours=i), counted.get(base + i, 0)) for i in range(hours)]

    async def live_count(self, connector: str) -> int:
        async with self._store.read() as s:
            q = select(func.count()).where(LeaseRow.connector == connector, LeaseRow.state.in_(LIVE))
            return (await s.execute(q)).scalar_one()
