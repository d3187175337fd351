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
