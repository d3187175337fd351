"""Certificates rotate without an outage (docs/tls.md): real `credgate serve --dev` processes
over TLS, the certificate files in a directory laid out like a Kubernetes Secret volume
(``tls.crt -> ..data/tls.crt``, ``..data`` a symlink swapped atomically), httpx clients.

- ``watched``: the files are checked every 0.5 s; client certificates optional.
- ``hup``: the files are checked once an hour, so only SIGHUP reloads; client
  certificates required; refused handshakes logged at most once per reason per 2 s.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.errors import ConfigurationError
from gateway.web.tls import check_key_file
from tests.gateway.test_cli import CREDGATE, Server, stopped_gracefully
from tests.gateway.test_tls import _issue
from tests.services.waiting import clean_env, free_port

Pair = tuple[Any, Any]


def pem(pair: Pair) -> tuple[bytes, bytes]:
    cert, key = pair
    return cert.public_bytes(serialization.Encoding.PEM), key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def serial(pair: Pair) -> str:
    return f"{pair[0].serial_number:X}"


class SecretDir:
    """Files published the way the kubelet updates a Secret volume: a new directory,
    then one atomic rename of the ``..data`` symlink."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.n = 0

    def publish(self, files: dict[str, bytes], key_mode: int = 0o600) -> None:
        self.n += 1
        d = self.root / f"..v{self.n}"
        d.mkdir()
        for name, data in files.items():
            (d / name).write_bytes(data)
            (d / name).chmod(key_mode if name.endswith(".key") else 0o644)
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(d.name)
        os.replace(tmp, self.root / "..data")
        for name in files:
            if not (self.root / name).is_symlink():
                (self.root / name).symlink_to(f"..data/{name}")


class Gateway:
    def __init__(self, tmp: Path, secret: SecretDir, config: dict[str, Any], *flags: str) -> None:
        self.port = free_port()
        self.addr = f"https://127.0.0.1:{self.port}"
        self.out = tmp / "serve.out"
        cfg = tmp / "config.yaml"
        cfg.write_text(json.dumps(config))  # JSON is YAML
        d = secret.root
        self.proc = subprocess.Popen(
            [CREDGATE, "serve", "--dev", "--data-dir", str(tmp / "data"), "--port", str(self.port), "--config", str(cfg),
             "--tls-cert", str(d / "tls.crt"), "--tls-key", str(d / "tls.key"), "--tls-client-ca", str(d / "ca.crt"),
             *flags],
            stdout=self.out.open("w"), stderr=subprocess.STDOUT, env=clean_env(),
        )

    def log(self) -> str:
        return self.out.read_text()

    def wait_log(self, pattern: str, start: int = 0, timeout: float = 15) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.compile(pattern, re.M).search(self.log(), start)
            if m:
                return m
            assert self.proc.poll() is None, self.log()[-3000:]
            time.sleep(0.05)
        raise AssertionError(f"no line matching {pattern!r}: {self.log()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def served_serial(r: httpx.Response) -> str:
    der = r.extensions["network_stream"].get_extra_info("ssl_object").getpeercert(True)
    return f"{x509.load_der_x509_certificate(der).serial_number:X}"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    ca = _issue("CN=server CA,O=acme", None, ca=True)
    client_ca1 = _issue("CN=client CA one,O=acme", None, ca=True)
    client_ca2 = _issue("CN=client CA two,O=acme", None, ca=True)
    d = tmp_path_factory.mktemp("trust")
    (d / "ca.crt").write_bytes(pem(ca)[0])
    clients = {}
    for name, issuer in (("one", client_ca1), ("two", client_ca2)):
        cert, key = pem(_issue(f"CN=client {name},O=acme", issuer))
        (d / f"{name}.crt").write_bytes(cert)
        (d / f"{name}.key").write_bytes(key)
        clients[name] = (str(d / f"{name}.crt"), str(d / f"{name}.key"))
    return {"ca": ca, "ca_file": str(d / "ca.crt"), "client_ca1": client_ca1, "client_ca2": client_ca2,
            "clients": clients}


def context(pki: dict[str, Any], client: str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=pki["ca_file"])
    if client is not None:
        ctx.load_cert_chain(*pki["clients"][client])
    return ctx


def get(gw: Gateway, pki: dict[str, Any], path: str = "/healthz", client: str | None = "one") -> tuple[httpx.Response, str]:
    """One request on a new connection: the response and the serial it was served with."""
    with httpx.Client(verify=context(pki, client), timeout=10) as c:
        r = c.get(f"{gw.addr}{path}")
        return r, served_serial(r)


def start(tmp: Path, pki: dict[str, Any], pair: Pair, config: dict[str, Any], *flags: str) -> tuple[Gateway, SecretDir]:
    secret = SecretDir(tmp / "tls")
    secret.root.mkdir()
    cert, key = pem(pair)
    secret.publish({"tls.crt": cert, "tls.key": key, "ca.crt": pem(pki["client_ca1"])[0]})
    gw = Gateway(tmp, secret, config, *flags)
    gw.wait_log(r"Application startup complete")
    gw.wait_log(r"TLS certificate: serial " + serial(pair))
    return gw, secret


@pytest.fixture(scope="module")
def watched(pki: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, SecretDir]]:
    gw, secret = start(tmp_path_factory.mktemp("watched"), pki, _issue("CN=localhost", pki["ca"], server=True),
                       {"tls_reload_check_seconds": 0.5})
    try:
        yield gw, secret
    finally:
        gw.stop()


@pytest.fixture(scope="module")
def hup(pki: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, SecretDir]]:
    gw, secret = start(tmp_path_factory.mktemp("hup"), pki, _issue("CN=localhost", pki["ca"], server=True),
                       {"tls_reload_check_seconds": 3600, "tls_refused_log_seconds": 2}, "--tls-require-client-cert")
    try:
        yield gw, secret
    finally:
        gw.stop()


def test_a_certificate_swapped_on_disk_under_load_fails_no_request(watched: tuple[Gateway, SecretDir], pki: dict) -> None:
    gw, secret = watched
    old = get(gw, pki)[1]
    new_pair = _issue("CN=localhost", pki["ca"], server=True)
    new = serial(new_pair)
    stop, reloaded = threading.Event(), threading.Event()
    failures: list[str] = []
    fresh: list[tuple[bool, str]] = []  # (started after the reload was logged, serial served)
    kept: list[tuple[int, str, Any]] = []  # the keep-alive connection: status, serial, stream

    def new_connections() -> None:
        while not stop.is_set():
            after = reloaded.is_set()
            try:
                r, s = get(gw, pki)
                if r.status_code != 200:
                    failures.append(f"new connection: {r.status_code}")
                fresh.append((after, s))
            except httpx.HTTPError as exc:
                failures.append(f"new connection: {exc!r}")

    def keep_alive() -> None:
        with httpx.Client(verify=context(pki, "one"), timeout=10, limits=httpx.Limits(max_connections=1)) as c:
            while not stop.is_set():
                try:
                    r = c.get(f"{gw.addr}/healthz")
                    kept.append((r.status_code, served_serial(r), r.extensions["network_stream"]))
                except httpx.HTTPError as exc:
                    failures.append(f"keep-alive: {exc!r}")
                time.sleep(0.02)

    threads = [threading.Thread(target=f) for f in (new_connections, new_connections, keep_alive)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)  # load before the swap
        mark = len(gw.log())
        cert, key = pem(new_pair)
        secret.publish({"tls.crt": cert, "tls.key": key, "ca.crt": pem(pki["client_ca1"])[0]})
        line = gw.wait_log(r"TLS certificate reloaded \(file change\): serial (\w+), subject \S+, notAfter ([^,\s]+)", mark)
        reloaded.set()
        assert line.group(1) == new and line.group(2).startswith(new_pair[0].not_valid_after_utc.isoformat()[:19])
        n = len(fresh)
        deadline = time.monotonic() + 10
        while len(fresh) < n + 20 and time.monotonic() < deadline:  # load after the swap
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(20)

    assert failures == []
    assert {s for _, s in fresh} == {old, new}
    after = [s for was_after, s in fresh if was_after]
    assert len(after) >= 20 and set(after) == {new}  # every connection made after the reload
    # The keep-alive connection went on through the reload, on its one connection and old certificate.
    assert len(kept) > 20 and {status for status, _, _ in kept} == {200}
    assert len({id(stream) for _, _, stream in kept}) == 1 and {s for _, s, _ in kept} == {old}
    assert gw.proc.poll() is None


def test_the_client_ca_rotates_and_the_expiry_metric_follows(watched: tuple[Gateway, SecretDir], pki: dict) -> None:
    gw, secret = watched
    assert get(gw, pki, client="one")[0].status_code == 200
    with pytest.raises(httpx.HTTPError):
        get(gw, pki, client="two")  # not signed by the client CA in use
    pair = _issue("CN=localhost", pki["ca"], server=True)
    mark = len(gw.log())
    cert, key = pem(pair)
    secret.publish({"tls.crt": cert, "tls.key": key, "ca.crt": pem(pki["client_ca2"])[0]})
    gw.wait_log(r"TLS certificate reloaded \(file change\): serial " + serial(pair) + ".*client CA notAfter", mark)
    r, s = get(gw, pki, "/metrics", client="two")
    assert r.status_code == 200 and s == serial(pair)
    with pytest.raises(httpx.HTTPError):
        get(gw, pki, client="one")
    assert get(gw, pki, client=None)[0].status_code == 200  # optional client certificates: still optional
    metrics = r.text
    server = re.search(r'^credgate_tls_certificate_not_after_seconds\{which="server"\} (\S+)$', metrics, re.M)
    client_ca = re.search(r'^credgate_tls_certificate_not_after_seconds\{which="client_ca"\} (\S+)$', metrics, re.M)
    assert server and float(server.group(1)) == pair[0].not_valid_after_utc.timestamp()
    assert client_ca and float(client_ca.group(1)) == pki["client_ca2"][0].not_valid_after_utc.timestamp()
    assert re.search(r'^credgate_tls_reloads_total\{result="ok"\} [1-9]', metrics, re.M)


def test_sighup_reloads_and_leaves_the_gateway_running(hup: tuple[Gateway, SecretDir], pki: dict) -> None:
    gw, secret = hup
    before = get(gw, pki)[1]
    mark = len(gw.log())
    gw.proc.send_signal(signal.SIGHUP)  # nothing changed: reloads the same certificate
    gw.wait_log(r"TLS certificate reloaded \(SIGHUP\): serial " + before, mark)
    pair = _issue("CN=localhost", pki["ca"], server=True)
    cert, key = pem(pair)
    secret.publish({"tls.crt": cert, "tls.key": key, "ca.crt": pem(pki["client_ca1"])[0]})
    assert get(gw, pki)[1] == before  # no watcher within the hour: SIGHUP is what reloads here
    mark = len(gw.log())
    gw.proc.send_signal(signal.SIGHUP)
    gw.wait_log(r"TLS certificate reloaded \(SIGHUP\): serial " + serial(pair), mark)
    r, s = get(gw, pki, "/readyz")
    assert r.status_code == 200 and s == serial(pair)
    assert gw.proc.poll() is None


def test_sighup_to_the_parent_reloads_every_worker(tmp_path: Path, pki: dict) -> None:
    gw, secret = start(tmp_path, pki, _issue("CN=localhost", pki["ca"], server=True),
                       {"tls_reload_check_seconds": 3600}, "--workers", "2")
    try:
        gw.wait_log(r"all 2 workers serving")
        pair = _issue("CN=localhost", pki["ca"], server=True)
        cert, key = pem(pair)
        secret.publish({"tls.crt": cert, "tls.key": key, "ca.crt": pem(pki["client_ca1"])[0]})
        mark = len(gw.log())
        gw.proc.send_signal(signal.SIGHUP)  # to the parent only: it forwards it to each worker
        reloaded = r"TLS certificate reloaded \(SIGHUP\): serial " + serial(pair)
        first = gw.wait_log(reloaded, mark)
        gw.wait_log(reloaded, first.end())  # the other worker
        # New connections, whichever worker accepts them, get the new certificate.
        assert {get(gw, pki)[1] for _ in range(12)} == {serial(pair)}
    finally:
        gw.stop()


def test_a_bad_pair_is_refused_in_one_line_and_the_old_one_keeps_serving(hup: tuple[Gateway, SecretDir], pki: dict) -> None:
    gw, secret = hup
    serving = get(gw, pki)[1]
    other = _issue("CN=localhost", pki["ca"], server=True)
    ca = pem(pki["client_ca1"])[0]
    cases = [
        ({"tls.crt": pem(other)[0], "tls.key": pem(_issue("CN=x", pki["ca"], server=True))[1], "ca.crt": ca}, 0o600,
         "KEY_VALUES_MISMATCH"),
        ({"tls.crt": pem(other)[0], "tls.key": pem(other)[1], "ca.crt": ca}, 0o644,
         r"accessible to group or others \(mode 0644\); run: chmod 600"),
        ({"tls.crt": b"not a certificate\n", "tls.key": pem(other)[1], "ca.crt": ca}, 0o600, "can't load the TLS certificate"),
        ({"tls.crt": pem(other)[0], "tls.key": pem(other)[1], "ca.crt": b"junk\n"}, 0o600, "can't load the client CA file"),
    ]
    for files, mode, why in cases:
        secret.publish(files, key_mode=mode)
        mark = len(gw.log())
        gw.proc.send_signal(signal.SIGHUP)
        line = gw.wait_log(r"^.*TLS reload \(SIGHUP\) refused, still serving serial (\w+): (.*)$", mark)
        assert line.group(1) == serving and re.search(why, line.group(2)), line.group(0)
        assert len(line.group(0).splitlines()) == 1 and "Traceback" not in gw.log()[mark:]
        r, s = get(gw, pki)
        assert r.status_code == 200 and s == serving
    assert gw.proc.poll() is None


def test_a_handshake_flood_logs_a_bounded_number_of_lines(hup: tuple[Gateway, SecretDir], pki: dict) -> None:
    gw, _ = hup
    mark = len(gw.log())
    plain, anonymous = 150, 50
    for _ in range(plain):  # plain HTTP to the HTTPS port
        with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(100) == b""
    for _ in range(anonymous):  # no client certificate, which this gateway requires
        with pytest.raises(httpx.HTTPError):
            get(gw, pki, client=None)
    # Each reason's held-back count is written once it has been quiet for 2 s.
    gw.wait_log(r"more for HTTP_REQUEST were not logged", mark)
    gw.wait_log(r"more for PEER_DID_NOT_RETURN_A_CERTIFICATE were not logged", mark)
    lines = [line for line in gw.log()[mark:].splitlines() if "credgate.tls" in line]
    for reason, sent in (("HTTP_REQUEST", plain), ("PEER_DID_NOT_RETURN_A_CERTIFICATE", anonymous)):
        mine = [line for line in lines if reason in line or (reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE"
                                                              and "no client certificate" in line)]
        assert 2 <= len(mine) <= 6, mine  # the flood took well under 8 s: a few lines, not `sent`
        assert all(re.search(r"from 127\.0\.0\.1:\d+", line) for line in mine)
        skipped = sum(int(n) for line in mine for n in re.findall(r"(\d+) more", line))
        first = len([line for line in mine if "TLS handshake refused from" in line])
        assert first + skipped == sent, mine  # every refusal is accounted for
    r, _ = get(gw, pki, "/metrics")
    assert f'credgate_tls_handshakes_refused_total{{reason="HTTP_REQUEST"}} {plain}.0' in r.text
    assert f'credgate_tls_handshakes_refused_total{{reason="PEER_DID_NOT_RETURN_A_CERTIFICATE"}} {anonymous}.0' in r.text


def test_the_key_file_permission_check(tmp_path: Path) -> None:
    key = tmp_path / "tls.key"
    key.write_text("x")
    for mode, default_ok, group_ok in ((0o600, True, True), (0o400, True, True), (0o640, False, True),
                                       (0o440, False, True), (0o660, False, False), (0o604, False, False)):
        key.chmod(mode)
        for group_readable, ok in ((False, default_ok), (True, group_ok)):
            if ok:
                check_key_file(key, group_readable=group_readable)
            else:
                with pytest.raises(ConfigurationError, match=f"mode {mode:04o}"):
                    check_key_file(key, group_readable=group_readable)
    assert stat.S_IMODE(key.stat().st_mode) == 0o604


def test_sighup_without_tls_is_logged_and_harmless(tmp_path: Path) -> None:
    srv = Server(tmp_path / "data")  # credgate serve --dev over plain HTTP
    try:
        mark = len(srv.out.read_text())
        srv.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "SIGHUP: no TLS files to reload" not in srv.out.read_text()[mark:] and time.monotonic() < deadline:
            assert srv.proc.poll() is None, srv.out.read_text()[-3000:]
            time.sleep(0.05)
        assert "SIGHUP: no TLS files to reload" in srv.out.read_text()[mark:]
        assert httpx.get(f"{srv.addr}/readyz").status_code == 200
        assert stopped_gracefully(srv.stop(), srv.out.read_text())  # SIGTERM still drains and stops
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait()


def test_a_key_file_others_can_read_stops_serve_in_one_line(tmp_path: Path, pki: dict) -> None:
    cert, key = pem(_issue("CN=localhost", pki["ca"], server=True))
    (tmp_path / "tls.crt").write_bytes(cert)
    (tmp_path / "tls.key").write_bytes(key)
    (tmp_path / "tls.key").chmod(0o644)
    res = subprocess.run(
        [CREDGATE, "serve", "--dev", "--data-dir", str(tmp_path / "data"), "--port", str(free_port()),
         "--tls-cert", str(tmp_path / "tls.crt"), "--tls-key", str(tmp_path / "tls.key")],
        env=clean_env(), capture_output=True, text=True, timeout=60,
    )
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"credgate: TLS key file {tmp_path / 'tls.key'} is accessible to group or others (mode 0644); "
        f"run: chmod 600 {tmp_path / 'tls.key'}"
    ]


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_accepting_protocol_on_both_event_loops(tmp_path: Path, pki: dict, loop: str) -> None:
    """The handshake path in-process (uvicorn with tls.accepting_protocol) on asyncio's loop
    and on uvloop: served, reloaded, refused handshakes counted by reason."""
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    import uvicorn

    from gateway.settings import load_settings
    from gateway.web.tls import ServerTLS, accepting_protocol

    first, second = (_issue("CN=localhost", pki["ca"], server=True) for _ in range(2))

    def write(pair: Pair) -> None:
        cert, key = pem(pair)
        (tmp_path / "tls.crt").write_bytes(cert)
        (tmp_path / "tls.key").write_bytes(key)
        (tmp_path / "tls.key").chmod(0o600)

    write(first)
    (tmp_path / "ca.crt").write_bytes(pem(pki["client_ca1"])[0])
    settings = load_settings(tls_cert_file=tmp_path / "tls.crt", tls_key_file=tmp_path / "tls.key",
                             tls_client_ca_file=tmp_path / "ca.crt", tls_require_client_cert=True)
    server_tls = ServerTLS(settings)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})

    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="off", loop=loop,
                                       http=accepting_protocol(server_tls)))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()

    class Gw:
        addr = f"https://127.0.0.1:{port}"

    def counted(reason: str, n: int) -> None:
        deadline = time.monotonic() + 10
        while server_tls.refused.get(reason, 0) < n and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server_tls.refused.get(reason, 0) == n, server_tls.refused

    try:
        deadline = time.monotonic() + 10
        while not srv.started and time.monotonic() < deadline:
            time.sleep(0.02)
        r, s = get(Gw(), pki, "/")
        assert r.status_code == 204 and s == serial(first)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(100) == b""
        counted("HTTP_REQUEST", 1)
        with pytest.raises(httpx.HTTPError):
            get(Gw(), pki, "/", client=None)
        counted("PEER_DID_NOT_RETURN_A_CERTIFICATE", 1)
        write(second)
        assert server_tls.reload("test")
        r, s = get(Gw(), pki, "/")
        assert r.status_code == 204 and s == serial(second)
    finally:
        srv.should_exit = True
        thread.join(10)
