"""A renewable credential (postgres, against a real PostgreSQL cluster) is renewed in the
background, keeping its lease and its login, until the lease's maximum lifetime: then it
is re-issued."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator

import pytest

from gateway.client import Client, PostgresCredential
from tests.client.common import lease, put, start_server
from tests.gateway.test_cli import Server


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, pg_cluster) -> Iterator[tuple[Server, str]]:
    import psycopg

    db = "client_" + secrets.token_hex(3)
    with psycopg.connect(pg_cluster.dsn(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    try:
        for srv in start_server(tmp_path_factory, "client-pg"):
            put(srv, "/v1/secrets/local/client/pg", {"data": {"dsn": pg_cluster.dsn()}})
            put(srv, "/v1/connectors/pg", {"type": "postgres", "auth_method": "password", "secret": "local/client/pg",
                                           "resources": [db], "max_ttl_seconds": 9})
            yield srv, db
    finally:
        with psycopg.connect(pg_cluster.dsn(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def test_renewed_in_the_background_then_reissued_at_the_lease_cap(gw: tuple[Server, str]) -> None:
    import psycopg

    srv, db = gw
    ttl, margin = 3, 0.5
    with Client(srv.addr, token=srv.token, margin=margin) as c:
        first = c.credentials("pg", db, ttl=ttl)
        assert isinstance(first, PostgresCredential) and first.renewable and first.database == db
        with psycopg.connect(first.dsn, connect_timeout=5) as conn:
            assert conn.execute("SELECT current_user").fetchone()[0] == first.username
        leases: dict[str, list[float]] = {}
        end = time.monotonic() + 13
        while time.monotonic() < end:
            cred = c.credentials("pg", db, ttl=ttl)
            assert cred.remaining() > margin
            leases.setdefault(cred.lease_id, []).append(cred.expires_at.timestamp())
            time.sleep(0.05)
        stats = c.stats
        # renewed: the first lease lived past its first expiry, with the same login
        assert max(leases[first.lease_id]) > first.expires_at.timestamp() + 1
        assert stats["renewals"] >= 2 and stats["misses"] <= 2, stats  # served from the cache
        # the lease's maximum lifetime (9 s) ended the renewals: a new lease was issued
        assert len(leases) >= 2 and stats["reissues"] >= 1, (len(leases), stats)
        latest = c.credentials("pg", db, ttl=ttl)
        with psycopg.connect(latest.dsn, connect_timeout=5) as conn:
            assert conn.execute("SELECT 1").fetchone()[0] == 1
    assert lease(srv, latest.lease_id)["state"] == "revoked"  # close() revoked it: the role is gone
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(latest.dsn, connect_timeout=5).close()
