"""The lease read path (Core, not the ORM): the same view, JSON and errors as the
ORM row gave, keyset paging, and never a sealed column."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import update

from gateway.issuing.service import lease_view
from gateway.issuing.leases import VIEW_COLUMNS, VIEW_KEYS, _view_page
from gateway.web.schemas import LeaseOut
from gateway.store.models import LeaseRow, utcnow
from tests.conftest import Gateway

both_stores = pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)


async def issue_static(gw: Gateway, n: int) -> list[str]:
    r = await gw.client.put("/v1/secrets/local/vendor/key", json={"data": {"api_key": "CANARY-lease-reads"}})
    assert r.status_code == 200, r.text
    r = await gw.client.put("/v1/connectors/vendor", json={
        "type": "static", "auth_method": "static", "secret": "local/vendor/key", "resources": ["default"],
        "default_ttl_seconds": 60, "max_ttl_seconds": 300})
    assert r.status_code in (200, 201), r.text
    ids = []
    for i in range(n):
        r = await gw.client.post("/v1/credentials", json={
            "connector": "vendor", "resource": "default", "wrap": True, "ttl_seconds": 60 + i})
        assert r.status_code == 200, r.text
        ids.append(r.json()["lease_id"])
    return ids


def test_the_view_is_lease_out_and_leaves_out_what_is_sealed() -> None:
    assert VIEW_KEYS == tuple(LeaseOut.model_fields)
    names = {col.element.name if col.name == "lease_id" else col.name for col in VIEW_COLUMNS}
    assert not names & {"kek_version", "wrapped_dek", "ciphertext", "revoke_state", "idempotency_key", "request_hash"}
    sql = str(_view_page(("connector", "principal", "state", "run_id", "expiring_before", "after")))
    for sealed in ("kek_version", "wrapped_dek", "ciphertext", "revoke_state"):
        assert sealed not in sql


@both_stores
async def test_core_view_equals_the_orm_view(gateway: Gateway) -> None:
    ids = await issue_static(gateway, 3)
    rt = gateway.runtime
    # One lease with every optional field set: revoked, with an error and a run.
    async with rt.store.write() as s:
        await s.execute(update(LeaseRow).where(LeaseRow.id == ids[1]).values(
            state="revoked", revoked_at=utcnow() - timedelta(seconds=5), last_error="x" * 300,
            run_id="run-42", attempts=3))
    for lease_id in ids:
        view = await rt.leases.view(lease_id)
        assert view == lease_view(await rt.leases.get(lease_id))
        for key in ("issued_at", "expires_at", "max_expires_at"):
            assert view[key].utcoffset() == timedelta(0)
    assert (await rt.leases.view(ids[1]))["revoked_at"].utcoffset() == timedelta(0)
    items, after = await rt.leases.views(limit=10)
    assert after is None
    assert items == [lease_view(await rt.leases.get(i)) for i in ids]


@both_stores
async def test_http_output_is_what_the_orm_row_rendered(gateway: Gateway) -> None:
    ids = await issue_static(gateway, 2)
    rt = gateway.runtime
    want = [LeaseOut(**lease_view(await rt.leases.get(i))).model_dump(mode="json") for i in ids]
    got = (await gateway.client.get(f"/v1/leases/{ids[0]}")).json()
    assert got == want[0]
    assert got["issued_at"].endswith("Z") and got["revoked_at"] is None
    page = (await gateway.client.get("/v1/leases")).json()
    assert page == {"items": want, "next_page_token": None}
    revoked = await gateway.client.post(f"/v1/leases/{ids[1]}/revoke")
    assert revoked.status_code == 200
    assert revoked.json() == LeaseOut(**lease_view(await rt.leases.get(ids[1]))).model_dump(mode="json")
    assert revoked.json()["state"] == "revoked" and revoked.json()["revoked_at"].endswith("Z")


@both_stores
async def test_keyset_pages(gateway: Gateway) -> None:
    ids = await issue_static(gateway, 5)
    seen, token, pages = [], None, 0
    while True:
        params = {"limit": 2, **({"page_token": token} if token else {})}
        page = (await gateway.client.get("/v1/leases", params=params)).json()
        seen += [x["lease_id"] for x in page["items"]]
        token, pages = page["next_page_token"], pages + 1
        if token is None:
            break
        assert token == seen[-1]
    assert seen == ids and pages == 3
    # Exactly a page left: no next page; past the end: an empty page.
    last = (await gateway.client.get("/v1/leases", params={"limit": 2, "page_token": ids[2]})).json()
    assert [x["lease_id"] for x in last["items"]] == ids[3:] and last["next_page_token"] is None
    end = (await gateway.client.get("/v1/leases", params={"page_token": ids[-1]})).json()
    assert end == {"items": [], "next_page_token": None}
    # Filters combine with the keyset.
    r = await gateway.client.get("/v1/leases", params={
        "connector": "vendor", "state": "active", "principal": "admin_key:bootstrap", "page_token": ids[0], "limit": 3})
    assert r.status_code == 200, r.text
    assert [x["lease_id"] for x in r.json()["items"]] == ids[1:4] and r.json()["next_page_token"] == ids[3]
    assert (await gateway.client.get("/v1/leases", params={"connector": "other"})).json()["items"] == []


@both_stores
async def test_errors_are_unchanged(gateway: Gateway) -> None:
    r = await gateway.client.get("/v1/leases/lease_doesnotexist")
    assert r.status_code == 404 and r.json()["error"]["code"] == "lease_not_found"
    for path in ("/v1/leases/lease_doesnotexist/revoke", "/v1/leases/lease_doesnotexist/renew"):
        r = await gateway.client.post(path)
        assert r.status_code == 404 and r.json()["error"]["code"] == "lease_not_found"
    r = await gateway.client.get("/v1/leases", params={"page_token": "nope"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_page_token"


@both_stores
async def test_the_response_schemas_are_unchanged(gateway: Gateway) -> None:
    paths = gateway.app.openapi()["paths"]
    ok = lambda op: op["responses"]["200"]["content"]["application/json"]["schema"]  # noqa: E731
    assert ok(paths["/v1/leases"]["get"]) == {"$ref": "#/components/schemas/LeaseList"}
    assert ok(paths["/v1/leases/{lease_id}"]["get"]) == {"$ref": "#/components/schemas/LeaseOut"}
