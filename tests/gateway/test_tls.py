"""HTTPS and client certificates (mTLS), over real TLS: a throwaway CA, `credgate serve
--dev` in subprocesses with the TLS flags, httpx clients with and without certificates."""

from __future__ import annotations

import datetime
import ipaddress
import json
import re
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.web import tls
from gateway.errors import ConfigurationError
from gateway.settings import load_settings
from tests.gateway.test_cli import CREDGATE
from tests.services.waiting import clean_env, free_port

MAPPED = "CN=zenml-server,O=acme"  # -> client zenml-server (operator)
UNMAPPED = "CN=stranger,O=acme"
GHOST = "CN=ghost,O=acme"  # -> client ghost, never registered
REVOKED = "CN=retired,O=acme"  # -> client retired, registered then revoked


# --- a throwaway PKI -----------------------------------------------------------


def _name(subject: str) -> x509.Name:
    return x509.Name.from_rfc4514_string(subject)


def _issue(
    subject: str, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None, *, ca: bool = False,
    server: bool = False,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    issuer_cert, issuer_key = issuer if issuer else (None, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_cert.subject if issuer_cert else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        ).add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False).add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
        )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256()), key


@dataclass
class Pki:
    dir: Path

    def write(self, name: str, pair: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]) -> None:
        cert, key = pair
        (self.dir / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (self.dir / f"{name}.key").write_bytes(
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
        (self.dir / f"{name}.key").chmod(0o600)

    def path(self, name: str, ext: str = "crt") -> Path:
        return self.dir / f"{name}.{ext}"

    def context(self, client: str | None = None) -> ssl.SSLContext:
        """What a caller uses: trusts our CA, presents ``client``'s certificate if given."""
        ctx = ssl.create_default_context(cafile=str(self.path("ca")))
        if client is not None:
            ctx.load_cert_chain(self.path(client), self.path(client, "key"))
        return ctx


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    p = Pki(tmp_path_factory.mktemp("pki"))
    ca = _issue("CN=credgate test CA,O=acme", None, ca=True)
    p.write("ca", ca)
    p.write("server", _issue("CN=localhost", ca, server=True))
    for name, subject in (("mapped", MAPPED), ("unmapped", UNMAPPED), ("ghost", GHOST), ("revoked", REVOKED)):
        p.write(name, _issue(subject, ca))
    other_ca = _issue("CN=credgate test CA,O=acme", None, ca=True)  # same name, other key
    p.write("rogue", _issue(MAPPED, other_ca))  # the mapped subject, signed by a CA we don't trust
    return p


# --- gateways over TLS ---------------------------------------------------------


class TLSServer:
    def __init__(self, pki: Pki, data_dir: Path, *extra: str) -> None:
        self.pki = pki
        self.port = free_port()
        self.addr = f"https://127.0.0.1:{self.port}"
        self.out = data_dir.parent / "serve.out"
        subjects = {MAPPED: "zenml-server", GHOST: "ghost", REVOKED: "retired"}
        self.proc = subprocess.Popen(
            [CREDGATE, "serve", "--dev", "--data-dir", str(data_dir), "--port", str(self.port),
             "--tls-cert", str(pki.path("server")), "--tls-key", str(pki.path("server", "key")),
             "--tls-client-ca", str(pki.path("ca")), *extra],
            stdout=self.out.open("w"), stderr=subprocess.STDOUT,
            env=clean_env(CREDGATE_TLS_CLIENT_SUBJECTS=json.dumps(subjects)),
        )
        self.token = ""

    def wait(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.get("/readyz", cert="unmapped").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"credgate serve exited with {self.proc.returncode}: {self.out.read_text()}")
            time.sleep(0.1)
        else:
            raise RuntimeError(f"credgate serve did not answer: {self.out.read_text()}")
        tokens = re.findall(r"^CREDGATE_TOKEN=(\S+)$", self.out.read_text(), re.MULTILINE)
        assert len(tokens) == 1, self.out.read_text()
        self.token = tokens[0]
        admin = {"Authorization": f"Bearer {self.token}"}
        for client_id, roles in (("zenml-server", ["operator"]), ("retired", [])):
            r = self.post("/v1/clients", cert="unmapped", json={"client_id": client_id, "roles": roles}, headers=admin)
            assert r.status_code == 201, r.text
        assert self.post("/v1/clients/retired/revoke", cert="unmapped", headers=admin).status_code == 200

    def request(self, method: str, path: str, *, cert: str | None = None, **kwargs: Any) -> httpx.Response:
        with httpx.Client(verify=self.pki.context(cert), timeout=5) as c:
            return c.request(method, f"{self.addr}{path}", **kwargs)

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", path, **kwargs)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def servers(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, TLSServer]]:
    """Two gateways started side by side: client certificates optional, and required."""
    started = {
        "optional": TLSServer(pki, tmp_path_factory.mktemp("optional") / "data"),
        "required": TLSServer(pki, tmp_path_factory.mktemp("required") / "data", "--tls-require-client-cert"),
    }
    try:
        for srv in started.values():
            srv.wait()
        yield started
    finally:
        for srv in started.values():
            srv.stop()


@pytest.fixture(params=["optional", "required"])
def server(request: pytest.FixtureRequest, servers: dict[str, TLSServer]) -> TLSServer:
    return servers[request.param]


def whoami(server: TLSServer, cert: str | None, token: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return server.get("/v1/auth/whoami", cert=cert, headers=headers)


# --- the listener ----------------------------------------------------------------


def test_plain_http_is_refused(server: TLSServer) -> None:
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{server.port}/healthz", timeout=5)


def test_https_with_our_ca(servers: dict[str, TLSServer]) -> None:
    srv = servers["optional"]
    r = srv.get("/healthz")  # no client certificate: fine when they are optional
    assert r.status_code == 200
    assert r.url.scheme == "https"
    # The gateway names itself by its https URL (token issuer, discovery).
    assert srv.get("/.well-known/openid-configuration").json()["issuer"] == srv.addr
    with pytest.raises(httpx.ConnectError):  # a caller that does not trust our CA
        httpx.get(f"{srv.addr}/healthz", timeout=5)


def test_the_cli_talks_https_trusting_our_ca_through_ssl_cert_file(servers: dict[str, TLSServer], pki: Pki) -> None:
    srv = servers["optional"]
    env = clean_env(CREDGATE_ADDR=srv.addr, CREDGATE_TOKEN=srv.token, SSL_CERT_FILE=str(pki.path("ca")))
    res = subprocess.run([CREDGATE, "whoami"], check=False, capture_output=True, text=True, env=env, timeout=30)
    assert res.returncode == 0 and "kind:     admin_key" in res.stdout, (res.stdout, res.stderr)


def test_required_client_cert_refuses_a_connection_without_one(servers: dict[str, TLSServer]) -> None:
    srv = servers["required"]
    # TLS 1.3: the client's handshake is done before the server has checked the client's
    # (absent) certificate, so the refusal shows as a close before any response.
    with pytest.raises(httpx.TransportError):
        srv.get("/healthz")
    assert srv.get("/healthz", cert="unmapped").status_code == 200


def test_a_certificate_from_another_ca_is_refused(server: TLSServer) -> None:
    with pytest.raises(httpx.TransportError):  # even though its subject is a mapped one
        server.get("/v1/auth/whoami", cert="rogue")
    assert whoami(server, "mapped").status_code == 200  # the server is fine; that certificate is not


# --- who a certificate is -------------------------------------------------------


def test_mapped_certificate_without_token_is_the_client(server: TLSServer) -> None:
    r = whoami(server, "mapped")
    assert r.status_code == 200, r.text
    me = r.json()
    assert {k: v for k, v in me.items() if k != "may"} == {
        "kind": "client", "subject": "client:zenml-server", "issuer": "credgate", "roles": ["operator"], "run_id": None}
    assert "credentials:issue" in me["may"] and "clients:manage" not in me["may"]
    # The client's roles and policies apply: an operator may not manage clients.
    denied = server.post("/v1/clients", cert="mapped", json={"client_id": "x", "roles": []})
    assert denied.status_code == 403, denied.text
    assert denied.json()["error"]["message"].startswith("client:zenml-server may not clients:manage")


def test_unmapped_certificate_without_token_is_401(server: TLSServer) -> None:
    r = whoami(server, "unmapped")
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_token"


def test_mapped_to_a_missing_or_revoked_client_is_401(server: TLSServer) -> None:
    for cert in ("ghost", "revoked"):
        r = whoami(server, cert)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_client", (cert, r.text)


def test_a_bearer_token_still_works_over_mtls_and_wins(server: TLSServer) -> None:
    for cert in ("unmapped", "mapped"):
        r = whoami(server, cert, token=server.token)
        assert r.status_code == 200, r.text
        assert r.json()["kind"] == "admin_key" and r.json()["roles"] == ["admin"]
    bad = whoami(server, "mapped", token="cgt_not-a-real-token")  # a bad token is not rescued by the cert
    assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_token"


# --- the protocol hook, apart from credgate ---------------------------------------


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("base", [H11Protocol, HttpToolsProtocol], ids=["h11", "httptools"])
def test_protocol_puts_the_asgi_tls_extension_in_the_scope(pki: Pki, base: type, loop: str) -> None:
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    seen: list[dict[str, Any]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        seen.append(scope.get("extensions", {}).get("tls"))
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_config=None, lifespan="off", loop=loop, http=tls.http_protocol(base),
        ssl_certfile=str(pki.path("server")), ssl_keyfile=str(pki.path("server", "key")),
        ssl_ca_certs=str(pki.path("ca")), ssl_cert_reqs=ssl.CERT_OPTIONAL,
    )
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not srv.started and time.monotonic() < deadline:
            time.sleep(0.02)
        with httpx.Client(verify=pki.context("mapped")) as c:  # two requests, one connection
            assert c.get(f"https://127.0.0.1:{port}/").status_code == 204
            assert c.get(f"https://127.0.0.1:{port}/").status_code == 204
        with httpx.Client(verify=pki.context()) as c:
            assert c.get(f"https://127.0.0.1:{port}/").status_code == 204
    finally:
        srv.should_exit = True
        thread.join(10)

    first, again, anonymous = seen
    assert first == again and first is not again  # one entry per request, built once per connection
    assert first["client_cert_name"] == MAPPED and first["client_cert_error"] is None
    assert len(first["client_cert_chain"]) == 1
    assert x509.load_pem_x509_certificate(first["client_cert_chain"][0].encode()).subject.rfc4514_string() == MAPPED
    assert first["tls_version"] in (0x0303, 0x0304) and isinstance(first["cipher_suite"], int)
    assert tls.peer_certificate({"extensions": {"tls": first}}).subject == MAPPED
    assert anonymous["client_cert_chain"] == () and anonymous["client_cert_name"] is None
    assert tls.peer_certificate({"extensions": {"tls": anonymous}}) is None
    assert tls.peer_certificate({"type": "http"}) is None  # plain HTTP: no extension


# --- settings ------------------------------------------------------------------


def test_subject_format_is_rfc4514_most_specific_first(pki: Pki) -> None:
    cert = x509.load_pem_x509_certificate(pki.path("mapped").read_bytes())
    assert cert.subject.rfc4514_string() == MAPPED == tls.normalize_subject(MAPPED)
    assert tls.normalize_subject("2.5.4.3=zenml-server,2.5.4.10=acme") == MAPPED


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"tls_cert_file": "c.pem"}, "tls_cert_file and tls_key_file together"),
        ({"tls_key_file": "k.pem"}, "tls_cert_file and tls_key_file together"),
        ({"tls_client_ca_file": "ca.pem"}, "client certificates need TLS"),
        ({"tls_cert_file": "c", "tls_key_file": "k", "tls_require_client_cert": True}, "needs tls_client_ca_file"),
        ({"tls_cert_file": "c", "tls_key_file": "k", "tls_client_subjects": {MAPPED: "x"}}, "needs tls_client_ca_file"),
        ({"tls_client_subjects": {"CN=a, O=b": "x"}}, "not an RFC 4514 distinguished name"),
        ({"tls_client_subjects": {MAPPED: "Not A Client"}}, "is not a client id"),
    ],
)
def test_settings_refuse_incomplete_tls(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        load_settings(**overrides)


def test_serve_refuses_an_unloadable_certificate_in_one_line(pki: Pki, tmp_path: Path) -> None:
    res = subprocess.run(
        [CREDGATE, "serve", "--dev", "--data-dir", str(tmp_path / "data"), "--port", str(free_port()),
         "--tls-cert", str(pki.path("server")), "--tls-key", str(pki.path("mapped", "key"))],
        check=False, capture_output=True, text=True, env=clean_env(), timeout=30,
    )
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("credgate: can't load the TLS certificate"), res.stderr
