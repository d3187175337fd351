"""GET /v1/runs: runs newest first, keyset pages, the state filter, who sees which runs, and
each run's lease counts from one grouped query."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import event, update

from gateway.store.models import RunRow
from tests.conftest import Gateway
from tests.gateway.test_identity import setup_server_client, static

T0 = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)


async def runs_setup(gw: Gateway) -> str:
    """run-a, run-b, run-c delegated by the metadata server (run-b revoked), run-d by the admin;
    created at fixed times, run-c and run-d at the same instant. Returns the server's token."""
    await static(gw, "wandb")
    server_token = await setup_server_client(gw)
    async with gw.as_token(server_token) as server:
        for run_id in ("run-a", "run-b", "run-c"):
            r = await server.post(f"/v1/runs/{run_id}/token", json={"connectors": ["wandb"], "resources": ["default"]})
            assert r.status_code == 200, r.text
        for _ in range(2):
            r = await server.post("/v1/runs/run-a/credentials", json={"connector": "wandb", "resource": "default", "wrap": True})
            assert r.status_code == 200, r.text
        r = await server.post("/v1/runs/run-b/credentials", json={"connector": "wandb", "resource": "default", "wrap": True})
        assert r.status_code == 200, r.text
        assert (await server.post("/v1/runs/run-b/revoke")).status_code == 200
    r = await gw.client.post("/v1/runs/run-d/token", json={"connectors": ["wandb"], "resources": ["default"]})
    assert r.status_code == 200, r.text
    created = {"run-a": T0.replace(hour=9), "run-b": T0.replace(hour=10), "run-c": T0, "run-d": T0}
    async with gw.runtime.store.write() as s:
        for run_id, at in created.items():
            await s.execute(update(RunRow).where(RunRow.run_id == run_id).values(created_at=at))
    return server_token


def zero(**n: int) -> dict[str, int]:
    return {"pending": 0, "active": 0, "revoking": 0, "revoked": 0, "expired": 0, **n}


async def test_runs_newest_first_with_their_lease_counts(gateway: Gateway) -> None:
    await runs_setup(gateway)
    r = await gateway.client.get("/v1/runs")
    assert r.status_code == 200, r.text
    page = r.json()
    assert page["next_page_token"] is None
    # Newest first; run-c and run-d were created at the same instant: run id descending.
    assert [i["run_id"] for i in page["items"]] == ["run-d", "run-c", "run-b", "run-a"]
    by_id = {i["run_id"]: i for i in page["items"]}
    assert by_id["run-a"]["leases"] == zero(active=2)
    assert by_id["run-b"]["leases"] == zero(revoked=1) and by_id["run-b"]["revoked_at"] is not None
    assert by_id["run-c"]["leases"] == zero() and by_id["run-c"]["revoked_at"] is None
    assert by_id["run-a"]["created_by"] == "credgate/client:zenml-server"
    assert by_id["run-d"]["created_by"] == "credgate/admin_key:bootstrap"
    assert by_id["run-c"]["created_at"] == "2026-11-20T12:00:00Z"
    assert set(by_id["run-a"]) == {"run_id", "created_by", "created_at", "revoked_at", "leases"}

    live = (await gateway.client.get("/v1/runs", params={"state": "live"})).json()["items"]
    assert [i["run_id"] for i in live] == ["run-d", "run-c", "run-a"]
    revoked = (await gateway.client.get("/v1/runs", params={"state": "revoked"})).json()["items"]
    assert [i["run_id"] for i in revoked] == ["run-b"]


async def test_keyset_pages_across_a_tie(gateway: Gateway) -> None:
    await runs_setup(gateway)
    seen, token, pages = [], None, 0
    while True:
        params = {"limit": 1, **({"page_token": token} if token else {})}
        r = await gateway.client.get("/v1/runs", params=params)
        assert r.status_code == 200, r.text
        seen += [i["run_id"] for i in r.json()["items"]]
        token, pages = r.json()["next_page_token"], pages + 1
        if token is None:
            break
    assert seen == ["run-d", "run-c", "run-b", "run-a"] and pages == 4
    two = (await gateway.client.get("/v1/runs", params={"limit": 2, "state": "live"})).json()
    assert [i["run_id"] for i in two["items"]] == ["run-d", "run-c"]
    rest = (await gateway.client.get("/v1/runs", params={"limit": 2, "state": "live", "page_token": two["next_page_token"]})).json()
    assert [i["run_id"] for i in rest["items"]] == ["run-a"] and rest["next_page_token"] is None


async def test_a_delegator_sees_only_its_own_runs(gateway: Gateway) -> None:
    server_token = await runs_setup(gateway)
    async with gateway.as_token(server_token) as server:  # runs:delegate, not leases:read
        r = await server.get("/v1/runs")
        assert r.status_code == 200, r.text
        assert [i["run_id"] for i in r.json()["items"]] == ["run-c", "run-b", "run-a"]
        page = (await server.get("/v1/runs", params={"limit": 2})).json()
        rest = (await server.get("/v1/runs", params={"page_token": page["next_page_token"]})).json()
        assert [i["run_id"] for i in page["items"] + rest["items"]] == ["run-c", "run-b", "run-a"]
    # An auditor (leases:read) sees every run.
    token = (await gateway.client.post("/v1/admin-keys", json={"name": "aud", "role": "auditor"})).json()["token"]
    async with gateway.as_token(token) as auditor:
        assert len((await auditor.get("/v1/runs")).json()["items"]) == 4
    # A run token has neither.
    run_token = (await gateway.client.post("/v1/runs/run-e/token", json={"connectors": ["wandb"], "resources": ["default"]})).json()["token"]
    async with gateway.as_token(run_token) as run:
        r = await run.get("/v1/runs")
        assert r.status_code == 403 and r.json()["error"]["code"] == "permission_denied"


async def test_the_lease_counts_are_one_grouped_query(gateway: Gateway) -> None:
    await runs_setup(gateway)
    statements: list[str] = []

    def seen(conn, cursor, statement, parameters, context, executemany) -> None:
        statements.append(statement)

    engine = gateway.runtime.store.engine.sync_engine
    event.listen(engine, "before_cursor_execute", seen)
    try:
        r = await gateway.client.get("/v1/runs")
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    assert r.status_code == 200 and len(r.json()["items"]) == 4
    on_leases = [s for s in statements if "FROM leases" in s]
    assert len(on_leases) == 1 and "GROUP BY" in on_leases[0], on_leases


async def test_bad_input_is_a_4xx_in_the_error_shape(gateway: Gateway) -> None:
    for params, status, code in [
        ({"page_token": "nope"}, 400, "invalid_page_token"),
        ({"page_token": "bm90fGEgdG9rZW4"}, 400, "invalid_page_token"),  # "not|a token"
        ({"page_token": "MjAyNi0xMS0yMFQxMjowMDowMHxydW4tYQ"}, 400, "invalid_page_token"),  # naive time
        ({"page_token": "x" * 300}, 422, None),
        ({"state": "dead"}, 422, None),
        ({"limit": 0}, 422, None),
        ({"limit": 1001}, 422, None),
    ]:
        r = await gateway.client.get("/v1/runs", params=params)
        assert r.status_code == status, (params, r.text)
        assert r.json()["error"]["code"] == (code or r.json()["error"]["code"]) and r.json()["error"]["message"]
    op = gateway.app.openapi()["paths"]["/v1/runs"]["get"]
    assert op["description"] and all(p.get("description") for p in op["parameters"])
