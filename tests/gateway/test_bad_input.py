"""Bad input: each gets the right 4xx and a stable code, never a 500, and nothing is written.

Every case is sent, then the store is checked to be exactly as it was.
"""

from __future__ import annotations

import json

import httpx
import pytest

from tests.conftest import Gateway

CANARY = "CANARY-bad-input-7f3a"
ok_body = json.dumps({"data": {"k": "v"}}).encode()
JSON = {"Content-Type": "application/json"}


def case(method: str, url: str, *, body: bytes | None = ok_body, headers=None, status: int, code: str):
    return pytest.param(method, url, body, {**JSON, **(headers or {})}, status, code, id=f"{code}-{url[:40]}")


CASES = [
    case("PUT", "/v1/secrets/local/a", body=b'{"data": {"k": "' + CANARY.encode() + b'"', status=400, code="invalid_json"),
    case("PUT", "/v1/secrets/local/a", body=b"", status=400, code="missing_body"),
    case("PUT", "/v1/secrets/local/a", headers={"Content-Type": "text/plain"}, status=415, code="unsupported_media_type"),
    case("PUT", "/v1/secrets/local/a", headers={"Content-Type": "application/x-www-form-urlencoded"}, status=415, code="unsupported_media_type"),
    # httpx (like most clients) folds a literal '/../' before sending; percent-encoded dots
    # arrive at the app exactly as `curl --path-as-is .../a/../b` does: as '..'.
    case("PUT", "/v1/secrets/local/a/%2e%2e/b", status=400, code="invalid_path"),
    case("PUT", "/v1/secrets/local/%2E%2E/%2E%2E/etc", status=400, code="invalid_path"),
    case("PUT", "/v1/secrets/local/a/%2e/b", status=400, code="invalid_path"),
    case("PUT", "/v1/secrets/local/a//b", status=400, code="invalid_path"),
    case("PUT", "/v1/secrets/local/a/", status=400, code="invalid_path"),
    case("PUT", "/v1/secrets/local/a%00b", status=400, code="invalid_path"),
    case("PUT", "/v1/secrets/local/a%0Ab", status=400, code="invalid_path"),
    case("PUT", "/v1/secrets/local/a%20b", status=400, code="invalid_path"),
    case("PUT", "/v1/secrets/local/" + "a" * 600, status=400, code="invalid_path"),
    case("PUT", "/v1/secrets/local/" + "a/" * 40 + "b", status=400, code="invalid_path"),
    case("PUT", "/v1/secrets/nope/a", status=404, code="backend_not_found"),
    case("PUT", "/v1/secrets/BAD_NAME/a", status=400, code="invalid_backend_name"),
    case("PUT", "/v1/secrets/local/a", body=json.dumps({"data": {"k" * 129: "v"}}).encode(), status=422, code="validation_failed"),
    case("PUT", "/v1/secrets/local/a", body=json.dumps({"data": {"bad key": "v"}}).encode(), status=422, code="validation_failed"),
    case("PUT", "/v1/secrets/local/a", body=json.dumps({"data": {"k": 5}}).encode(), status=422, code="validation_failed"),
    case("PUT", "/v1/secrets/local/a", body=json.dumps({"data": {"k": None}}).encode(), status=422, code="validation_failed"),
    case("PUT", "/v1/secrets/local/a", body=json.dumps({"data": {"k": ["x"]}}).encode(), status=422, code="validation_failed"),
    case("PUT", "/v1/secrets/local/a", body=json.dumps({"data": {"k": True}}).encode(), status=422, code="validation_failed"),
    case("PUT", "/v1/secrets/local/a", body=json.dumps({"data": {}}).encode(), status=422, code="validation_failed"),
    case("PUT", "/v1/secrets/local/a", body=json.dumps({"data": {"k": "x" * 70000}}).encode(), status=422, code="validation_failed"),
    case("PUT", "/v1/secrets/local/a", body=json.dumps({"data": {f"k{i}": "v" for i in range(300)}}).encode(), status=422, code="validation_failed"),
    case("PUT", "/v1/secrets/local/a", body=json.dumps({"data": {"k": "v"}, "value": CANARY}).encode(), status=422, code="validation_failed"),
    case("PUT", "/v1/secrets/local/a", body=json.dumps(["k", CANARY]).encode(), status=422, code="validation_failed"),
    case("PUT", "/v1/secrets/local/a", body=json.dumps({"data": {"k": "v"}, "cas": -1}).encode(), status=422, code="validation_failed"),
    case("PUT", "/v1/secrets/local/a", body=b'{"data": {"k": "\xff\xfe"}}', status=400, code="invalid_json"),
    case("GET", "/v1/secrets/local/a?version=0", body=None, status=422, code="validation_failed"),
    case("GET", "/v1/secrets/local/a?version=abc", body=None, status=422, code="validation_failed"),
    case("GET", "/v1/secrets/local?limit=100000", body=None, status=422, code="validation_failed"),
    case("GET", "/v1/secrets/local?prefix=../x", body=None, status=400, code="invalid_path"),
    case("GET", "/v1/secrets/local/missing", body=None, status=404, code="secret_not_found"),
    case("DELETE", "/v1/secrets/local/missing", body=None, status=404, code="secret_not_found"),
    case("GET", "/v1/nothing-here", body=None, status=404, code="route_not_found"),
    case("PATCH", "/v1/secrets/local/a", status=405, code="method_not_allowed"),
    case("PUT", "/v1/backends/x1", body=json.dumps({"type": "nosuch"}).encode(), status=400, code="unknown_backend_type"),
    case("PUT", "/v1/backends/x1", body=json.dumps({"type": "local", "config": {"password": CANARY}}).encode(), status=422, code="validation_failed"),
    case("PUT", "/v1/backends/Bad!", body=json.dumps({"type": "local"}).encode(), status=400, code="invalid_backend_name"),
    case("POST", "/v1/admin-keys", body=json.dumps({"name": "x", "role": "root"}).encode(), status=422, code="validation_failed"),
]


async def snapshot(gw: Gateway) -> tuple:
    from sqlalchemy import select

    from gateway.store.models import AdminKeyRow, BackendRow, SecretRow, SecretVersionRow

    counts = []
    async with gw.runtime.store.read() as s:
        for model in (SecretRow, SecretVersionRow, BackendRow, AdminKeyRow):
            counts.append(len((await s.execute(select(model))).all()))
    return tuple(counts)


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("method, url, body, headers, status, code", CASES)
async def test_bad_input(gateway: Gateway, method, url, body, headers, status, code) -> None:
    before = await snapshot(gateway)
    r = await gateway.client.request(method, httpx.URL(url), content=body, headers=headers)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code
    assert err["message"] and err["request_id"] == r.headers["x-request-id"]
    assert CANARY not in r.text
    assert await snapshot(gateway) == before


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
async def test_oversized_body_is_413_whether_declared_or_streamed(gateway: Gateway) -> None:
    huge = json.dumps({"data": {"k": "x" * (1024 * 1024 + 10)}}).encode()
    before = await snapshot(gateway)
    r = await gateway.client.put("/v1/secrets/local/big", content=huge, headers=JSON)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"

    async def stream():  # no Content-Length: counted while it streams in
        for i in range(0, len(huge), 65536):
            yield huge[i : i + 65536]

    r = await gateway.client.put("/v1/secrets/local/big", content=stream(), headers=JSON)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    assert await snapshot(gateway) == before


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize(
    "auth, code",
    [(None, "missing_token"), ("Bearer", "missing_token"), ("Basic YTpi", "missing_token"),
     ("Bearer cgt_wrong", "invalid_token"), ("Bearer " + "x" * 5000, "invalid_token")],
)
async def test_missing_or_wrong_token_is_401(gateway: Gateway, auth, code) -> None:
    headers = {"Authorization": auth} if auth else {}
    async with gateway.as_token(None) as anon:
        for method, url in [("GET", "/v1/secrets/local/a"), ("PUT", "/v1/secrets/local/a"), ("GET", "/v1/backends")]:
            r = await anon.request(method, url, headers={**headers, **JSON}, content=ok_body if method == "PUT" else None)
            assert r.status_code == 401, r.text
            assert r.headers["www-authenticate"].startswith("Bearer")
            assert r.json()["error"]["code"] == code
    assert (await snapshot(gateway))[0] == 0


# --- a caller's field names are never echoed whole -------------------------------------

LONG = "Z" * 10240  # a 10 KB field name
YAML_HEADERS = {"Content-Type": "application/yaml"}
ISSUER = {"issuer_url": "https://idp.example", "jwks_url": "https://idp.example/jwks", "audiences": ["credgate"]}


def long_key_case(method: str, url: str, body: dict | str, headers: dict | None = None):
    content = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    return pytest.param(method, url, content, {**JSON, **(headers or {})}, id=f"{method}-{url}-{len(content)}")


LONG_KEY_CASES = [
    long_key_case("PUT", "/v1/secrets/local/a", {"data": {LONG: "v"}}),
    long_key_case("PUT", "/v1/secrets/local/a", {"data": {"k": "v"}, LONG: 1}),
    long_key_case("PUT", "/v1/backends/b1", {"type": "local", "config": {LONG: 1}}),
    long_key_case("PUT", "/v1/connectors/c1", {"type": "redis", "auth_method": "password", "secret": "local/a",
                                               "resources": ["x"], "config": {LONG: 1}}),
    long_key_case("PUT", "/v1/policies/p1", {"rules": [{"principals": {LONG: "x"}, "actions": ["*"]}]}),
    long_key_case("PUT", "/v1/policies/p1", {"rules": [{"principals": {"claims": {LONG: 5}}, "actions": ["*"]}]}),
    long_key_case("PUT", "/v1/policies/p1", f"rules:\n- principals:\n    claims:\n      ? {LONG}\n      : 5\n  actions: ['*']\n",
                  YAML_HEADERS),
    long_key_case("PUT", "/v1/policies/p1", f"rules:\n- principals:\n    ? {LONG}\n    : x\n  actions: ['*']\n", YAML_HEADERS),
    long_key_case("PUT", "/v1/issuers/i1", {**ISSUER, "claim_mapping": {LONG: "sub"}}),
    long_key_case("PUT", "/v1/issuers/i1", {**ISSUER, "role_mapping": {LONG: ["root"]}}),
    long_key_case("POST", "/v1/policies/explain", {"principal": {"subject": "a", LONG: 1}, "action": "secrets:read"}),
    long_key_case("POST", "/v1/clients", {"client_id": "a", LONG: 1}),
    long_key_case("POST", "/v1/admin-keys", {"name": "a", "role": "admin", LONG: 1}),
    long_key_case("POST", "/v1/auth/token", f"grant_type=client_credentials&{LONG}=1&client_id={LONG}&client_secret=x",
                  {"Content-Type": "application/x-www-form-urlencoded"}),
    long_key_case("GET", f"/v1/secrets/local?{LONG[:4000]}=1&version={LONG[:4000]}", ""),
]


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("method, url, body, headers", LONG_KEY_CASES)
async def test_a_10kb_field_name_is_never_echoed_whole(gateway: Gateway, method, url, body, headers) -> None:
    r = await gateway.client.request(method, url, content=body or None, headers=headers)
    assert r.status_code < 500, r.text
    assert "Z" * 41 not in r.text and len(r.text) < 2048, r.text[:300]
    if r.status_code == 422:
        err = r.json()["error"]
        assert err["code"] == "validation_failed"
        assert any(e["field"].endswith("ZZZZZZZZZZZZZZZZ...") or "ZZZZZZZZZZZZZZZZ..." in e["field"] for e in err["errors"])


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("url, body", [
    ("/v1/backends/b1", lambda keys: {"type": "local", "config": keys}),
    ("/v1/policies/p1", lambda keys: {"rules": [{"principals": keys, "actions": ["*"]}]}),
    ("/v1/admin-keys", lambda keys: {"name": "a", "role": "admin", **keys}),
])
async def test_many_bad_fields_give_a_bounded_error_list(gateway: Gateway, url: str, body) -> None:
    keys = {f"k{i}-" + "y" * 30: 1 for i in range(500)}
    r = await gateway.client.request("POST" if url == "/v1/admin-keys" else "PUT", url, json=body(keys))
    assert r.status_code == 422
    assert len(r.json()["error"]["errors"]) == 20 and len(r.text) < 4096


def test_field_path_bounds_every_part_and_the_depth() -> None:
    from pydantic import BaseModel, ConfigDict

    from connectors.base import coerce
    from gateway.errors import ValidationFailed, field_path, validate_model

    assert field_path(["body", "data", "k" * 40]) == "body.data." + "k" * 40
    assert field_path(["body", "k" * 41]) == "body." + "k" * 16 + "..."
    assert field_path(["a\nb", 0]) == "a?b.0"
    assert field_path([str(i) for i in range(100)]) == ".".join(str(i) for i in range(11)) + "...."

    class Strict(BaseModel):
        model_config = ConfigDict(extra="forbid")
        a: int = 0

    for call in (lambda: validate_model(Strict, {LONG: 1}, "thing", "config."),
                 lambda: coerce(Strict, {LONG: 1}, "redis material")):
        with pytest.raises(ValidationFailed) as exc:
            call()
        assert "Z" * 41 not in exc.value.message and "Z" * 41 not in json.dumps(exc.value.details)


def test_settings_errors_bound_a_config_files_keys(tmp_path) -> None:
    from gateway.errors import ConfigurationError
    from gateway.settings import load_settings

    cfg = tmp_path / "credgate.yaml"
    cfg.write_text(f"? {LONG}\n: 1\n")
    with pytest.raises(ConfigurationError) as exc:
        load_settings(cfg)
    assert "Z" * 41 not in str(exc.value) and "\n" not in str(exc.value)


# --- the trailing-slash redirect -------------------------------------------------------


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
async def test_no_redirect_reflects_the_host_header(gateway: Gateway) -> None:
    paths = {p for p in gateway.app.openapi()["paths"] if "{" not in p}
    variants = sorted({p + "/" for p in paths} | {p.rstrip("/") for p in paths if p.endswith("/")} | {"/v1/secrets/"})
    assert len(variants) > 10
    for path in variants:
        for method in ("GET", "POST"):
            r = await gateway.client.request(method, path, headers={"Host": "evil.example"})
            assert not 300 <= r.status_code < 400 and "location" not in r.headers, (method, path, r.status_code)
            if r.status_code == 404:
                assert r.json()["error"]["code"] == "route_not_found"
    r = await gateway.client.get("/v1/backends/", headers={"Host": "evil.example"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "route_not_found"
