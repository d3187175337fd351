"""Token-bucket rate limits per client address, per principal and per (principal, action).

Buckets live in process memory (limits are per replica; behind a load
balancer with N replicas a caller gets up to N times the rate). The number of
buckets is capped (least recently used evicted) so a flood of distinct keys
can't grow memory without bound.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass

from gateway.errors import TooManyRequests


class RateLimited(TooManyRequests):

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = max(1, math.ceil(retry_after))


@dataclass(frozen=True)
class Limit:
    rate: float  # tokens per second
    burst: float  # bucket size


class Limiter:
    def __init__(self, *, max_buckets: int = 100_000) -> None:
        self._buckets: OrderedDict[tuple, tuple[float, float]] = OrderedDict()
        self._max = max_buckets

    def check(self, key: tuple, limit: Limit | None, what: str) -> None:
        """Take one token from ``key``'s bucket, or raise RateLimited with a Retry-After."""
        if limit is None or limit.rate <= 0:
            return
        now = time.monotonic()
        tokens, last = self._buckets.pop(key, (limit.burst, now))
        tokens = min(limit.burst, tokens + (now - last) * limit.rate)
        if tokens < 1:
            self._buckets[key] = (tokens, now)
            raise RateLimited(f"Too many requests {what}; slow down.", (1 - tokens) / limit.rate)
        self._buckets[key] = (tokens - 1, now)
        if len(self._buckets) > self._max:
            self._buckets.popitem(last=False)
