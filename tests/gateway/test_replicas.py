"""Two gateway processes on one PostgreSQL database.

Both serve; exactly one runs the reaper (a PostgreSQL advisory lock); when that
process is SIGKILLed the other takes the lock within two reaper intervals; a
policy change or a revocation made through one replica is enforced by the
other within a second.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from gateway.keyring import new_key_file
from tests.gateway.test_cli import clean_env, free_port, wait_until_serving

CREDGATE = str(Path(sys.executable).parent / "credgate")
TOKEN = "cgt_replica-test-admin-token-" + "r" * 20
INTERVAL = 0.5


def start(tmp: Path, name: str, db_url: str, kek: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = clean_env(
        CREDGATE_DATABASE_URL=db_url,
        CREDGATE_KEK_FILE=str(kek),
        CREDGATE_BOOTSTRAP_TOKEN=TOKEN,
        CREDGATE_REAPER_INTERVAL_SECONDS=str(INTERVAL),
        CREDGATE_PUBLIC_URL="http://credgate.test",  # one issuer for both replicas, as behind a load balancer
    )
    proc = subprocess.Popen(
        [CREDGATE, "serve", "--data-dir", str(tmp / name), "--port", str(port)],
        stdout=(tmp / f"{name}.log").open("w"), stderr=subprocess.STDOUT, env=env,
    )
    addr = f"http://127.0.0.1:{port}"
    wait_until_serving(f"{addr}/readyz", proc)
    return proc, addr


def leader(addr: str) -> bool:
    r = httpx.get(f"{addr}/v1/leases/summary", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5)
    return r.json()["reaper_leader"]


def test_two_replicas_share_work_and_fail_over(tmp_path: Path, postgres_url: str) -> None:
    kek = tmp_path / "kek"
    new_key_file(kek)
    a, addr_a = start(tmp_path, "a", postgres_url, kek)
    b, addr_b = start(tmp_path, "b", postgres_url, kek)
    procs = [a, b]
    try:
        time.sleep(INTERVAL * 3)
        leaders = [leader(addr_a), leader(addr_b)]
        assert leaders.count(True) == 1, leaders  # exactly one runs the reaper
        admin = {"Authorization": f"Bearer {TOKEN}"}
        with httpx.Client(headers=admin, timeout=10) as c:
            # Both serve the same store.
            assert c.put(f"{addr_a}/v1/secrets/local/shared/x", json={"data": {"k": "from-a"}}).status_code == 200
            assert c.get(f"{addr_b}/v1/secrets/local/shared/x", params={"reveal": "true"}).json()["data"] == {"k": "from-a"}

            # A revocation through one replica is enforced by the other at once.
            ops = c.post(f"{addr_a}/v1/admin-keys", json={"name": "ops", "role": "operator"}).json()
            assert httpx.get(f"{addr_b}/v1/backends", headers={"Authorization": f"Bearer {ops['token']}"}).status_code == 200
            c.post(f"{addr_a}/v1/admin-keys/{ops['id']}/revoke")
            assert httpx.get(f"{addr_b}/v1/backends", headers={"Authorization": f"Bearer {ops['token']}"}).status_code == 401

            # A policy change through one replica is enforced by the other within a second.
            ask = {"principal": {"issuer": "ci", "subject": "repo:x"}, "action": "secrets:read"}
            assert c.post(f"{addr_b}/v1/policies/explain", json=ask).json()["decision"] == "deny"
            c.put(f"{addr_a}/v1/policies/ci", json={"rules": [{"principals": {"issuer": "ci"}, "actions": ["secrets:read"]}]})
            deadline = time.monotonic() + 1.0
            decision = "deny"
            while time.monotonic() < deadline and decision == "deny":
                decision = c.post(f"{addr_b}/v1/policies/explain", json=ask).json()["decision"]
            assert decision == "allow"

        # SIGKILL the reaper's process: the other takes over within two intervals.
        dead, survivor = (a, addr_b) if leaders[0] else (b, addr_a)
        dead.send_signal(signal.SIGKILL)
        dead.wait(timeout=10)
        deadline = time.monotonic() + INTERVAL * 2 + 1.0  # two intervals, plus the HTTP round trip
        took_over = False
        while time.monotonic() < deadline and not took_over:
            took_over = leader(survivor)
            time.sleep(0.05)
        assert took_over, "the surviving replica did not take the reaper lock"
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(timeout=20)
