"""The change feed: how every replica's caches learn that something changed.

A write that changes what a cache may hold calls :func:`note` inside its
:meth:`Store.write() <gateway.store.Store.write>` transaction. On PostgreSQL
that queues ``pg_notify('credgate_changes', ...)`` in the same transaction,
so PostgreSQL delivers it to every listening replica exactly when (and only
if) the change commits. In this process the subscribers run right after the
commit, before the write is acknowledged.

Each replica keeps one dedicated connection that ``LISTEN``\\ s. While it is
down the feed is not :attr:`~Changes.live`: caches store nothing new, and what
they hold is served for at most ``stale_seconds`` after the listener was lost
(:attr:`~Changes.serving`; setting ``cache_stale_seconds``), so that a store
outage does not at once fail requests whose answer is cached, at the price of
missing another replica's change for that long. Past it, and when the listener
is back, every subscriber is told to drop everything, since notifications sent
meanwhile were lost.

On SQLite served by one process there is no listener: the feed is always live
and in-process delivery is all there is. When ``credgate serve --workers N``
runs several processes on one SQLite file, each change noted is also written as a
row of ``change_log`` in the changing transaction (a write transaction is
``BEGIN IMMEDIATE``, so row ids commit in order); every worker polls the table
every :data:`POLL_SECONDS` for rows past the last it saw (written by another
worker) and delivers them as if notified. Its caches answer only while its last
successful poll *started* less than :data:`STALE_BOUND_SECONDS` ago: any change
committed that long before a cached answer had been delivered by then, so a
revoked token or a removed rule is refused by every worker at most
STALE_BOUND_SECONDS after the revocation was acknowledged, however loaded the
worker is (a late poll makes its caches miss, not serve stale). Rows older than
:data:`PRUNE_AFTER_SECONDS` are deleted; a worker that could not poll for half
that long drops everything it holds.

Topics and their keys: ``secret`` ("backend/path"), ``backend`` (name),
``connector`` (name), ``policy``, ``run`` (run id), ``admin_key`` (key id),
``issuer``, ``client``, ``signing_key``, ``token`` (the ``jti`` of a gateway
token revoked on its own). A key of ``None`` means "anything under this
topic". Payloads carry names and ids, never values.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import func, insert, select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from gateway.tasks import cancel_and_wait
from gateway.throttle import LogThrottle

log = logging.getLogger("credgate.changes")
_poll_log = LogThrottle(log, seconds=10.0)

CHANNEL = "credgate_changes"
TOPICS = frozenset(
    {"secret", "backend", "connector", "policy", "run", "admin_key", "issuer", "client", "signing_key", "token"}
)
_PENDING = "credgate_changes"
LISTENER_NAME = "credgate-changes"  # application_name of the listening connection
HEARTBEAT_SECONDS = 2.0  # how soon a silently dead listener is noticed
MAX_PAYLOAD = 7000  # PostgreSQL refuses NOTIFY payloads of 8000 bytes or more

POLL_SECONDS = 0.1  # SQLite workers: how often change_log is read
STALE_BOUND_SECONDS = 1.0  # SQLite workers: caches answer only this long after the last poll started
PRUNE_AFTER_SECONDS = 60.0  # SQLite workers: change_log rows older than this are deleted
_PRUNE_EVERY = 10.0
_ROWS = "credgate_change_rows"  # session.info: this process's writer id, when changes are written as rows

Subscriber = Callable[[str | None], None]
Poller = Callable[[int | None], Awaitable[list[tuple[int, str, str | None, str]]]]


def _notification(session: Any, topic: str, key: str | None) -> Any:
    """Queue the change on the session; the NOTIFY statement to run in its transaction, if any."""
    if topic not in TOPICS:
        raise ValueError(f"unknown change topic {topic!r}")
    payload = json.dumps({"t": topic, "k": key}, separators=(",", ":"))
    if len(payload.encode()) > MAX_PAYLOAD:
        key, payload = None, json.dumps({"t": topic, "k": None})
    session.info.setdefault(_PENDING, []).append((topic, key))
    if session.bind is not None and session.bind.dialect.name == "postgresql":
        return select(func.pg_notify(CHANNEL, payload))
    writer = session.info.get(_ROWS)
    if writer is not None:  # SQLite shared by several workers: a row the others poll for
        from gateway.store.models import ChangeLogRow, utcnow

        return insert(ChangeLogRow).values(topic=topic, key=key if key is None or len(key) <= 512 else None,
                                           writer=writer, at=utcnow())
    return None


def rows_info(writer: str | None) -> dict[str, Any]:
    """The ``info`` of a new write session: with ``writer``, noted changes are also written as rows."""
    return {} if writer is None else {_ROWS: writer}


async def note(session: AsyncSession, topic: str, key: str | None = None) -> None:
    """Record, inside a write transaction, that ``topic``/``key`` changed."""
    statement = _notification(session, topic, key)
    if statement is not None:
        await session.execute(statement)


def note_sync(session: Session, topic: str, key: str | None = None) -> None:
    """:func:`note` for the synchronous sessions of :meth:`Store.grouped <gateway.store.Store.grouped>`."""
    statement = _notification(session, topic, key)
    if statement is not None:
        session.execute(statement)


def committed(session: AsyncSession | Session) -> list[tuple[str, str | None]]:
    """The changes a session noted (called by the store after its commit)."""
    return session.info.pop(_PENDING, [])


class Changes:
    def __init__(self, url: str, dialect: str, *, retry_seconds: float = 1.0, stale_seconds: float = 0.0,
                 connect_args: dict[str, Any] | None = None, writer: str | None = None,
                 poller: Poller | None = None, pruner: Callable[[], Awaitable[None]] | None = None) -> None:
        self._url = url
        self._dialect = dialect
        self._retry = retry_seconds
        self._stale = stale_seconds
        self._connect_args = dict(connect_args or {})
        self._lost_at: float | None = None  # monotonic; set while deaf and still serving what is cached
        self._subscribers: dict[str, list[Subscriber]] = defaultdict(list)
        # SQLite shared by several workers: this process's id in change_log, and how to read and prune it.
        self.writer = writer if dialect != "postgresql" else None
        self._poller, self._pruner = poller, pruner
        self._last: int | None = None
        self._polled_at: float | None = None  # monotonic start of the last successful poll
        self._listening = dialect != "postgresql" and self.writer is None
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self.caches: list[Any] = []  # gateway.store.cache.Cache instances fed by this feed (for metrics)
        self.received = 0
        self.reconnects = 0

    @property
    def live(self) -> bool:
        """True while every change made anywhere reaches this replica."""
        if self.writer is not None:
            return self._polled_at is not None and time.monotonic() - self._polled_at < STALE_BOUND_SECONDS
        return self._listening

    @property
    def serving(self) -> bool:
        """True while caches may answer from what they hold: the feed is live, or was lost
        less than ``stale_seconds`` ago (nothing is stored meanwhile). SQLite workers: no stale window past STALE_BOUND_SECONDS."""
        if self.writer is not None:
            return self.live
        if self._listening:
            return True
        if self._lost_at is None:
            return False
        if time.monotonic() - self._lost_at < self._stale:
            return True
        self._lost_at = None
        self._flush_everything()
        return False

    def subscribe(self, topic: str, subscriber: Subscriber) -> None:
        if topic not in TOPICS:
            raise ValueError(f"unknown change topic {topic!r}")
        self._subscribers[topic].append(subscriber)

    def deliver(self, topic: str, key: str | None) -> None:
        for subscriber in self._subscribers.get(topic, ()):
            try:
                subscriber(key)
            except Exception as exc:  # one bad subscriber must not starve the others
                log.error("change subscriber for %s failed (%s)", topic, type(exc).__name__)

    def deliver_all(self, changes: list[tuple[str, str | None]]) -> None:
        for topic, key in changes:
            self.deliver(topic, key)

    def _flush_everything(self) -> None:
        for cache in self.caches:
            cache.invalidate()
        for topic in TOPICS:
            self.deliver(topic, None)

    # --- the listener (PostgreSQL) ------------------------------------------

    async def start(self, timeout: float = 10.0) -> None:
        """Start listening; returns once the first LISTEN is in place (or ``timeout`` passed).
        SQLite workers: start polling from the newest change row now."""
        if self.writer is not None and self._task is None and self._poller is not None:
            started = time.monotonic()
            self._last = (await self._poller(None))[0][0]
            self._polled_at = started
            self._task = asyncio.create_task(self._poll_loop(), name="credgate-changes-poll")
            return
        if self._dialect != "postgresql" or self._task is not None:
            return
        self._task = asyncio.create_task(self._run(), name="credgate-changes")
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._ready.wait(), timeout)

    async def _run(self) -> None:
        import psycopg

        conninfo = make_url(self._url).set(drivername="postgresql").render_as_string(hide_password=False)
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    conninfo, autocommit=True, application_name=LISTENER_NAME, **self._connect_args
                ) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    # Anything noted while we were deaf is unknown: start from empty caches.
                    self._flush_everything()
                    self._lost_at = None
                    self._listening = True
                    self._ready.set()
                    log.info("listening for changes")
                    while True:
                        async for n in conn.notifies(timeout=HEARTBEAT_SECONDS):
                            self.received += 1
                            self._on_payload(n.payload)
                        # Quiet for a while: make sure the connection is still there.
                        await conn.execute("SELECT 1")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._listening:
                    log.warning("lost the change listener (%s); caches serve what they hold for %gs at most, "
                                "then are bypassed until it is back", type(exc).__name__, self._stale)
            if self._listening and self._stale > 0:
                self._lost_at = time.monotonic()  # what is cached serves a little longer
            elif self._lost_at is None:
                self._flush_everything()
            self._listening = False
            self.serving  # noqa: B018 - ends the stale window (and flushes) once it has passed
            self.reconnects += 1
            await asyncio.sleep(self._retry)

    # --- the poller (SQLite, several workers) -----------------------------------

    async def _poll_loop(self) -> None:
        assert self._poller is not None
        pruned = time.monotonic()
        while True:
            await asyncio.sleep(POLL_SECONDS)
            started = time.monotonic()
            try:
                rows = await self._poller(self._last)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the caches stop answering STALE_BOUND_SECONDS after the last poll
                _poll_log.emit(type(exc).__name__, "can't read the change log (%s); caches are bypassed until "
                               "it can", type(exc).__name__)
                continue
            if self._polled_at is None or started - self._polled_at > PRUNE_AFTER_SECONDS / 2:
                self._flush_everything()  # rows this worker never read may have been pruned meanwhile
            for row_id, topic, key, writer in rows:
                self._last = row_id
                if writer != self.writer:  # this process delivered its own right after the commit
                    self.received += 1
                    if topic in TOPICS:
                        self.deliver(topic, key)
            self._polled_at = started
            if self._pruner is not None and started - pruned > _PRUNE_EVERY:
                pruned = started
                try:
                    await self._pruner()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - the next round tries again
                    _poll_log.emit("prune", "can't prune the change log (%s)", type(exc).__name__)

    def _on_payload(self, payload: str) -> None:
        try:
            msg: Any = json.loads(payload)
            topic, key = msg["t"], msg.get("k")
        except (ValueError, KeyError, TypeError):
            log.warning("ignored a malformed change notification")
            return
        if topic in TOPICS:
            self.deliver(topic, key if isinstance(key, str) else None)

    async def aclose(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        self._listening = self._dialect != "postgresql" and self.writer is None
        self._polled_at = None
