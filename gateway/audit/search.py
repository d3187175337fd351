"""Reading the trail back: the audit events matching a filter, a page at a time, oldest first
(or newest first)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import and_, or_, select, text

from gateway.store import Store
from gateway.store.models import HMAC_DETAILS, AuditConnector, AuditEventRow, AuditRunId

AuditEvent = AuditEventRow  # what a search returns: one stored event, every chained field


@dataclass(frozen=True)
class Filter:
    """Every field is optional; given ones must all match. ``connector`` is the
    ``details.connector`` of the event; ``after`` a sequence number (exclusive).

    ``run``: the events of one run: those whose ``details.run_id`` names it (issuing for the
    run, minting its token, revoking it) and the requests made with its run token (issuer
    ``credgate``, subject ``run:RUN``). ``hmac``: the events whose ``details`` carry that keyed
    hash under one of :data:`~gateway.store.models.HMAC_DETAILS` (``wrap_token``,
    ``client_secret``). ``newest_first``: pages go back in time, ``before`` a sequence number
    (exclusive) where the page starts."""

    since: datetime | None = None
    until: datetime | None = None
    subject: str | None = None
    action: str | None = None
    connector: str | None = None
    lease_id: str | None = None
    decision: str | None = None
    run: str | None = None
    hmac: str | None = None
    after: int | None = None
    before: int | None = None
    newest_first: bool = False


@dataclass(frozen=True)
class Page:
    """Up to ``limit`` events and where the next page starts (``after=next_after``, or
    ``before=next_after`` newest first); ``next_after`` is None when nothing is left."""

    items: list[AuditEvent] = field(default_factory=list)
    next_after: int | None = None


async def search(store: Store, where: Filter, limit: int) -> Page:
    """The events matching ``where``, oldest first (or newest first), at most ``limit`` of them.

    Every filter runs in SQL with ``LIMIT limit + 1`` and keyset pagination on ``seq``,
    so a page reads about ``limit`` rows through an index on (filter, seq) (migration
    0013), whatever the size of the trail."""
    q = select(AuditEventRow)
    for column, value in ((AuditEventRow.subject, where.subject), (AuditEventRow.action, where.action),
                          (AuditEventRow.lease_id, where.lease_id), (AuditEventRow.decision, where.decision)):
        if value is not None:
            q = q.where(column == value)
    if where.connector is not None:
        q = q.where(AuditConnector() == where.connector)
        if store.dialect == "postgresql":  # ->> also turns a number into text: only a JSON string matches
            q = q.where(text("json_typeof(audit_events.details -> 'connector') = 'string'"))
    if where.run is not None:
        # Two index ranges, (details.run_id, seq) and (subject, seq) (migrations 0016 and 0013).
        q = q.where(or_(AuditRunId() == where.run,
                        and_(AuditEventRow.subject == f"run:{where.run}", AuditEventRow.issuer == "credgate")))
    if where.hmac is not None:
        # One index per key (migration 0016): a BitmapOr of two index ranges.
        q = q.where(or_(*(expr() == where.hmac for expr in HMAC_DETAILS.values())))
    if where.since is not None:
        q = q.where(AuditEventRow.time >= where.since)
    if where.until is not None:
        q = q.where(AuditEventRow.time < where.until)
    if where.after is not None:
        q = q.where(AuditEventRow.seq > where.after)
    if where.before is not None:
        q = q.where(AuditEventRow.seq < where.before)
    # The same (filter, seq) indexes serve both orders (read backwards for the newest first).
    q = q.order_by(AuditEventRow.seq.desc() if where.newest_first else AuditEventRow.seq).limit(limit + 1)
    async with store.read() as s:
        if store.dialect == "postgresql" and (where.since is not None or where.until is not None):
            # A time range is as selective as its values say: plan for them, not the generic plan a
            # prepared statement gets after five runs (which walks the whole trail for a recent ``since``).
            await s.execute(text("SET LOCAL plan_cache_mode = force_custom_plan"))
        items = list((await s.execute(q)).scalars())
    more = len(items) > limit
    items = items[:limit]
    return Page(items, items[-1].seq if more else None)
