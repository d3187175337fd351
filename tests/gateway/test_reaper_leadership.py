"""A reaper leader that stops without dying is replaced, and can't act when it comes back.

Two real ``credgate serve`` replicas on one PostgreSQL store, reaper every 0.2 s,
leader lease (``reaper_leader_ttl_seconds``) 2 s. The leader is SIGSTOPped: it keeps
its PostgreSQL sessions (and the advisory lock), yet the other replica takes over within
the documented bound (ttl + one heartbeat, plus the HTTP poll), expires a 2 s static
lease and revokes a 2 s PostgreSQL lease (its role is gone at the target);
the stopped one, SIGCONTed, logs that it lost leadership, records nothing for that lease,
and the pair converges on one leader. A unit-level test shows the fence itself: a
replica whose epoch was taken over has its transitions refused in the store.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from gateway.crypto.keyring import new_key_file
from tests.services.waiting import clean_env, free_port, wait_until_serving
from tests.gateway.test_revocation_races import pg_db  # noqa: F401 - the target database fixture

CREDGATE = str(Path(sys.executable).parent / "credgate")
TOKEN = "cgt_leadership-test-admin-token-" + "l" * 20
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
INTERVAL = 0.2
TTL = 2.0
# Documented bound on a takeover: ttl + one heartbeat (min(interval, ttl/3)) + a store round trip.
BOUND = TTL + min(INTERVAL, TTL / 3)


def start(tmp: Path, name: str, db_url: str, kek: Path) -> tuple[subprocess.Popen, str, Path]:
    port = free_port()
    env = clean_env(
        CREDGATE_DATABASE_URL=db_url,
        CREDGATE_KEK_FILE=str(kek),
        CREDGATE_BOOTSTRAP_TOKEN=TOKEN,
        CREDGATE_REAPER_INTERVAL_SECONDS=str(INTERVAL),
        CREDGATE_REAPER_LEADER_TTL_SECONDS=str(TTL),
        CREDGATE_PUBLIC_URL="http://credgate.test",
    )
    log = tmp / f"{name}.log"
    proc = subprocess.Popen(
        [CREDGATE, "serve", "--data-dir", str(tmp / name), "--port", str(port)],
        stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
    )
    addr = f"http://127.0.0.1:{port}"
    wait_until_serving(f"{addr}/readyz", proc)
    return proc, addr, log


def leader(addr: str) -> bool:
    r = httpx.get(f"{addr}/v1/leases/summary", headers=ADMIN, timeout=5)
    r.raise_for_status()
    return r.json()["reaper_leader"]


def wait_for(predicate, timeout: float, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def role_exists(cluster, name: str) -> bool:
    import psycopg

    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        return conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone() is not None


def test_a_stopped_leader_is_replaced_and_harmless_when_it_resumes(
    tmp_path: Path, postgres_url: str, pg_cluster, pg_db: str
) -> None:
    from connectors.base import role_name

    kek = tmp_path / "kek"
    new_key_file(kek)
    a, addr_a, log_a = start(tmp_path, "a", postgres_url, kek)
    b, addr_b, log_b = start(tmp_path, "b", postgres_url, kek)
    procs = [a, b]
    stopped = None
    try:
        assert wait_for(lambda: [leader(addr_a), leader(addr_b)].count(True) == 1, 5)
        first, second = ((a, addr_a, log_a), (b, addr_b, log_b)) if leader(addr_a) else ((b, addr_b, log_b), (a, addr_a, log_a))
        old, old_addr, old_log = first
        _, new_addr, new_log = second
        with httpx.Client(headers=ADMIN, timeout=10) as c:
            assert c.put(f"{new_addr}/v1/secrets/local/lead/x", json={"data": {"k": "v"}}).status_code == 200
            assert c.put(f"{new_addr}/v1/connectors/vendor", json={
                "type": "static", "auth_method": "static", "secret": "local/lead/x", "resources": ["default"]},
            ).status_code in (200, 201)
            assert c.put(f"{new_addr}/v1/secrets/local/lead/pg", json={"data": {"dsn": pg_cluster.dsn()}}).status_code == 200
            assert c.put(f"{new_addr}/v1/connectors/pg", json={
                "type": "postgres", "auth_method": "password", "secret": "local/lead/pg", "resources": [pg_db]},
            ).status_code in (200, 201)

            # Freeze the leader: its process and sessions stay, it just stops running.
            old.send_signal(signal.SIGSTOP)
            stopped = old
            frozen_at = time.monotonic()
            issued = c.post(f"{new_addr}/v1/credentials",
                            json={"connector": "vendor", "resource": "default", "ttl_seconds": 2, "wrap": True})
            assert issued.status_code == 200, issued.text
            lease_id = issued.json()["lease_id"]
            pg = c.post(f"{new_addr}/v1/credentials", json={"connector": "pg", "resource": pg_db, "ttl_seconds": 2})
            assert pg.status_code == 200, pg.text
            pg_lease = pg.json()["lease_id"]
            assert role_exists(pg_cluster, role_name(pg_lease))

            # The other replica takes over within the bound (plus the polling round trip).
            assert wait_for(lambda: leader(new_addr), BOUND + 1.0), "no takeover from a stopped leader"
            took = time.monotonic() - frozen_at
            # ... and ends the 2 s lease although the old leader still holds its advisory lock.
            assert wait_for(lambda: c.get(f"{new_addr}/v1/leases/{lease_id}").json()["state"] == "expired", 5)
            # ... and the 2 s PostgreSQL lease: revoked, its role gone at the target.
            assert wait_for(lambda: c.get(f"{new_addr}/v1/leases/{pg_lease}").json()["state"] == "revoked", 5)
            assert not role_exists(pg_cluster, role_name(pg_lease))
            assert "this replica now runs the reaper (epoch" in new_log.read_text()

            # Revive the old leader: it finds its leadership lost and does not act on it.
            old.send_signal(signal.SIGCONT)
            stopped = None
            assert wait_for(lambda: "lost reaper leadership" in old_log.read_text(), 5), old_log.read_text()
            assert wait_for(lambda: not leader(old_addr), 2)
            time.sleep(INTERVAL * 5)  # let the revived replica run several ticks: it must do nothing
            assert leader(new_addr) and not leader(old_addr)  # one leader
            events = c.get(f"{new_addr}/v1/audit", params={"lease_id": lease_id, "action": "leases:expire"}).json()
            assert [e["outcome"] for e in events["items"]] == ["expired"]  # one expiry, by the new leader
            revoked = c.get(f"{new_addr}/v1/audit", params={"lease_id": pg_lease, "action": "leases:revoke"}).json()
            assert [e["outcome"] for e in revoked["items"]] == ["revoked"]  # one revocation, no failed attempt
            assert "reaper: expired=1" in new_log.read_text()
            assert "reaper: " not in old_log.read_text()  # the revived replica did nothing as the reaper
            metrics = c.get(f"{new_addr}/metrics").text
            assert "credgate_reaper_leader 1.0" in metrics
            assert "credgate_reaper_takeovers_total 1.0" in metrics
        print(f"takeover after SIGSTOP: {took:.2f}s (bound {BOUND:.2f}s + poll)")
    finally:
        if stopped is not None:
            stopped.send_signal(signal.SIGCONT)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(timeout=20)


@pytest.fixture
def store_url(postgres_url: str) -> str:
    return postgres_url


async def test_a_stale_epoch_is_fenced_out(gateway, postgres_url: str) -> None:
    """The fence: once another replica has taken the leadership row (a new epoch), this
    replica's reaper writes match nothing, its revocation batch is refused, and its next
    heartbeat drops leadership."""
    rt = gateway.runtime
    reaper = rt.reaper
    reaper.leader_ttl = 30.0
    await reaper.heartbeat()
    assert reaper.is_leader and reaper.epoch == 1
    c = gateway.client
    assert (await c.put("/v1/secrets/local/f/x", json={"data": {"k": "v"}})).status_code == 200
    assert (await c.put("/v1/connectors/vendor", json={
        "type": "static", "auth_method": "static", "secret": "local/f/x", "resources": ["default"]})).status_code in (200, 201)
    lease_id = (await c.post("/v1/credentials", json={"connector": "vendor", "resource": "default", "wrap": True})).json()["lease_id"]
    # Another replica takes over (its epoch 2), as it would after this one froze past its lease.
    async with rt.store.engine.begin() as conn:
        await conn.execute(text("UPDATE reaper_leadership SET holder = 'other', epoch = epoch + 1"))
        await conn.execute(text("UPDATE leases SET expires_at = now() - interval '1 second' WHERE id = :id"),
                           {"id": lease_id})
    assert reaper.is_leader  # its local deadline has not passed: only the store can tell
    assert not await reaper.still_leading()  # the revocation batch's fence check
    assert not await reaper.transition(lease_id, ("active",), "expired")  # the fenced write
    done = await reaper.tick()
    assert done["expired"] == 0 and done["to_revoke"] == 0
    assert (await c.get(f"/v1/leases/{lease_id}")).json()["state"] == "active"
    await reaper.heartbeat()  # the renewal finds the epoch taken
    assert not reaper.is_leader and reaper.epoch is None
    # Once the other stops renewing, this replica takes over again (epoch 3) and the write goes through.
    async with rt.store.engine.begin() as conn:
        await conn.execute(text("UPDATE reaper_leadership SET renewed_until = now() - interval '1 second'"))
    await reaper.heartbeat()
    assert reaper.epoch == 3
    done = await reaper.tick()
    assert done["expired"] == 1
    assert (await c.get(f"/v1/leases/{lease_id}")).json()["state"] == "expired"
