"""The async engine and its sessions, on SQLite (embedded) or PostgreSQL.

``Store.read()`` gives a session for queries; ``Store.write()`` gives one
inside a transaction that is committed (durably: SQLite runs with
``synchronous=FULL``) before the block returns, so a caller acknowledges a
change only after it is on disk. On SQLite a write transaction starts with
``BEGIN IMMEDIATE`` so two writers queue on the busy timeout instead of
failing on a lock upgrade.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import secrets
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, delete, event, func, select, text
from sqlalchemy.engine import ExceptionContext, make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from gateway.store.changes import Changes, committed, rows_info
from gateway.errors import ConfigurationError, StoreUnavailable
from gateway.throttle import LogThrottle

log = logging.getLogger("credgate.store")
_IMMEDIATE = "credgate_sqlite_immediate"
T = TypeVar("T")


def async_url(url: str) -> str:
    """Pick the async driver for a plain URL (``sqlite://``, ``postgresql://``)."""
    u = make_url(url)
    if u.drivername in ("sqlite", "sqlite+pysqlite"):
        u = u.set(drivername="sqlite+aiosqlite")
    elif u.drivername in ("postgresql", "postgres", "postgresql+psycopg2", "postgresql+asyncpg"):
        u = u.set(drivername="postgresql+psycopg")
    if u.drivername not in ("sqlite+aiosqlite", "postgresql+psycopg"):
        raise ConfigurationError(
            f"unsupported database URL scheme {u.drivername!r}: use sqlite:///FILE or postgresql://..."
        )
    return u.render_as_string(hide_password=False)


def sync_url(url: str) -> str:
    u = make_url(async_url(url))
    if u.drivername == "sqlite+aiosqlite":
        u = u.set(drivername="sqlite")
    return u.render_as_string(hide_password=False)


def _sqlite_setup(sync_engine: Engine) -> None:
    @event.listens_for(sync_engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control away from the driver so BEGIN is ours.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        for pragma in (
            "journal_mode=WAL",
            "synchronous=FULL",
            "foreign_keys=ON",
            "busy_timeout=10000",
            "secure_delete=ON",
        ):
            cur.execute(f"PRAGMA {pragma}")
        cur.close()

    @event.listens_for(sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(_IMMEDIATE) else "BEGIN")


def insert_if_absent(dialect: str, model: Any, values: dict[str, Any], keys: list[str]) -> Any:
    """``INSERT ... ON CONFLICT DO NOTHING`` for either dialect: creation that
    can't race with a concurrent creation of the same row."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert(model).values(**values).on_conflict_do_nothing(index_elements=keys)


def _settle(future: asyncio.Future[Any], result: Any = None, *, exc: BaseException | None = None) -> None:
    if future.done():  # its caller was cancelled
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


def _flock(path: str) -> int | None:
    """An owner-only lock file's descriptor, exclusively locked (the kernel frees it with the
    process); None when another process holds it."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _lock_sqlite(url: str) -> int | None:
    """The descriptor holding the exclusive lock of a SQLite store's file (None: not a SQLite
    file, or its folder doesn't exist yet); ConfigurationError if another process holds it."""
    u = make_url(async_url(url))
    db = u.database
    if u.get_backend_name() != "sqlite" or not db or db == ":memory:" or not Path(db).parent.is_dir():
        return None
    fd = _flock(f"{db}.lock")
    if fd is None:
        raise ConfigurationError(
            f"another credgate process is serving the SQLite store {db}; one process per SQLite file "
            "(run several replicas on PostgreSQL: CREDGATE_DATABASE_URL=postgresql://...)"
        )
    return fd


def hold_sole_use(url: str) -> int | None:
    """The lock of a SQLite store (its folder made first), for ``credgate serve --workers N``'s
    parent to hold for its workers (:meth:`Store.claim_sole_use` with ``shared``)."""
    u = make_url(async_url(url))
    if u.get_backend_name() == "sqlite" and u.database and u.database != ":memory:":
        Path(u.database).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    return _lock_sqlite(url)


def check_sole_use(url: str) -> None:
    """Raise ConfigurationError now if another process serves this SQLite store (``credgate
    serve`` asks before it starts, to fail in one line; the store takes the lock itself)."""
    fd = _lock_sqlite(url)
    if fd is not None:
        os.close(fd)


# SQLSTATEs that mean "the store can't serve right now" although the driver files them
# under another class: a read-only transaction (a standby after a failover) and a server
# shutting down or starting (57P0x). Class 08 (connection), 53 (resources: disk full,
# too many connections) and 57014 (statement timeout) are OperationalErrors already.
_OUTAGE_SQLSTATES = frozenset({"25006", "57P01", "57P02", "57P03"})
_SQLITE_REASONS = {
    "SQLITE_READONLY": "the database file or its directory is read-only",
    "SQLITE_FULL": "the disk is full",
    "SQLITE_IOERR": "an I/O error",
    "SQLITE_CANTOPEN": "the database file can't be opened",
    "SQLITE_BUSY": "the database stayed locked past the busy timeout",
    "SQLITE_LOCKED": "the database stayed locked past the busy timeout",
}
# At most one "store failing" line per reason this often, with a count of the rest.
_outage_log = LogThrottle(log, seconds=10.0)


def outage_reason(exc: BaseException) -> str | None:
    """Why ``exc`` (a driver or SQLAlchemy error) means the store is unavailable, in words
    safe to log (an error class, SQLSTATE or SQLite code); None when it is not an outage
    (a unique key taken, a bug)."""
    if isinstance(exc, PoolTimeout):
        return "no pooled connection became free in time"
    if not isinstance(exc, DBAPIError):
        return None
    orig = exc.orig
    sqlstate = getattr(orig, "sqlstate", None)
    name = getattr(orig, "sqlite_errorname", None)
    if name:  # SQLite: its primary code names the cause (SQLITE_IOERR_WRITE -> SQLITE_IOERR)
        cause = _SQLITE_REASONS.get("_".join(name.split("_")[:2]))
        return f"{name}: {cause}" if cause else None
    if exc.connection_invalidated or isinstance(exc, OperationalError) or sqlstate in _OUTAGE_SQLSTATES:
        return f"{type(orig).__name__}" + (f" {sqlstate}" if sqlstate else "")
    return None


def _store_outage(ctx: ExceptionContext) -> None:
    """Every store engine's error hook: a failure that means the store is unavailable (see
    :func:`outage_reason`) is raised as :class:`StoreUnavailable`, a 503 with Retry-After on
    every route; the connection is still invalidated by SQLAlchemy when it was dropped. A
    pool pre-ping is left alone: SQLAlchemy then replaces the stale connection itself."""
    if ctx.is_pre_ping or ctx.sqlalchemy_exception is None:
        return
    failed = as_store_unavailable(ctx.sqlalchemy_exception, disconnected=ctx.is_disconnect)
    if failed is not None:
        raise failed


def as_store_unavailable(exc: BaseException, *, disconnected: bool = False) -> StoreUnavailable | None:
    """``exc`` as the 503 it stands for when it means the store is unavailable (logged,
    throttled, by its reason alone), else None. Used by the engines' error hook and for what
    never reaches it (a pool that had no connection free in time)."""
    reason = outage_reason(exc) or ("disconnected" if disconnected else None)
    if reason is None:
        return None
    _outage_log.emit(reason, "the store is failing (%s); requests that need it answer 503 store_unavailable",
                     reason)
    return StoreUnavailable("The gateway's store can't be reached or can't write right now; nothing was written.")


def _postgres_connect_args(connect_timeout: float) -> dict[str, Any]:
    """libpq options bounding how long a dead or black-holed PostgreSQL store can hold a
    request: the connect timeout, TCP keepalives on idle connections, and a TCP user timeout
    (data unacknowledged that long drops the connection)."""
    seconds = max(1, round(connect_timeout))
    return {"connect_timeout": seconds, "keepalives": 1, "keepalives_idle": seconds,
            "keepalives_interval": 1, "keepalives_count": 3, "tcp_user_timeout": seconds * 1000}


def _statement_timeout(sync_engine: Engine, seconds: float) -> None:
    @event.listens_for(sync_engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute(f"SET statement_timeout = {int(seconds * 1000)}")
        cur.close()
        dbapi_conn.commit()


class Store:
    """The store of one gateway process.

    ``shared``: this process is one of the workers of a ``credgate serve --workers N``
    (gateway/cli/workers.py), whose parent holds the SQLite file's lock. On SQLite the
    workers then write the changes they note as ``change_log`` rows the others poll for
    (gateway/store/changes.py), and the reaper leads by a second file lock
    (:meth:`try_lead`). ``max_overflow``: pooled PostgreSQL connections past ``pool_size``
    under bursts."""

    def __init__(self, url: str, *, echo: bool = False, pool_size: int = 20, max_overflow: int = 10,
                 connect_timeout: float = 5.0, statement_timeout: float = 60.0,
                 stale_seconds: float = 0.0, shared: bool = False) -> None:
        self.url = async_url(url)
        self.dialect = make_url(self.url).get_backend_name()
        self.shared = shared
        if self.dialect == "sqlite":
            db = make_url(self.url).database
            if db and db != ":memory:":
                Path(db).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                # Create the file owner-only; SQLite gives its -wal/-shm files the same mode.
                os.close(os.open(db, os.O_CREAT | os.O_RDWR, 0o600))
        kwargs: dict[str, Any] = {"echo": echo}
        pg_connect = _postgres_connect_args(connect_timeout)  # every connection to a PostgreSQL store
        if self.dialect == "postgresql":
            # Connections are kept, not churned: 32 concurrent requests against a pool of 10 (+20
            # overflow) opened ~90 PostgreSQL sessions a second and cost a third of the lease reads' rate.
            kwargs.update(pool_size=pool_size, max_overflow=max_overflow, pool_pre_ping=True, pool_timeout=connect_timeout,
                          connect_args=pg_connect)
        else:
            # Every session and write() ends its own transaction; the pool's extra ROLLBACK on
            # return would be one more hop to aiosqlite's thread per use. Kept, not churned: each
            # aiosqlite connection is a thread of its own, and SQLAlchemy's default 5 (+10 overflow)
            # started and joined a thread and re-ran the connect PRAGMAs for most requests at 32
            # concurrent ones.
            kwargs.update(pool_size=pool_size, max_overflow=10, pool_reset_on_return=None)
        self.engine = create_async_engine(self.url, **kwargs)
        # The group committer's own engine: plain DB-API on one dedicated thread, so a whole
        # group of writes costs one hand-off between threads, not one per statement.
        self._group_engine = create_engine(
            sync_url(self.url), **({"pool_size": 1, "max_overflow": 0, "pool_pre_ping": True,
                                    "pool_timeout": connect_timeout,
                                    "connect_args": pg_connect}
                                   if self.dialect == "postgresql" else
                                   {"pool_reset_on_return": None, "connect_args": {"check_same_thread": False}})
        )
        self._group_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="credgate-group-commit")
        if self.dialect == "sqlite":
            _sqlite_setup(self.engine.sync_engine)
            _sqlite_setup(self._group_engine)
        elif statement_timeout > 0:
            _statement_timeout(self.engine.sync_engine, statement_timeout)
            _statement_timeout(self._group_engine, statement_timeout)
        for engine in (self.engine.sync_engine, self._group_engine):
            event.listen(engine, "handle_error", _store_outage)
        # SQLite shared by workers: changes go through change_log rows, this process's marked as its own.
        writer = f"{os.getpid()}:{secrets.token_hex(4)}" if shared and self.dialect == "sqlite" else None
        self._session_info = rows_info(writer)
        self.changes = Changes(self.url, self.dialect, stale_seconds=stale_seconds,
                               connect_args=pg_connect, writer=writer,
                               poller=self._poll_changes, pruner=self._prune_changes)
        self._leading: int | None = None  # SQLite workers: the reaper leadership lock's descriptor
        self._turns: int | None = None  # SQLite workers: the group committers' turn lock
        if writer is not None:
            db = make_url(self.url).database
            if db and db != ":memory:":
                self._turns = os.open(f"{db}.commit.lock", os.O_CREAT | os.O_RDWR, 0o600)
        self._grouped: list[tuple[Callable[[Session], Any], asyncio.Future[Any]]] = []
        self._grouper: asyncio.Task[None] | None = None
        self._sole_use: int | None = None

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        async with AsyncSession(self.engine, expire_on_commit=False) as session:
            yield session

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncSession]:
        """A session in one transaction, committed when the block exits cleanly.

        Changes noted in it (:func:`gateway.store.changes.note`) reach this process's
        subscribers after the commit, before the block returns."""
        noted: list[tuple[str, str | None]] = []
        async with self.engine.connect() as conn:
            if self.dialect == "sqlite":
                conn = await conn.execution_options(**{_IMMEDIATE: True})
            async with conn.begin():
                session = AsyncSession(bind=conn, expire_on_commit=False, info=dict(self._session_info))
                try:
                    yield session
                    await session.flush()
                    noted = committed(session)
                finally:
                    await session.close()
        if noted:
            self.changes.deliver_all(noted)

    async def grouped(self, work: Callable[[Session], T]) -> T:
        """Run ``work(session)`` in a write transaction shared with other callers' (group commit).

        Works queued while one transaction commits run together in the next, on
        the group committer's thread with a plain (synchronous) session; their
        inserts go out as one multi-row INSERT per table. Every caller returns
        only after the commit that holds its work, so one commit serves many
        requests and each is still durable before it is acknowledged. If the
        shared transaction fails, each work runs again in a transaction of its
        own, so one caller's error (a unique key taken) is that caller's alone.
        ``work`` must only touch the store (others wait for it), must be safe to
        run again from the start, and notes changes with
        :func:`gateway.store.changes.note_sync`.
        """
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._grouped.append((work, future))
        if self._grouper is None or self._grouper.done():
            self._grouper = asyncio.create_task(self._commit_groups(), name="credgate-group-commit")
        return await future

    async def _commit_groups(self) -> None:
        loop = asyncio.get_running_loop()
        while self._grouped:
            batch, self._grouped = self._grouped, []
            try:
                outcomes, noted = await loop.run_in_executor(
                    self._group_thread, self._run_group, [work for work, _ in batch]
                )
            except BaseException as exc:  # noqa: BLE001 - the executor itself failed
                for _, future in batch:
                    _settle(future, exc=exc if isinstance(exc, Exception) else RuntimeError("group commit stopped"))
                if not isinstance(exc, Exception):
                    raise
                continue
            self.changes.deliver_all(noted)
            for (_, future), (ok, value) in zip(batch, outcomes):
                if ok:
                    _settle(future, value)
                else:
                    _settle(future, exc=value)

    def _run_group(self, works: list[Callable[[Session], Any]]) -> tuple[list[tuple[bool, Any]], list[Any]]:
        """On the group committer's thread: all works in one transaction, else each alone."""
        noted: list[Any] = []
        try:
            results = [(True, r) for r in self._run_works(works, noted)]
            return results, noted
        except Exception as exc:  # noqa: BLE001 - find whose it is: one transaction each
            if len(works) == 1:
                return [(False, exc)], []
        outcomes: list[tuple[bool, Any]] = []
        noted = []
        for work in works:
            try:
                outcomes.append((True, self._run_works([work], noted)[0]))
            except Exception as own:  # noqa: BLE001 - this caller's own failure
                outcomes.append((False, own))
        return outcomes, noted

    def _run_works(self, works: list[Callable[[Session], Any]], noted: list[Any]) -> list[Any]:
        if self._turns is not None:
            # SQLite workers: the group committers of the processes take turns by a kernel lock,
            # which wakes the next one the moment it is free; SQLite's busy handler would sleep
            # (up to 100 ms a try) while another process holds the write lock.
            fcntl.flock(self._turns, fcntl.LOCK_EX)
            try:
                return self._run_works_now(works, noted)
            finally:
                fcntl.flock(self._turns, fcntl.LOCK_UN)
        return self._run_works_now(works, noted)

    def _run_works_now(self, works: list[Callable[[Session], Any]], noted: list[Any]) -> list[Any]:
        with self._group_engine.connect() as conn:
            if self.dialect == "sqlite":
                conn = conn.execution_options(**{_IMMEDIATE: True})
            with conn.begin():
                session = Session(bind=conn, expire_on_commit=False, info=dict(self._session_info))
                try:
                    results = [work(session) for work in works]
                    session.flush()
                    pending = committed(session)
                finally:
                    session.close()
        noted.extend(pending)  # only once committed
        return results

    def claim_sole_use(self) -> None:
        """On SQLite, be the only gateway process on this file, or raise ConfigurationError.

        The caches (gateway/store/cache.py) hear of changes made in this process only; a
        second process writing the same file would leave them stale. Several
        replicas share a PostgreSQL database instead. The lock is the kernel's and
        goes with the process, however it ends.

        ``shared`` (a worker of ``credgate serve --workers N``): the parent holds the lock for
        its workers, which poll the change log; a worker finding the lock free (its parent
        gone) refuses to start.
        """
        if self.shared:
            try:
                fd = _lock_sqlite(self.url)
            except ConfigurationError:
                return  # held: by the serve that started this worker
            if fd is not None:
                os.close(fd)
                raise ConfigurationError("this worker's credgate serve no longer holds the SQLite store's lock")
            return
        if self._sole_use is None:
            self._sole_use = _lock_sqlite(self.url)

    def try_lead(self) -> bool:
        """Whether this process may run the reaper now. Always, but for a SQLite worker of
        several: then the one holding ``<file>.reaper.lock`` (kept until it stops or dies;
        the kernel frees it with the process, and the next worker to ask takes it)."""
        if not self.shared or self.dialect != "sqlite":
            return True
        if self._leading is not None:
            return True
        db = make_url(self.url).database
        if not db or db == ":memory:":
            return True
        fd = _flock(f"{db}.reaper.lock")
        if fd is None:
            return False
        self._leading = fd
        return True

    def resign(self) -> None:
        """Give up the reaper leadership :meth:`try_lead` took (a clean stop)."""
        fd, self._leading = self._leading, None
        if fd is not None:
            os.close(fd)

    async def _poll_changes(self, after: int | None) -> list[tuple[int, str, str | None, str]]:
        """The change rows past ``after``, oldest first; ``after`` None: the newest row's id alone."""
        from gateway.store.models import ChangeLogRow

        c = ChangeLogRow.__table__.c
        async with self.read() as s:
            if after is None:
                return [((await s.execute(select(func.max(c.id)))).scalar() or 0, "", None, "")]
            return [tuple(r) for r in await s.execute(  # type: ignore[misc]
                select(c.id, c.topic, c.key, c.writer).where(c.id > after).order_by(c.id))]

    async def _prune_changes(self) -> None:
        from gateway.store.changes import PRUNE_AFTER_SECONDS
        from gateway.store.models import ChangeLogRow, utcnow

        cutoff = utcnow() - timedelta(seconds=PRUNE_AFTER_SECONDS)
        async with self.write() as s:
            await s.execute(delete(ChangeLogRow).where(ChangeLogRow.at < cutoff))

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    def upgrade(self) -> None:
        """Apply Alembic migrations up to head (blocking; call from a thread in async code)."""
        from gateway.store.migrate import upgrade

        upgrade(sync_url(self.url))

    async def aclose(self) -> None:
        await self.changes.aclose()
        if self._grouper is not None:
            await asyncio.gather(self._grouper, return_exceptions=True)
        self._group_thread.shutdown(wait=True)
        if self._turns is not None:
            os.close(self._turns)
            self._turns = None
        self._group_engine.dispose()
        await self.engine.dispose()
        if self._sole_use is not None:
            os.close(self._sole_use)  # releases the lock
            self._sole_use = None
        self.resign()
