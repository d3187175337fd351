"""Admin API keys: bootstrap, creation, roles, revocation, storage as hashes only."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from gateway.identity.principal import hash_token
from gateway.store.models import AdminKeyRow
from tests.conftest import ADMIN_TOKEN, Gateway


async def test_bootstrap_token_from_settings_is_stored_as_a_hash(gateway: Gateway) -> None:
    async with gateway.runtime.store.read() as s:
        rows = list((await s.execute(select(AdminKeyRow))).scalars())
    assert len(rows) == 1 and rows[0].role == "admin" and rows[0].name == "bootstrap"
    assert rows[0].token_hash == hash_token(ADMIN_TOKEN) and ADMIN_TOKEN not in repr(rows[0].__dict__)


async def test_create_list_revoke(gateway: Gateway) -> None:
    r = await gateway.client.post("/v1/admin-keys", json={"name": "ci-bot", "role": "operator"})
    assert r.status_code == 201
    created = r.json()
    token = created["token"]
    assert token.startswith("cgt_") and len(token) > 40
    listed = (await gateway.client.get("/v1/admin-keys")).json()["items"]
    assert {k["name"] for k in listed} == {"bootstrap", "ci-bot"}
    assert token not in str(listed) and all("token" not in k for k in listed)
    async with gateway.as_token(token) as bot:
        assert (await bot.get("/v1/backends")).status_code == 200
        assert (await bot.get("/v1/admin-keys")).status_code == 403  # operators don't manage keys
        r = await gateway.client.post(f"/v1/admin-keys/{created['id']}/revoke")
        assert r.status_code == 200 and r.json()["revoked_at"]
        r = await bot.get("/v1/backends")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_token"
    # revoking twice is fine
    assert (await gateway.client.post(f"/v1/admin-keys/{created['id']}/revoke")).status_code == 200
    assert (await gateway.client.post("/v1/admin-keys/ak_nope/revoke")).status_code == 404


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
async def test_generated_bootstrap_token_is_printed_once(settings_factory, capsys) -> None:
    from gateway.web.app import create_app

    settings = settings_factory(bootstrap_token=None, dev=True)  # only --dev prints it (tests/gateway/test_bootstrap.py)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        pass
    first = capsys.readouterr().out
    lines = [line for line in first.splitlines() if line.startswith("CREDGATE_TOKEN=")]
    assert len(lines) == 1
    token = lines[0].split("=", 1)[1]
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        principal = await app.state.runtime.admin_keys.authenticate(token)
        assert principal.roles == {"admin"}
    assert "CREDGATE_TOKEN" not in capsys.readouterr().out  # not again on the next start
