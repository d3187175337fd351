"""A private redis-server on a free port, for a test that must own every ACL user on its
Redis (the shared one on 6379 is written by other test files running at the same time)."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator

from tests.services.pgcluster import free_port


@contextlib.contextmanager
def private_redis(*extra: str) -> Iterator[str]:
    """Start ``redis-server`` (no persistence, loopback only, ``extra`` arguments appended);
    yield its URL; stop it. Skips (or fails under CREDGATE_REQUIRE_SERVICES) without the binary."""
    from tests.conftest import service_missing

    binary = shutil.which("redis-server")
    if binary is None:
        service_missing("redis-server", "not installed")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        import redis

        for _ in range(250):
            try:
                redis.Redis(port=port, socket_timeout=1).ping()
                break
            except redis.ConnectionError:
                time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)
