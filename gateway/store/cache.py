"""Small in-process caches for the request path, kept honest by the change feed.

A :class:`Cache` maps a key to a value until the entry's own expiry, until
:meth:`Cache.invalidate` drops it, or until it is evicted (least recently
used first, past ``max_entries``). It only stores while its
:class:`~gateway.store.changes.Changes` feed is live, and only serves while the
feed is :attr:`~gateway.store.changes.Changes.serving`: when the feed has lost
its PostgreSQL listener (so another replica's change might go unheard), what is
held still answers for the feed's bounded staleness (``cache_stale_seconds``:
a store outage does not fail what is cached at once), and past it every lookup
misses and the caller reads the store as if there were no cache.

A load that started before an invalidation must not store what it read:
``lookup`` returns the cache's generation, and ``store`` ignores a value
loaded under an older one.

Values are whatever the caller keeps (a principal, a compiled connector's
inputs); keys that derive from a secret (a bearer token) are hashed by the
caller first. Hit and miss counts are exported as
``credgate_cache_lookups_total{cache,result}``.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Generic, Protocol, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

MISSING: Any = object()


class Feed(Protocol):
    caches: list[Any]

    @property
    def live(self) -> bool: ...

    @property
    def serving(self) -> bool: ...


class Cache(Generic[K, V]):
    def __init__(self, name: str, feed: Feed, *, ttl: float | None = None, max_entries: int = 10_000) -> None:
        self.name = name
        self._feed = feed
        self._ttl = ttl
        self._max = max_entries
        self._entries: OrderedDict[K, tuple[float, V]] = OrderedDict()
        self.generation = 0
        self.hits = 0
        self.misses = 0
        feed.caches.append(self)

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, key: K) -> tuple[V, int]:
        """``(value, generation)``; value is :data:`MISSING` on a miss."""
        if self._feed.serving:
            entry = self._entries.get(key)
            if entry is not None:
                if entry[0] > time.monotonic():
                    self._entries.move_to_end(key)
                    self.hits += 1
                    return entry[1], self.generation
                del self._entries[key]
        self.misses += 1
        return MISSING, self.generation

    def store(self, key: K, value: V, generation: int, *, expires_at: float | None = None) -> None:
        """Keep ``value`` until ``expires_at`` (monotonic) or the cache's TTL, whichever is first."""
        if generation != self.generation or not self._feed.live:
            return
        until = time.monotonic() + self._ttl if self._ttl is not None else float("inf")
        if expires_at is not None:
            until = min(until, expires_at)
        self._entries[key] = (until, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    async def get(self, key: K, load: Callable[[], Awaitable[V]]) -> V:
        value, gen = self.lookup(key)
        if value is MISSING:
            value = await load()
            self.store(key, value, gen)
        return value

    def invalidate(self, key: K | None = None) -> None:
        """Drop one key, or everything (``None``); loads in flight won't be stored."""
        self.generation += 1
        if key is None:
            self._entries.clear()
        else:
            self._entries.pop(key, None)

    def invalidate_where(self, predicate: Callable[[K, V], bool]) -> None:
        self.generation += 1
        for key in [k for k, (_, v) in self._entries.items() if predicate(k, v)]:
            del self._entries[key]
