"""The backends API: the built-in local backend, registering, checking, removing."""

from __future__ import annotations

from tests.conftest import Gateway


async def test_local_exists_from_the_start(gateway: Gateway) -> None:
    items = (await gateway.client.get("/v1/backends")).json()["items"]
    assert [(b["name"], b["type"], b["builtin"]) for b in items] == [("local", "local", True)]
    r = await gateway.client.post("/v1/backends/local/check")
    assert r.status_code == 200 and r.json()["ok"] is True


async def test_add_use_and_remove_a_second_local_backend(gateway: Gateway) -> None:
    r = await gateway.client.put("/v1/backends/team-a", json={"type": "local", "config": {}})
    assert r.status_code == 201 and r.json()["type"] == "local" and r.json()["builtin"] is False
    assert (await gateway.client.put("/v1/backends/team-a", json={"type": "local"})).status_code == 200
    await gateway.client.put("/v1/secrets/team-a/x", json={"data": {"k": "team-a"}})
    await gateway.client.put("/v1/secrets/local/x", json={"data": {"k": "local"}})
    # Same path, different backends: separate secrets.
    a = (await gateway.client.get("/v1/secrets/team-a/x", params={"reveal": "true"})).json()
    b = (await gateway.client.get("/v1/secrets/local/x", params={"reveal": "true"})).json()
    assert (a["data"], b["data"]) == ({"k": "team-a"}, {"k": "local"})
    r = await gateway.client.delete("/v1/backends/team-a")
    assert r.status_code == 409 and r.json()["error"]["code"] == "backend_in_use"
    await gateway.client.delete("/v1/secrets/team-a/x", params={"destroy": "true"})
    assert (await gateway.client.delete("/v1/backends/team-a")).status_code == 204
    r = await gateway.client.get("/v1/backends/team-a")
    assert r.status_code == 404 and r.json()["error"]["code"] == "backend_not_found"
    # local's own secret was untouched
    assert (await gateway.client.get("/v1/secrets/local/x")).status_code == 200


async def test_a_soft_deleted_secret_still_holds_its_backend(gateway: Gateway) -> None:
    await gateway.client.put("/v1/backends/tmp", json={"type": "local"})
    await gateway.client.put("/v1/secrets/tmp/x", json={"data": {"k": "v"}})
    await gateway.client.delete("/v1/secrets/tmp/x")
    r = await gateway.client.delete("/v1/backends/tmp")
    assert r.status_code == 409 and r.json()["error"]["code"] == "backend_in_use"


async def test_builtin_backend_can_not_be_removed_or_retyped(gateway: Gateway) -> None:
    r = await gateway.client.delete("/v1/backends/local")
    assert r.status_code == 409 and r.json()["error"]["code"] == "backend_builtin"


async def test_backend_management_needs_permission(gateway: Gateway) -> None:
    token = (await gateway.client.post("/v1/admin-keys", json={"name": "aud", "role": "auditor"})).json()["token"]
    async with gateway.as_token(token) as aud:
        assert (await aud.get("/v1/backends")).status_code == 200
        r = await aud.put("/v1/backends/x", json={"type": "local"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "permission_denied"
        assert (await aud.delete("/v1/backends/local")).status_code == 403
    assert [b["name"] for b in (await gateway.client.get("/v1/backends")).json()["items"]] == ["local"]
