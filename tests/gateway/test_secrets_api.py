"""The secrets API over HTTP, on SQLite and on PostgreSQL."""

from __future__ import annotations

import pytest

from tests.conftest import Gateway


async def put(gw: Gateway, path: str, data: dict, **extra) -> dict:
    r = await gw.client.put(f"/v1/secrets/local/{path}", json={"data": data, **extra})
    assert r.status_code == 200, r.text
    return r.json()


async def test_put_then_metadata_never_shows_values(gateway: Gateway) -> None:
    out = await put(gateway, "app/db", {"user": "alice", "password": "pw-CANARY-1"})
    assert out["version"] == 1 and out["keys"] == ["password", "user"] and out["data"] is None
    r = await gateway.client.get("/v1/secrets/local/app/db")
    body = r.json()
    assert r.status_code == 200
    assert body["current_version"] == 1 and body["keys"] == ["password", "user"]
    assert body["versions"][0]["created_by"] == "admin_key:bootstrap"
    assert "pw-CANARY-1" not in r.text and body["data"] is None


async def test_reveal_and_versions(gateway: Gateway) -> None:
    await put(gateway, "app/db", {"password": "one"})
    await put(gateway, "app/db", {"password": "two", "user": "bob"})
    cur = (await gateway.client.get("/v1/secrets/local/app/db", params={"reveal": "true"})).json()
    assert cur["version"] == 2 and cur["data"] == {"password": "two", "user": "bob"}
    old = (await gateway.client.get("/v1/secrets/local/app/db", params={"reveal": "true", "version": 1})).json()
    assert old["version"] == 1 and old["current_version"] == 2 and old["data"] == {"password": "one"}
    meta_old = (await gateway.client.get("/v1/secrets/local/app/db", params={"version": 1})).json()
    assert meta_old["keys"] == ["password"] and meta_old["data"] is None
    r = await gateway.client.get("/v1/secrets/local/app/db", params={"version": 9})
    assert r.status_code == 404 and r.json()["error"]["code"] == "version_not_found"


async def test_check_and_set(gateway: Gateway) -> None:
    await put(gateway, "cas/x", {"a": "1"}, cas=0)
    r = await gateway.client.put("/v1/secrets/local/cas/x", json={"data": {"a": "2"}, "cas": 0})
    assert r.status_code == 409 and r.json()["error"]["code"] == "cas_mismatch"
    await put(gateway, "cas/x", {"a": "2"}, cas=1)
    assert (await gateway.client.get("/v1/secrets/local/cas/x")).json()["current_version"] == 2


async def test_list_with_prefix_and_pagination(gateway: Gateway) -> None:
    names = [f"team/svc{i:02d}" for i in range(25)] + ["other/x", "team_b/y"]
    for n in names:
        await put(gateway, n, {"k": "v"})
    seen, token = [], None
    while True:
        params = {"prefix": "team/", "limit": 10}
        if token:
            params["page_token"] = token
        page = (await gateway.client.get("/v1/secrets/local", params=params)).json()
        assert len(page["items"]) <= 10
        seen += page["items"]
        token = page["next_page_token"]
        if not token:
            break
    assert seen == sorted(n for n in names if n.startswith("team/"))
    # '_' in a prefix is literal, not a LIKE wildcard
    page = (await gateway.client.get("/v1/secrets/local", params={"prefix": "team_"})).json()
    assert page["items"] == ["team_b/y"]
    r = await gateway.client.get("/v1/secrets/local", params={"page_token": "%%%not-ours"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_page_token"


async def test_soft_delete_restore_and_destroy(gateway: Gateway) -> None:
    await put(gateway, "d/x", {"k": "v1"})
    await put(gateway, "d/x", {"k": "v2"})
    assert (await gateway.client.delete("/v1/secrets/local/d/x")).status_code == 204
    r = await gateway.client.get("/v1/secrets/local/d/x")
    assert r.status_code == 404 and r.json()["error"]["code"] == "secret_deleted"
    assert (await gateway.client.get("/v1/secrets/local", params={"prefix": "d/"})).json()["items"] == []
    listed = (await gateway.client.get("/v1/secrets/local", params={"prefix": "d/", "include_deleted": "true"})).json()
    assert listed["items"] == ["d/x"]
    r = await gateway.client.post("/v1/secrets/local/d/x:restore")
    assert r.status_code == 200 and r.json()["current_version"] == 2
    both = (await gateway.client.get("/v1/secrets/local/d/x", params={"reveal": "true", "version": 1})).json()
    assert both["data"] == {"k": "v1"}
    assert (await gateway.client.delete("/v1/secrets/local/d/x", params={"destroy": "true"})).status_code == 204
    r = await gateway.client.get("/v1/secrets/local/d/x", params={"version": 1})
    assert r.status_code == 404 and r.json()["error"]["code"] == "secret_not_found"
    r = await gateway.client.post("/v1/secrets/local/d/x:restore")
    assert r.status_code == 404
    # The path is free again and starts over at version 1.
    assert (await put(gateway, "d/x", {"k": "new"}))["version"] == 1


async def test_write_to_deleted_secret_revives_it(gateway: Gateway) -> None:
    await put(gateway, "r/x", {"k": "1"})
    await gateway.client.delete("/v1/secrets/local/r/x")
    out = await put(gateway, "r/x", {"k": "2"})
    assert out["version"] == 2 and out["deleted_at"] is None


async def test_a_secret_named_like_a_verb_is_just_a_path(gateway: Gateway) -> None:
    await put(gateway, "x/restore", {"k": "v"})
    r = await gateway.client.get("/v1/secrets/local/x/restore")
    assert r.status_code == 200 and r.json()["path"] == "x/restore"


async def test_reveal_needs_permission(gateway: Gateway) -> None:
    await put(gateway, "p/x", {"k": "CANARY-reveal"})
    r = await gateway.client.post("/v1/admin-keys", json={"name": "ops", "role": "operator"})
    assert r.status_code == 201
    async with gateway.as_token(r.json()["token"]) as ops:
        assert (await ops.get("/v1/secrets/local/p/x")).status_code == 200
        denied = await ops.get("/v1/secrets/local/p/x", params={"reveal": "true"})
        assert denied.status_code == 403 and denied.json()["error"]["code"] == "permission_denied"
        assert "CANARY-reveal" not in denied.text
        assert (await ops.put("/v1/secrets/local/p/y", json={"data": {"a": "b"}})).status_code == 200


@pytest.mark.parametrize("exists", [True, False], ids=["existing", "new-path"])
async def test_concurrent_writers_get_distinct_versions(gateway: Gateway, exists: bool) -> None:
    import asyncio

    if exists:
        await put(gateway, "c/x", {"n": "0"})
    results = await asyncio.gather(
        *(gateway.client.put("/v1/secrets/local/c/x", json={"data": {"n": str(i)}}) for i in range(1, 11))
    )
    assert all(r.status_code == 200 for r in results), [r.text for r in results if r.status_code != 200]
    first = 2 if exists else 1
    assert sorted(r.json()["version"] for r in results) == list(range(first, first + 10))
    meta = (await gateway.client.get("/v1/secrets/local/c/x")).json()
    assert [v["version"] for v in meta["versions"]] == list(range(1, first + 10))


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
async def test_sqlite_runs_in_wal_mode(gateway: Gateway) -> None:
    from sqlalchemy import text

    async with gateway.runtime.store.read() as s:
        assert (await s.execute(text("PRAGMA journal_mode"))).scalar() == "wal"
        assert (await s.execute(text("PRAGMA synchronous"))).scalar() == 2  # FULL


async def test_a_revealed_value_is_held_sealed_and_every_change_is_what_the_next_reveal_shows(gateway: Gateway) -> None:
    """A version's sealed value is kept beside the secret's cached metadata: repeated reveals read
    nothing from the store, and a write, a soft delete, a restore and a destroy followed by a new
    version 1 are each what the next reveal answers (backends/local.py _SealedCache)."""
    from sqlalchemy import event

    reads: list[str] = []

    def count(_conn, _cursor, statement, *_args) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "secret_versions" in statement:
            reads.append(statement)

    engine = gateway.runtime.store.engine.sync_engine
    event.listen(engine, "before_cursor_execute", count)

    async def reveal(**params):
        return await gateway.client.get("/v1/secrets/local/app/held", params={"reveal": "true", **params})

    try:
        await put(gateway, "app/held", {"password": "one"})
        assert (await reveal()).json()["data"] == {"password": "one"}
        before = len(reads)
        for _ in range(5):
            assert (await reveal()).json()["data"] == {"password": "one"}
        assert len(reads) == before, "a held version was read from the store again"

        await put(gateway, "app/held", {"password": "two"})
        assert (await reveal()).json()["data"] == {"password": "two"}
        assert (await reveal(version=1)).json()["data"] == {"password": "one"}

        assert (await gateway.client.delete("/v1/secrets/local/app/held")).status_code == 204
        r = await reveal()
        assert r.status_code == 404 and r.json()["error"]["code"] == "secret_deleted"
        assert (await gateway.client.post("/v1/secrets/local/app/held:restore")).status_code == 200
        assert (await reveal()).json()["data"] == {"password": "two"}

        r = await gateway.client.delete("/v1/secrets/local/app/held", params={"destroy": "true"})
        assert r.status_code == 204
        r = await reveal(version=1)
        assert r.status_code == 404 and r.json()["error"]["code"] == "secret_not_found"
        await put(gateway, "app/held", {"password": "three"})  # version 1 again, of a new secret
        assert (await reveal(version=1)).json()["data"] == {"password": "three"}
    finally:
        event.remove(engine, "before_cursor_execute", count)
