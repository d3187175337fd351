"""The loopback health listener (``health_listen``, docs/tls.md): under strict mTLS a probe
without a client certificate still sees /readyz, and /readyz there reflects a broken store.
A real `credgate serve` on a PostgreSQL store whose database the test drops."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.gateway.test_cli import CREDGATE
from tests.gateway.test_tls import _issue
from tests.gateway.test_tls_reload import SecretDir, context, get, pem, serial
from tests.services.waiting import clean_env, free_port

HEALTHCHECK = Path(__file__).resolve().parents[2] / "deploy" / "healthcheck.py"


def raw(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.postgres
def test_readyz_on_the_loopback_listener_without_a_client_certificate(
    tmp_path: Path, postgres_url: str, postgres_server: str
) -> None:
    import psycopg

    ca = _issue("CN=server CA,O=acme", None, ca=True)
    client_ca = _issue("CN=client CA,O=acme", None, ca=True)
    trust = tmp_path / "trust"
    trust.mkdir()
    (trust / "ca.crt").write_bytes(pem(ca)[0])
    cert, key = pem(_issue("CN=client one,O=acme", client_ca))
    (trust / "one.crt").write_bytes(cert)
    (trust / "one.key").write_bytes(key)
    pki = {"ca_file": str(trust / "ca.crt"), "clients": {"one": (str(trust / "one.crt"), str(trust / "one.key"))}}
    secret = SecretDir(tmp_path / "tls")
    secret.root.mkdir()
    server = _issue("CN=localhost", ca, server=True)
    cert, key = pem(server)
    secret.publish({"tls.crt": cert, "tls.key": key, "ca.crt": pem(client_ca)[0]})

    port, health = free_port(), free_port()
    out = tmp_path / "serve.out"
    proc = subprocess.Popen(
        [CREDGATE, "serve", "--dev", "--data-dir", str(tmp_path / "data"), "--port", str(port),
         "--tls-cert", str(secret.root / "tls.crt"), "--tls-key", str(secret.root / "tls.key"),
         "--tls-client-ca", str(secret.root / "ca.crt"), "--tls-require-client-cert"],
        stdout=out.open("w"), stderr=subprocess.STDOUT,
        env=clean_env(CREDGATE_DATABASE_URL=postgres_url, CREDGATE_HEALTH_LISTEN=f"127.0.0.1:{health}"),
    )
    probe_env = clean_env(CREDGATE_HEALTH_LISTEN=f"127.0.0.1:{health}", CREDGATE_TLS_CERT_FILE="/nonexistent",
                          CREDGATE_PORT=str(port))

    def probe(path: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(HEALTHCHECK), path], env=probe_env, capture_output=True, text=True,
                              timeout=20)

    try:
        class Gw:  # what tests.gateway.test_tls_reload.get needs
            addr = f"https://127.0.0.1:{port}"

        for _ in range(300):
            assert proc.poll() is None, out.read_text()
            try:
                r = httpx.get(f"http://127.0.0.1:{health}/readyz", timeout=5)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            raise AssertionError(out.read_text())
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "ready" and r.json()["checks"]["store"] == "ok"
        assert httpx.get(f"http://127.0.0.1:{health}/healthz").json() == {"status": "ok"}
        # The main listener still wants a client certificate, and serves with one.
        with pytest.raises(httpx.HTTPError):
            get(Gw(), pki, "/readyz", client=None)
        r, s = get(Gw(), pki, "/readyz", client="one")
        assert r.status_code == 200 and s == serial(server)
        # The health listener serves nothing else, and one request per connection.
        assert httpx.get(f"http://127.0.0.1:{health}/v1/clients").status_code == 404
        assert httpx.get(f"http://127.0.0.1:{health}/metrics").status_code == 404
        assert httpx.post(f"http://127.0.0.1:{health}/readyz").status_code == 405
        assert raw(health, b"HEAD /readyz HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 405 Method Not Allowed\r\n")
        answer = raw(health, b"GET /readyz?x=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"connection: close" in head
        assert f"content-length: {len(body)}".encode() in head and json.loads(body)["status"] == "ready"
        assert raw(health, b"GET /readyz HTTP/1.1\r\nX: " + b"y" * 10000 + b"\r\n\r\n") == b""  # head too large
        # The probe the chart runs (deploy/healthcheck.py) goes to the health listener.
        ok = probe("/readyz")
        assert ok.returncode == 0, ok.stderr

        # Take the store away: the health listener says so.
        name = postgres_url.rsplit("/", 1)[1]
        with psycopg.connect(postgres_server, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        r = httpx.get(f"http://127.0.0.1:{health}/readyz", timeout=15)
        assert r.status_code == 503
        body = r.json()
        assert body["checks"]["store"] == "unreachable" and "store unreachable" in body["error"]["message"]
        assert httpx.get(f"http://127.0.0.1:{health}/healthz").status_code == 200  # alive, not ready
        failed = probe("/readyz")
        assert failed.returncode == 1 and f"127.0.0.1:{health}/readyz: 503" in failed.stderr
        assert proc.poll() is None
        assert "Traceback" not in out.read_text()
    finally:
        proc.kill()
        proc.wait()


def test_health_listen_must_be_loopback(tmp_path: Path) -> None:
    res = subprocess.run(
        [CREDGATE, "serve", "--dev", "--data-dir", str(tmp_path / "data"), "--port", str(free_port())],
        env=clean_env(CREDGATE_HEALTH_LISTEN="0.0.0.0:8766"), capture_output=True, text=True, timeout=60,
    )
    assert res.returncode != 0
    assert "health_listen" in res.stderr and "loopback" in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_a_health_listen_port_in_use_stops_serve(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = subprocess.run(
            [CREDGATE, "serve", "--dev", "--data-dir", str(tmp_path / "data"), "--port", str(free_port())],
            env=clean_env(CREDGATE_HEALTH_LISTEN=f"127.0.0.1:{port}"), capture_output=True, text=True, timeout=60,
        )
    assert res.returncode == 3, res.stdout + res.stderr
    assert f"can't listen on health_listen 127.0.0.1:{port}" in res.stdout + res.stderr
