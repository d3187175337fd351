"""How soon another replica hears of a change: two Stores (each with its own LISTEN
connection, as two replicas have) on one fresh PostgreSQL database; one commits 50 changes,
the other records when each arrives. Prints the delay after the writer's commit returned.

    .venv/bin/python bench/notify_latency.py   [BENCH_POSTGRES_URL=postgresql://postgres@127.0.0.1:5432]
"""

from __future__ import annotations

import asyncio
import os
import secrets
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psycopg  # noqa: E402

from gateway.store import changes  # noqa: E402
from gateway.store import Store  # noqa: E402

PG_BASE = os.environ.get("BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432")
N = 50


async def measure(url: str) -> list[float]:
    writer, other = Store(url), Store(url)
    try:
        await writer.changes.start()
        await other.changes.start()
        heard: dict[str | None, float] = {}
        other.changes.subscribe("policy", lambda key: heard.setdefault(key, time.perf_counter()))
        delays = []
        for i in range(N):
            async with writer.write() as s:
                await changes.note(s, "policy", f"p{i}")
            committed = time.perf_counter()
            while f"p{i}" not in heard:
                await asyncio.sleep(0.0005)
            delays.append((heard[f"p{i}"] - committed) * 1000)
        return sorted(delays)
    finally:
        await writer.aclose()
        await other.aclose()


def main() -> None:
    name = "credgate_bench_notify_" + secrets.token_hex(4)
    with psycopg.connect(f"{PG_BASE}/postgres", autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    try:
        delays = asyncio.run(measure(f"{PG_BASE}/{name}"))
    finally:
        with psycopg.connect(f"{PG_BASE}/postgres", autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    print(f"{N} changes: the other replica heard each {statistics.median(delays):.2f} ms (median), "
          f"{delays[-1]:.2f} ms (max) after the writer's commit returned (negative: before it returned)")


if __name__ == "__main__":
    main()
