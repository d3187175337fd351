"""`issuer add` checks the JWK set, `issuer check` exists: POST /v1/issuers/{name}/check
reads the JWKS now (only the configured jwks_url, no redirect) and reports its keys, or
why it is unusable with a stable code; PUT /v1/issuers/{name}?check=true refuses such an
issuer (422, that code) and saves nothing."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from joserfc.jwk import ECKey, OctKey, RSAKey

from tests.conftest import Gateway
from tests.gateway.test_cli import Server
from tests.services.waiting import free_port

RSA = RSAKey.generate_key(2048, parameters={"kid": "rsa-1", "use": "sig"})
EC = ECKey.generate_key("P-256", parameters={"kid": "ec-1", "alg": "ES256"})
ENC = RSAKey.generate_key(2048, parameters={"kid": "enc-1", "use": "enc"})


class JWKSServer:
    """Serves a few JWKS documents (and failures) and remembers every path asked for."""

    DOCS = {
        "/jwks": (200, {"keys": [RSA.as_dict(private=False), EC.as_dict(private=False)]}),
        "/empty": (200, {"keys": []}),
        "/enc-only": (200, {"keys": [ENC.as_dict(private=False), OctKey.generate_key(256).as_dict()]}),
        "/not-a-set": (200, {"issuer": "x"}),
        "/not-json": (200, b"<html>hello</html>"),
        "/broken": (500, {"error": "boom"}),
        "/moved": (302, None),
    }

    def __init__(self) -> None:
        self.paths: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                outer.paths.append(self.path)
                status, doc = outer.DOCS.get(self.path, (404, {"error": "not found"}))
                body = doc if isinstance(doc, bytes) else json.dumps(doc).encode() if doc is not None else b""
                self.send_response(status)
                if status == 302:
                    self.send_header("Location", f"{outer.url}/jwks")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def jwks_server() -> Iterator[JWKSServer]:
    srv = JWKSServer()
    yield srv
    srv.close()


def issuer(url: str, **over) -> dict:
    return {"issuer_url": "https://idp.example", "jwks_url": url, "audiences": ["credgate"], **over}


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
async def test_check_reports_the_keys_it_found(gateway: Gateway, jwks_server: JWKSServer) -> None:
    c = gateway.client
    assert (await c.put("/v1/issuers/idp", json=issuer(f"{jwks_server.url}/jwks", algorithms=["RS256"]))).status_code == 201
    jwks_server.paths.clear()
    r = await c.post("/v1/issuers/idp/check")
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["ok"] and out["code"] is None
    assert out["source"] == f"{jwks_server.url}/jwks" and out["usable_keys"] == 1
    by_kid = {k["kid"]: k for k in out["keys"]}
    assert by_kid["rsa-1"]["usable"] and by_kid["rsa-1"]["kty"] == "RSA"
    assert not by_kid["ec-1"]["usable"] and "RS256" in by_kid["ec-1"]["problem"]  # alg not allowed here
    assert jwks_server.paths == ["/jwks"]  # fetched afresh, exactly the configured URL
    assert (await c.post("/v1/issuers/nope/check")).json()["error"]["code"] == "issuer_not_found"


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize(
    "path,code",
    [
        ("/empty", "jwks_no_usable_key"),
        ("/enc-only", "jwks_no_usable_key"),
        ("/not-a-set", "jwks_invalid"),
        ("/not-json", "jwks_invalid"),
        ("/broken", "jwks_unavailable"),
        ("/missing", "jwks_unavailable"),
        ("/moved", "jwks_unavailable"),  # a redirect is not followed
        (None, "jwks_unavailable"),  # nothing listens there
    ],
)
async def test_put_with_check_saves_nothing_when_the_jwks_is_unusable(
    gateway: Gateway, jwks_server: JWKSServer, path: str | None, code: str
) -> None:
    url = f"{jwks_server.url}{path}" if path else f"http://127.0.0.1:{free_port()}/jwks"
    jwks_server.paths.clear()
    r = await gateway.client.put("/v1/issuers/idp?check=true", json=issuer(url))
    assert r.status_code == 422 and r.json()["error"]["code"] == code, r.text
    assert "hello" not in r.text and "boom" not in r.text  # never the document's content
    assert (await gateway.client.get("/v1/issuers/idp")).status_code == 404
    assert jwks_server.paths == ([path] if path else [])
    # Without check=true the issuer is saved as before (its keys are fetched at first use).
    assert (await gateway.client.put("/v1/issuers/idp", json=issuer(url))).status_code == 201
    r = await gateway.client.post("/v1/issuers/idp/check")  # a check answers, like backend check
    out = r.json()
    assert r.status_code == 200 and not out["ok"] and out["code"] == code and out["message"]
    assert "hello" not in r.text and "boom" not in r.text
    assert len(out["keys"]) == (2 if path == "/enc-only" else 0) and not any(k["usable"] for k in out["keys"])


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
async def test_inline_key_sets_are_checked_without_fetching(gateway: Gateway, jwks_server: JWKSServer) -> None:
    body = {"issuer_url": "https://ci.example", "audiences": ["a"], "jwks": {"keys": [ENC.as_dict(private=False)]}}
    r = await gateway.client.put("/v1/issuers/ci?check=true", json=body)
    assert r.status_code == 422 and r.json()["error"]["code"] == "jwks_no_usable_key"
    body["jwks"] = {"keys": [RSA.as_dict(private=False)]}
    assert (await gateway.client.put("/v1/issuers/ci?check=true", json=body)).status_code == 201
    assert (await gateway.client.post("/v1/issuers/ci/check")).json()["source"] == "inline JWK set"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("issuer-check") / "data")
    try:
        yield srv
    finally:
        srv.stop()


def test_cli_issuer_add_checks_and_issuer_check_reports(server: Server, jwks_server: JWKSServer, tmp_path: Path) -> None:
    add = ["issuer", "add", "idp", "--issuer-url", "https://idp.example", "--audience", "credgate"]
    dead = f"http://127.0.0.1:{free_port()}/jwks"
    res = server.cli(*add, "--jwks-url", dead, check=False)
    assert res.returncode == 1 and res.stderr.startswith("credgate: jwks_unavailable:") and res.stderr.count("\n") == 1
    assert server.cli("issuer", "show", "idp", check=False).returncode == 1  # not saved
    res = server.cli(*add, "--jwks-url", f"{jwks_server.url}/empty", check=False)
    assert res.returncode == 1 and res.stderr.startswith("credgate: jwks_no_usable_key:")

    assert server.cli(*add, "--jwks-url", dead, "--no-check").stdout == "issuer idp (https://idp.example) saved\n"
    res = server.cli("issuer", "check", "idp", check=False)
    assert res.returncode == 1 and res.stdout.startswith("idp: jwks_unavailable, 0 usable key(s)"), res

    server.cli(*add, "--jwks-url", f"{jwks_server.url}/jwks")
    out = server.cli("issuer", "check", "idp").stdout.splitlines()
    assert out == [f"idp: ok, 2 usable key(s) of 2 in {jwks_server.url}/jwks",
                   "  kid=rsa-1 kty=RSA alg=-: usable", "  kid=ec-1 kty=EC alg=ES256: usable"]
    server.cli(*add, "--jwks-url", f"{jwks_server.url}/jwks", "--algorithm", "PS256")
    raw = json.loads(server.cli("issuer", "check", "idp", "--json").stdout)
    assert raw["usable_keys"] == 1 and [k["kid"] for k in raw["keys"] if k["usable"]] == ["rsa-1"]
