"""The change feed (gateway/store/changes.py) and the caches it keeps honest (gateway/store/cache.py).

The PostgreSQL tests use two Store objects on one database, each with its own
listener, as two replicas would; the listener is killed with
pg_terminate_backend to show that caches stop serving until it is back.
"""

from __future__ import annotations

import asyncio
import time

import psycopg
import pytest
from sqlalchemy import text

from gateway.store import changes
from gateway.store.cache import MISSING, Cache
from gateway.store.changes import LISTENER_NAME
from gateway.store import Store


class Feed:
    def __init__(self, live: bool = True) -> None:
        self.live = live
        self.caches: list = []

    @property
    def serving(self) -> bool:
        return self.live


def test_cache_serves_until_invalidated_and_never_stores_a_stale_load() -> None:
    cache: Cache[str, int] = Cache("t", Feed())
    value, gen = cache.lookup("a")
    assert value is MISSING
    cache.store("a", 1, gen)
    assert cache.lookup("a")[0] == 1
    assert (cache.hits, cache.misses) == (1, 1)

    # A load that began before an invalidation is not stored.
    _, gen = cache.lookup("b")
    cache.invalidate("a")
    cache.store("b", 2, gen)
    assert cache.lookup("b")[0] is MISSING
    assert cache.lookup("a")[0] is MISSING


def test_cache_entries_expire_and_the_oldest_is_evicted() -> None:
    cache: Cache[str, int] = Cache("t", Feed(), ttl=60, max_entries=2)
    cache.store("gone", 0, cache.generation, expires_at=time.monotonic() - 1)
    assert cache.lookup("gone")[0] is MISSING
    for key in ("x", "y"):
        cache.store(key, 1, cache.generation)
    cache.lookup("x")  # x is now the most recently used
    cache.store("z", 1, cache.generation)
    assert cache.lookup("y")[0] is MISSING and cache.lookup("x")[0] == 1 and cache.lookup("z")[0] == 1


def test_cache_is_bypassed_while_the_feed_is_not_live() -> None:
    feed = Feed()
    cache: Cache[str, int] = Cache("t", feed)
    cache.store("a", 1, cache.generation)
    feed.live = False
    assert cache.lookup("a")[0] is MISSING
    cache.store("b", 2, cache.generation)
    feed.live = True
    assert cache.lookup("b")[0] is MISSING  # nothing was stored while deaf
    assert feed.caches == [cache]


async def _wait_for(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.01)
    return predicate()


async def test_a_committed_change_reaches_the_other_replica_and_a_rolled_back_one_does_not(postgres_url: str) -> None:
    a, b = Store(postgres_url), Store(postgres_url)
    try:
        await a.changes.start()
        await b.changes.start()
        assert a.changes.live and b.changes.live
        heard_a: list = []
        heard_b: list = []
        a.changes.subscribe("secret", heard_a.append)
        b.changes.subscribe("secret", heard_b.append)

        with pytest.raises(RuntimeError):
            async with a.write() as s:
                await changes.note(s, "secret", "local/rolled-back")
                raise RuntimeError("abort")
        async with a.write() as s:
            await changes.note(s, "secret", "local/committed")
            # Not before the commit, not even in this process.
            assert heard_a == [] and heard_b == []
        assert heard_a[0] == "local/committed"  # in-process, before write() returned
        started = time.monotonic()
        assert await _wait_for(lambda: "local/committed" in heard_b, 1.0)
        assert time.monotonic() - started < 1.0
        await asyncio.sleep(0.2)
        assert "local/rolled-back" not in heard_a + heard_b
    finally:
        await a.aclose()
        await b.aclose()


async def kill_listener(store: Store) -> int:
    """Terminate the store's change listener (its session, as a store restart would); how many were."""
    async with store.engine.connect() as conn:
        return (await conn.execute(text(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = :n AND datname = current_database()"), {"n": LISTENER_NAME})).scalar()


async def listening_with_k(store: Store) -> tuple[Cache[str, str], list]:
    """The feed started, a cache holding k=v, and the list of what policy subscribers heard."""
    await store.changes.start()
    cache: Cache[str, str] = Cache("t", store.changes)
    flushed: list = []
    store.changes.subscribe("policy", flushed.append)
    cache.store("k", "v", cache.generation)
    return cache, flushed


async def test_caches_stop_serving_while_the_listener_is_down_and_start_empty_after(postgres_url: str) -> None:
    store = Store(postgres_url)
    try:
        cache, flushed = await listening_with_k(store)
        assert cache.lookup("k")[0] == "v"

        assert await kill_listener(store) == 1
        assert await _wait_for(lambda: not store.changes.live)
        assert cache.lookup("k")[0] is MISSING  # bypassed while deaf
        assert None in flushed  # every subscriber was told to drop everything

        assert await _wait_for(lambda: store.changes.live)  # reconnected
        assert cache.lookup("k")[0] is MISSING  # and it starts empty
        assert store.changes.reconnects >= 1
    finally:
        await store.aclose()


async def test_with_a_stale_window_caches_serve_what_they_hold_for_that_long_and_no_longer(postgres_url: str) -> None:
    """cache_stale_seconds: a lost listener (as in a store outage) leaves what is cached
    answering for the window, nothing new is stored, and past it everything is dropped."""
    store = Store(postgres_url, stale_seconds=1.5)
    try:
        cache, flushed = await listening_with_k(store)
        store.changes._retry = 30  # no reconnect during the test: only the window may drop "k"
        assert await kill_listener(store) == 1
        assert await _wait_for(lambda: not store.changes.live)
        lost = time.monotonic()
        assert cache.lookup("k")[0] == "v" and flushed == []  # still served inside the window
        cache.store("new", "x", cache.generation)
        assert cache.lookup("new")[0] is MISSING  # nothing stored while deaf
        assert await _wait_for(lambda: cache.lookup("k")[0] is MISSING)
        assert time.monotonic() - lost >= 1.0  # not before the window ran out
        assert None in flushed and not store.changes.live  # dropped by the window, not a reconnect
    finally:
        await store.aclose()


def test_a_notification_payload_carries_names_not_values(postgres_url: str) -> None:
    """What other replicas hear is the topic and key, nothing else."""
    import json

    plain = postgres_url.replace("postgresql+psycopg://", "postgresql://", 1)

    async def scenario() -> list[str]:
        store = Store(postgres_url)
        try:
            async with await psycopg.AsyncConnection.connect(plain, autocommit=True) as listener:
                await listener.execute(f"LISTEN {changes.CHANNEL}")
                async with store.write() as s:
                    await changes.note(s, "connector", "vendor")
                    await changes.note(s, "secret", "x" * 9000)  # too long for NOTIFY: becomes "everything"
                got = []
                async for n in listener.notifies(timeout=2, stop_after=2):
                    got.append(n.payload)
                return got
        finally:
            await store.aclose()

    payloads = asyncio.run(scenario())
    assert [json.loads(p) for p in payloads] == [{"t": "connector", "k": "vendor"}, {"t": "secret", "k": None}]


async def test_a_second_gateway_process_on_one_sqlite_file_is_refused(tmp_path) -> None:
    """Caches hear only their own process's changes on SQLite: one process per file."""
    from gateway.errors import ConfigurationError

    url = f"sqlite:///{tmp_path / 'store.db'}"
    first, second = Store(url), Store(url)
    try:
        first.claim_sole_use()
        with pytest.raises(ConfigurationError, match="PostgreSQL"):
            second.claim_sole_use()
        await first.aclose()  # the lock goes with the first
        second.claim_sole_use()
    finally:
        await first.aclose()
        await second.aclose()
