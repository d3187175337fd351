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


async def test_backend_types_describe_every_registered_type(gateway: Gateway, monkeypatch) -> None:
    import dataclasses

    from gateway.plugins import registry
    from gateway.plugins.registry import backend_class

    monkeypatch.setitem(registry.BACKEND_TYPES, "zz-missing", ("backends.zz_missing:Nope", "zz"))
    r = await gateway.client.get("/v1/backend-types")
    assert r.status_code == 200, r.text
    items = {i["type"]: i for i in r.json()["items"]}
    assert list(items) == sorted(registry.BACKEND_TYPES)
    for name in ("local", "vault", "aws", "gcp", "azure"):
        cls = backend_class(name)
        assert items[name]["available"] is True and items[name]["reason"] is None
        assert items[name]["config_schema"] == cls.config_model.model_json_schema()
        assert items[name]["capabilities"] == dataclasses.asdict(cls.capabilities)
    assert items["local"]["capabilities"]["cacheable"] is True and items["aws"]["capabilities"]["cacheable"] is False
    missing = items["zz-missing"]
    assert missing["available"] is False and missing["config_schema"] is None and missing["capabilities"] is None
    assert "pip install 'credgate[zz]'" in missing["reason"]
    # backends:read is needed (tests/gateway/test_authz_matrix.py tries every caller): an auditor has it.
    token = (await gateway.client.post("/v1/admin-keys", json={"name": "auditor-k", "role": "auditor"})).json()["token"]
    async with gateway.as_token(token) as c:
        assert (await c.get("/v1/backend-types")).status_code == 200
    async with gateway.as_token(None) as anon:
        assert (await anon.get("/v1/backend-types")).status_code == 401
    op = gateway.app.openapi()["paths"]["/v1/backend-types"]["get"]
    assert op["description"] and op["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/BackendTypeList"}
