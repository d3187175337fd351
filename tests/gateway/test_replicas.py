"""Two gateway processes on one PostgreSQL database.

Both serve; exactly one runs the reaper (a PostgreSQL advisory lock); when that
process is SIGKILLed the other takes the lock within two reaper intervals; a
policy change or a revocation made through one replica is enforced by the
other within a second, although the other holds it in a cache (it was used
there first): each change reaches the other replica through PostgreSQL
LISTEN/NOTIFY (gateway/store/changes.py).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from gateway.crypto.keyring import new_key_file
from tests.services.waiting import clean_env, free_port, wait_until_serving

CREDGATE = str(Path(sys.executable).parent / "credgate")
TOKEN = "cgt_replica-test-admin-token-" + "r" * 20
INTERVAL = 0.5


def start(tmp: Path, name: str, db_url: str, kek: Path, **settings: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = clean_env(
        CREDGATE_DATABASE_URL=db_url,
        CREDGATE_KEK_FILE=str(kek),
        CREDGATE_BOOTSTRAP_TOKEN=TOKEN,
        CREDGATE_REAPER_INTERVAL_SECONDS=str(INTERVAL),
        CREDGATE_PUBLIC_URL="http://credgate.test",  # one issuer for both replicas, as behind a load balancer
        **settings,
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


def within_a_second(check) -> bool:
    """Poll ``check`` for up to one second; True as soon as it holds."""
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.01)
    return check()


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

            # A revocation through one replica is enforced by the other within a second
            # (B has the key's principal cached: it served a request with it first).
            ops = c.post(f"{addr_a}/v1/admin-keys", json={"name": "ops", "role": "operator"}).json()
            as_ops = {"Authorization": f"Bearer {ops['token']}"}
            for _ in range(3):
                assert httpx.get(f"{addr_b}/v1/backends", headers=as_ops).status_code == 200
            c.post(f"{addr_a}/v1/admin-keys/{ops['id']}/revoke")
            assert within_a_second(lambda: httpx.get(f"{addr_b}/v1/backends", headers=as_ops).status_code == 401)

            # A secret written through A: B, which cached its metadata, shows the new version.
            assert c.get(f"{addr_b}/v1/secrets/local/shared/x").json()["current_version"] == 1
            c.put(f"{addr_a}/v1/secrets/local/shared/x", json={"data": {"k": "from-a-2"}})
            assert within_a_second(lambda: c.get(f"{addr_b}/v1/secrets/local/shared/x").json()["current_version"] == 2)
            # B keeps the values it revealed (sealed) beside that metadata: a new version on A, then its
            # destruction, are what B reveals next, not what it held.
            reveal_b = lambda: c.get(f"{addr_b}/v1/secrets/local/shared/x", params={"reveal": "true"})  # noqa: E731
            assert reveal_b().json()["data"] == {"k": "from-a-2"}
            assert reveal_b().json()["data"] == {"k": "from-a-2"}  # (now held by B)
            c.put(f"{addr_a}/v1/secrets/local/shared/x", json={"data": {"k": "from-a-2b"}})
            assert within_a_second(lambda: reveal_b().json().get("data") == {"k": "from-a-2b"})
            assert c.delete(f"{addr_a}/v1/secrets/local/shared/x", params={"destroy": "true"}).status_code == 204
            assert within_a_second(lambda: reveal_b().status_code == 404)
            c.put(f"{addr_a}/v1/secrets/local/shared/x", json={"data": {"k": "from-a-2"}})

            # Connector material cached by B (it issued with it) is dropped when the secret changes on A.
            c.put(f"{addr_a}/v1/connectors/vendor", json={"type": "static", "auth_method": "static",
                                                        "secret": "local/shared/x", "resources": ["default"]})

            def unwrapped_on_b() -> dict:
                issued = c.post(f"{addr_b}/v1/credentials", json={"connector": "vendor", "resource": "default", "wrap": True})
                assert issued.status_code == 200, issued.text
                return c.post(f"{addr_b}/v1/unwrap", json={"wrap_token": issued.json()["wrap_token"]}).json()["credential"]

            assert unwrapped_on_b() == {"k": "from-a-2"}
            c.put(f"{addr_a}/v1/secrets/local/shared/x", json={"data": {"k": "from-a-3"}})
            assert within_a_second(lambda: unwrapped_on_b() == {"k": "from-a-3"})

            # A run revoked through A: its token, verified and cached on B, stops working on B.
            run = c.post(f"{addr_a}/v1/runs/run-r/token", json={"connectors": ["vendor"], "resources": ["default"]}).json()
            as_run = {"Authorization": f"Bearer {run['token']}"}
            issue = {"connector": "vendor", "resource": "default", "wrap": True}
            assert httpx.post(f"{addr_b}/v1/credentials", json=issue, headers=as_run).status_code == 200
            assert c.post(f"{addr_a}/v1/runs/run-r/revoke").status_code == 200
            assert within_a_second(
                lambda: httpx.post(f"{addr_b}/v1/credentials", json=issue, headers=as_run).status_code == 401
            )

            # A policy change through one replica is enforced by the other within a second.
            ask = {"principal": {"issuer": "ci", "subject": "repo:x"}, "action": "secrets:read"}
            assert c.post(f"{addr_b}/v1/policies/explain", json=ask).json()["decision"] == "deny"
            c.put(f"{addr_a}/v1/policies/ci", json={"rules": [{"principals": {"issuer": "ci"}, "actions": ["secrets:read"]}]})
            assert within_a_second(lambda: c.post(f"{addr_b}/v1/policies/explain", json=ask).json()["decision"] == "allow")

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


def test_revoking_what_tokens_derive_from_reaches_the_other_replica(tmp_path: Path, postgres_url: str) -> None:
    """Tokens verified and cached on B are refused on B within a second of a revocation
    through A: their client, a token revoked on its own (RFC 7009), the issuer mapping an
    exchanged token came through, the signing key (rotated without grace)."""
    from joserfc import jwt
    from joserfc.jwk import RSAKey

    kek = tmp_path / "kek"
    new_key_file(kek)
    a, addr_a = start(tmp_path, "a", postgres_url, kek)
    b, addr_b = start(tmp_path, "b", postgres_url, kek)
    procs = [a, b]
    idp_key = RSAKey.generate_key(2048, parameters={"kid": "idp"})
    idp = {"issuer_url": "https://idp.example", "jwks": {"keys": [idp_key.as_dict(private=False)]},
           "audiences": ["credgate"], "claim_mapping": {"groups": "groups"}, "role_mapping": {"ops": ["auditor"]}}
    try:
        with httpx.Client(headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10) as c:
            secret = c.post(f"{addr_a}/v1/clients", json={"client_id": "svc", "roles": ["auditor"]}).json()["client_secret"]
            assert c.put(f"{addr_a}/v1/issuers/idp", json=idp).status_code == 201

            def token(addr: str, **form: str) -> dict[str, str]:
                r = httpx.post(f"{addr}/v1/auth/token", data=form, timeout=10)
                assert r.status_code == 200, r.text
                return {"Authorization": f"Bearer {r.json()['access_token']}"}

            def client_token(addr: str) -> dict[str, str]:
                return token(addr, grant_type="client_credentials", client_id="svc", client_secret=secret)

            def refused_on_b(headers: dict[str, str]) -> bool:
                return httpx.get(f"{addr_b}/v1/backends", headers=headers).status_code == 401

            def ok_on_b(headers: dict[str, str]) -> bool:
                return httpx.get(f"{addr_b}/v1/backends", headers=headers).status_code == 200

            # A token revoked on its own through A.
            own = client_token(addr_a)
            assert ok_on_b(own) and ok_on_b(own)  # verified and cached on B
            r = httpx.post(f"{addr_a}/v1/auth/revoke", data={"token": own["Authorization"][7:]}, headers=own)
            assert r.status_code == 200
            assert within_a_second(lambda: refused_on_b(own))

            # An exchanged token whose issuer mapping changes through A.
            now = int(time.time())
            id_token = jwt.encode({"alg": "RS256", "kid": "idp"}, {
                "iss": "https://idp.example", "sub": "alice", "aud": "credgate", "iat": now, "exp": now + 600,
                "groups": ["ops"]}, idp_key)
            exchanged = token(addr_b, grant_type="urn:ietf:params:oauth:grant-type:token-exchange",
                              subject_token=id_token, subject_token_type="urn:ietf:params:oauth:token-type:jwt")
            assert ok_on_b(exchanged)
            assert c.put(f"{addr_a}/v1/issuers/idp", json={**idp, "role_mapping": {}}).status_code == 200
            assert within_a_second(lambda: refused_on_b(exchanged))

            # The signing key rotated through A: B refuses what the old key signed, and signs with the new one.
            before = client_token(addr_b)
            assert ok_on_b(before)
            assert c.post(f"{addr_a}/v1/keys/signing/rotate").status_code == 200
            assert within_a_second(lambda: refused_on_b(before))
            after = client_token(addr_b)
            assert ok_on_b(after) and httpx.get(f"{addr_a}/v1/backends", headers=after).status_code == 200

            # The client revoked through A: its token, cached on B, is refused on B.
            assert ok_on_b(after)
            assert c.post(f"{addr_a}/v1/clients/svc/revoke").status_code == 200
            assert within_a_second(lambda: refused_on_b(after))
            r = httpx.get(f"{addr_b}/v1/backends", headers=after)
            assert r.json()["error"]["code"] == "client_revoked"
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(timeout=20)


def test_killing_the_reaper_mid_revocation_loses_no_lease(tmp_path: Path, postgres_url: str) -> None:
    """Short postgres leases expire while the reaper revokes them; the reaper's process is
    SIGKILLed at a random moment of that work. The other replica finishes it: every lease ends
    revoked, none is stuck, and no role the gateway created is left at the target."""
    import random

    import psycopg

    from connectors.base import role_name

    target = postgres_url.replace("postgresql+psycopg://", "postgresql://", 1)
    database = target.rsplit("/", 1)[1]
    kek = tmp_path / "kek"
    new_key_file(kek)
    # A revocation's claim on its lease outlives the call to the target (5 s here) by 5 s: the
    # leases the killed replica had claimed are taken over once those 10 s have passed.
    a, addr_a = start(tmp_path, "a", postgres_url, kek, CREDGATE_TARGET_TIMEOUT_SECONDS="5")
    b, addr_b = start(tmp_path, "b", postgres_url, kek, CREDGATE_TARGET_TIMEOUT_SECONDS="5")
    procs = [a, b]
    lease_ids: list[str] = []
    delay = random.uniform(0.5, 3.0)
    try:
        admin = {"Authorization": f"Bearer {TOKEN}"}
        with httpx.Client(headers=admin, timeout=30) as c:
            c.put(f"{addr_a}/v1/secrets/local/targets/pg", json={"data": {"dsn": target}}).raise_for_status()
            c.put(f"{addr_a}/v1/connectors/pg", json={
                "type": "postgres", "auth_method": "password", "secret": "local/targets/pg",
                "resources": [database], "config": {"privileges": ["SELECT"]}}).raise_for_status()
            for i in range(24):
                addr = addr_a if i % 2 else addr_b
                r = c.post(f"{addr}/v1/credentials", json={"connector": "pg", "resource": database, "ttl_seconds": 1 + i % 3})
                assert r.status_code == 200, r.text
                lease_ids.append(r.json()["lease_id"])
            leaders = [leader(addr_a), leader(addr_b)]
            assert leaders.count(True) == 1, leaders
            time.sleep(delay)  # somewhere in the expiry and revocation of the 24
            dead, survivor = (a, addr_b) if leaders[0] else (b, addr_a)
            dead.send_signal(signal.SIGKILL)
            dead.wait(timeout=10)

            def states() -> dict[str, int]:
                out: dict[str, int] = {}
                for lease_id in lease_ids:
                    state = c.get(f"{survivor}/v1/leases/{lease_id}").json()["state"]
                    out[state] = out.get(state, 0) + 1
                return out

            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and states() != {"revoked": len(lease_ids)}:
                time.sleep(0.25)
            assert states() == {"revoked": len(lease_ids)}, f"killed after {delay:.2f}s"
            summary = c.get(f"{survivor}/v1/leases/summary").json()
            assert summary["stuck_revoking"] == 0 and summary["reaper_leader"] is True
        with psycopg.connect(target) as conn:
            left = conn.execute("SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)",
                                ([role_name(x) for x in lease_ids],)).fetchall()
        assert left == [], f"roles left at the target after a kill at {delay:.2f}s: {left}"
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(timeout=20)
        with psycopg.connect(target, autocommit=True) as conn:  # whatever a failure left behind
            for (name,) in conn.execute("SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)",
                                        ([role_name(x) for x in lease_ids],)).fetchall():
                conn.execute(f'DROP OWNED BY "{name}"')
                conn.execute(f'DROP ROLE "{name}"')
