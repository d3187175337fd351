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


@both_stores
async def test_the_run_filter_pages_through_its_index(gateway: Gateway) -> None:
    ids = await issue_static(gateway, 5)
    rt = gateway.runtime
    async with rt.store.write() as s:
        await s.execute(update(LeaseRow).where(LeaseRow.id.in_([ids[0], ids[2], ids[4]])).values(run_id="run-7"))
        await s.execute(update(LeaseRow).where(LeaseRow.id == ids[1]).values(run_id="run-8"))
    page = (await gateway.client.get("/v1/leases", params={"run": "run-7", "limit": 2})).json()
    assert [x["lease_id"] for x in page["items"]] == [ids[0], ids[2]] and page["next_page_token"] == ids[2]
    assert all(x["run_id"] == "run-7" for x in page["items"])
    rest = (await gateway.client.get("/v1/leases", params={"run": "run-7", "page_token": ids[2]})).json()
    assert [x["lease_id"] for x in rest["items"]] == [ids[4]] and rest["next_page_token"] is None
    both = (await gateway.client.get("/v1/leases", params={"run": "run-8", "state": "active"})).json()["items"]
    assert [x["lease_id"] for x in both] == [ids[1]]
    assert (await gateway.client.get("/v1/leases", params={"run": "run-9"})).json()["items"] == []
    for bad in ("", "a b", "x" * 129, "run/1"):
        r = await gateway.client.get("/v1/leases", params={"run": bad})
        assert r.status_code == 422 and r.json()["error"]["code"], (bad, r.text)
    param = next(p for p in gateway.app.openapi()["paths"]["/v1/leases"]["get"]["parameters"] if p["name"] == "run")
    assert param["description"]
    if rt.store.dialect == "sqlite":
        from sqlalchemy import text as sql

        async with rt.store.read() as s:
            plan = " ".join(str(r) for r in (await s.execute(sql(
                "EXPLAIN QUERY PLAN SELECT id FROM leases WHERE run_id = 'run-7' AND id > 'lease_' ORDER BY id LIMIT 3"
            ))).all())
        assert "ix_leases_run_id_id" in plan, plan


@both_stores
async def test_issuance_counts_leases_per_hour_with_every_hour_present(gateway: Gateway) -> None:
    from datetime import UTC, datetime

    ids = await issue_static(gateway, 6)
    rt = gateway.runtime
    now = datetime(2026, 11, 28, 10, 30, tzinfo=UTC)
    when = [
        datetime(2026, 11, 28, 10, 5, tzinfo=UTC),
        datetime(2026, 11, 28, 10, 59, 59, 999999, tzinfo=UTC),
        datetime(2026, 11, 28, 9, 0, tzinfo=UTC),
        datetime(2026, 11, 28, 7, 15, tzinfo=UTC),
        datetime(2026, 11, 27, 10, 59, tzinfo=UTC),  # 24 hours back from 10:00 starts at 11:00 the day before
        datetime(2026, 11, 27, 11, 0, tzinfo=UTC),
    ]
    async with rt.store.write() as s:
        for lease_id, at in zip(ids, when):
            await s.execute(update(LeaseRow).where(LeaseRow.id == lease_id).values(issued_at=at))
    # A revoked lease still counts: it was issued.
    await gateway.client.post(f"/v1/leases/{ids[0]}/revoke")
    buckets = await rt.leases.issued_per_hour(24, now)
    assert len(buckets) == 24
    assert buckets[0][0] == datetime(2026, 11, 27, 11, 0, tzinfo=UTC) and buckets[-1][0] == datetime(2026, 11, 28, 10, tzinfo=UTC)
    assert all(b[0] - a[0] == timedelta(hours=1) for a, b in zip(buckets, buckets[1:]))
    counts = {start.hour if start.day == 28 else -start.hour: n for start, n in buckets}
    assert counts[10] == 2 and counts[9] == 1 and counts[7] == 1 and counts[-11] == 1 and counts[8] == 0
    assert sum(n for _, n in buckets) == 5
    longer = await rt.leases.issued_per_hour(25, now)
    assert longer[0] == (datetime(2026, 11, 27, 10, tzinfo=UTC), 1) and sum(n for _, n in longer) == 6
    assert await rt.leases.issued_per_hour(1, now) == [(datetime(2026, 11, 28, 10, tzinfo=UTC), 2)]

    # Over HTTP: every hour up to the current one, each a UTC hour start.
    async with rt.store.write() as s:
        await s.execute(update(LeaseRow).where(LeaseRow.id == ids[1]).values(issued_at=utcnow()))
    r = await gateway.client.get("/v1/leases/issuance", params={"hours": 3})
    assert r.status_code == 200, r.text
    got = r.json()["buckets"]
    assert len(got) == 3 and sum(b["count"] for b in got) >= 1 and got[-1]["count"] >= 1
    assert all(b["start"].endswith(":00:00Z") for b in got)
    assert len((await gateway.client.get("/v1/leases/issuance")).json()["buckets"]) == 24
    for bad in ("0", "169", "x", "-1"):
        r = await gateway.client.get("/v1/leases/issuance", params={"hours": bad})
        assert r.status_code == 422 and r.json()["error"]["code"], (bad, r.text)
    op = gateway.app.openapi()["paths"]["/v1/leases/issuance"]["get"]
    assert op["description"] and all(p["description"] for p in op["parameters"])
