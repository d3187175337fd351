"""``credgate serve --workers 2``: one parent, two worker processes on one socket, on SQLite
and on PostgreSQL (gateway/cli/workers.py).

Both workers answer (each scrape of /metrics names the process that answered it, and both
are the parent's children); a change made through one worker is seen by the other although
the other holds it in a cache (SQLite: the change log, within STALE_BOUND_SECONDS of the
acknowledgement, by construction; PostgreSQL: LISTEN/NOTIFY); exactly one runs the reaper;
the migrations and the first-run set-up ran once, in the parent; audited writes through both
at once leave one chain that verifies; a killed worker is replaced; SIGTERM to the parent
stops it and every worker. Another ``credgate serve`` on the same SQLite file still fails in
one line.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from gateway.crypto.keyring import new_key_file
from gateway.store.changes import STALE_BOUND_SECONDS
from tests.services.waiting import clean_env, free_port, wait_until_serving

CREDGATE = str(Path(sys.executable).parent / "credgate")
TOKEN = "cgt_workers-test-admin-token-" + "w" * 20
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
_PROCESS = re.compile(r'^credgate_process\{pid="(\d+)",worker="(\d+)"\} 1\.0$', re.M)
_LEADER = re.compile(r"^credgate_reaper_leader (\S+)$", re.M)


def workers_of(parent: int) -> set[int]:
    """The worker processes of ``parent`` (not multiprocessing's resource tracker)."""
    out = set()
    for pid in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
        try:
            if b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                out.add(int(pid))
        except FileNotFoundError:
            pass
    return out


def scrape(c: httpx.Client) -> tuple[int, bool]:
    """(pid of the worker serving this connection, whether it leads the reaper)."""
    body = c.get("/metrics").text
    return int(_PROCESS.search(body).group(1)), float(_LEADER.search(body).group(1)) == 1.0


def client_on(addr: str, pid: int, headers: dict[str, str] | None = None) -> httpx.Client:
    """A keep-alive connection that the worker ``pid`` accepted (new connections until one is)."""
    for _ in range(200):
        c = httpx.Client(base_url=addr, headers=headers or {}, timeout=10)
        if scrape(c)[0] == pid:
            return c
        c.close()
    raise AssertionError(f"worker {pid} accepted none of 200 connections")


def eventually(check, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return check()


@pytest.fixture(params=["sqlite", "postgres"])
def served(request: pytest.FixtureRequest, tmp_path: Path):
    kek = tmp_path / "kek"
    new_key_file(kek)
    settings = {"CREDGATE_KEK_FILE": str(kek), "CREDGATE_BOOTSTRAP_TOKEN": TOKEN,
                "CREDGATE_REAPER_INTERVAL_SECONDS": "0.3", "CREDGATE_WORKERS": "2",
                "CREDGATE_HEALTH_LISTEN": f"127.0.0.1:{free_port()}"}
    if request.param == "postgres":
        settings["CREDGATE_DATABASE_URL"] = request.getfixturevalue("postgres_url")
    port = free_port()
    log = tmp_path / "serve.log"
    proc = subprocess.Popen([CREDGATE, "serve", "--data-dir", str(tmp_path / "data"), "--port", str(port)],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env=clean_env(**settings))
    addr = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(f"{addr}/readyz", proc, log=log)
        assert eventually(lambda: len(workers_of(proc.pid)) == 2 and "all 2 workers serving" in log.read_text(), 30)
        yield request.param, proc, addr, log, tmp_path, settings["CREDGATE_HEALTH_LISTEN"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_two_workers_serve_one_store(served) -> None:
    kind, proc, addr, log, tmp, health = served
    a, b = sorted(workers_of(proc.pid))
    ca, cb = client_on(addr, a, ADMIN), client_on(addr, b, ADMIN)
    try:
        # Both answer, and they are this serve's workers.
        assert {scrape(ca)[0], scrape(cb)[0]} == {a, b}

        # One health listener (worker 0's; a second on the same port would have stopped the serve).
        assert httpx.get(f"http://{health}/readyz", timeout=5).status_code == 200

        # Migrations and first-run set-up ran once, in the parent; the workers did neither.
        text = log.read_text()
        assert text.count("migrations and first-run set-up done") == 1
        assert text.count("bootstrap admin key created") == 1

        # Exactly one worker runs the reaper.
        assert eventually(lambda: scrape(ca)[1] or scrape(cb)[1], 10)
        assert [scrape(ca)[1], scrape(cb)[1]].count(True) == 1

        def seen(check) -> bool:
            if kind == "sqlite":  # the bound holds by construction: no retry past it
                time.sleep(STALE_BOUND_SECONDS)
                return check()
            return eventually(check, 5)

        # A revoked admin key, cached as a verified principal by B, is refused by B.
        ops = ca.post("/v1/admin-keys", json={"name": "ops", "role": "operator"}).json()
        as_ops = {"Authorization": f"Bearer {ops['token']}"}
        for _ in range(3):
            assert cb.get("/v1/backends", headers=as_ops).status_code == 200
        assert ca.post(f"/v1/admin-keys/{ops['id']}/revoke").status_code == 200
        assert seen(lambda: cb.get("/v1/backends", headers=as_ops).status_code == 401)

        # A secret's metadata, cached by B, shows the version written through A.
        assert ca.put("/v1/secrets/local/shared/x", json={"data": {"k": "1"}}).status_code == 200
        assert cb.get("/v1/secrets/local/shared/x").json()["current_version"] == 1
        assert ca.put("/v1/secrets/local/shared/x", json={"data": {"k": "2"}}).status_code == 200
        assert seen(lambda: cb.get("/v1/secrets/local/shared/x").json()["current_version"] == 2)

        # A policy added through A is enforced by B, and so is its removal.
        ask = {"principal": {"issuer": "ci", "subject": "repo:x"}, "action": "secrets:read"}
        assert cb.post("/v1/policies/explain", json=ask).json()["decision"] == "deny"
        ca.put("/v1/policies/ci", json={"rules": [{"principals": {"issuer": "ci"}, "actions": ["secrets:read"]}]})
        assert seen(lambda: cb.post("/v1/policies/explain", json=ask).json()["decision"] == "allow")
        assert ca.delete("/v1/policies/ci").status_code == 204
        assert seen(lambda: cb.post("/v1/policies/explain", json=ask).json()["decision"] == "deny")

        # Audited writes through both workers at once: one chain, no fork, no duplicate.
        def writes(c: httpx.Client, who: str) -> None:
            for i in range(15):
                assert c.put(f"/v1/secrets/local/{who}/{i}", json={"data": {"k": str(i)}}).status_code == 200

        threads = [threading.Thread(target=writes, args=(c, w)) for c, w in ((ca, "a"), (cb, "b"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        report = ca.get("/v1/audit/verify").json()
        assert report["ok"], report["problems"]
    finally:
        ca.close()
        cb.close()

    # A killed worker is replaced, and the new one serves.
    proc_b = b
    subprocess.run(["kill", "-KILL", str(proc_b)], check=True)
    assert eventually(lambda: len(workers_of(proc.pid) - {a, b}) == 1, 20)
    (new,) = workers_of(proc.pid) - {a, b}
    client_on(addr, new).close()

    # Another serve on the same SQLite file still fails, in one line.
    if kind == "sqlite":
        other = subprocess.run([CREDGATE, "serve", "--data-dir", str(tmp / "data"), "--port", str(free_port())],
                               capture_output=True, text=True, timeout=30,
                               env=clean_env(CREDGATE_KEK_FILE=str(tmp / "kek"), CREDGATE_WORKERS="2"))
        assert other.returncode == 2
        assert other.stderr.strip().count("\n") == 0
        assert "another credgate process is serving the SQLite store" in other.stderr

    # SIGTERM to the parent stops it and every worker.
    workers = workers_of(proc.pid)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()]
