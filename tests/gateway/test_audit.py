"""The audit trail over the API: what is recorded, tamper evidence, fail-closed sinks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import delete, update

from gateway.store.models import AuditEventRow
from tests.conftest import ADMIN_TOKEN, Gateway

pytestmark = pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
CANARY = "CANARY-audit-5e1f"


async def events(gw: Gateway, **params) -> list[dict]:
    r = await gw.client.get("/v1/audit", params={"limit": 1000, **params})
    assert r.status_code == 200, r.text
    return r.json()["items"]


async def static(gw: Gateway) -> None:
    await gw.client.put("/v1/secrets/local/vendor/key", json={"data": {"api_key": CANARY}})
    await gw.client.put("/v1/connectors/vendor", json={"type": "static", "auth_method": "static",
                                                       "secret": "local/vendor/key", "resources": ["default"]})


async def test_allowed_and_refused_requests_are_recorded_without_values(gateway: Gateway) -> None:
    await static(gateway)
    token = (await gateway.client.post("/v1/admin-keys", json={"name": "ops", "role": "operator"})).json()["token"]
    async with gateway.as_token(token) as ops:
        assert (await ops.get("/v1/secrets/local/vendor/key", params={"reveal": "true"})).status_code == 403
    async with gateway.as_token("cgt_not-a-key") as bad:
        assert (await bad.get("/v1/backends")).status_code == 401
    issued = (await gateway.client.post("/v1/credentials", json={"connector": "vendor", "resource": "default", "wrap": True})).json()
    unwrapped = await gateway.client.post("/v1/unwrap", json={"wrap_token": issued["wrap_token"]})
    assert unwrapped.status_code == 200

    everything = await events(gateway)
    dump = json.dumps(everything)
    for value in (CANARY, issued["wrap_token"], token, ADMIN_TOKEN):
        assert value not in dump
    denied = [e for e in everything if e["decision"] == "deny"]
    assert any(e["subject"] == "admin_key:ops" and e["outcome"] == "403 permission_denied"
               and e["target"] == "GET /v1/secrets/local/vendor/key" for e in denied)
    assert any(e["outcome"] == "401 invalid_token" and e["target"] == "GET /v1/backends" for e in denied)
    issue_event = next(e for e in everything if e["lease_id"] == issued["lease_id"] and e["action"] == "credentials:wrap")
    assert issue_event["decision"] == "allow" and issue_event["rule"] == "builtin/admin"
    assert issue_event["details"]["connector"] == "vendor" and issue_event["request_id"]
    assert issue_event["client_addr"] is not None
    # The wrap token is findable by its keyed hash, not by its value.
    h = (await gateway.client.post("/v1/audit/hash", json={"value": issued["wrap_token"]})).json()["hmac"]
    unwrap_event = next(e for e in everything if e["action"] == "credentials:unwrap")
    assert unwrap_event["details"]["wrap_token"] == h and unwrap_event["lease_id"] == issued["lease_id"]
    by_lease = await events(gateway, lease_id=issued["lease_id"])
    assert {e["action"] for e in by_lease} == {"credentials:wrap", "credentials:unwrap"}
    assert all(e["decision"] == "deny" for e in await events(gateway, decision="deny"))
    assert (await gateway.client.get("/v1/audit/verify")).json()["ok"] is True


async def test_an_edited_and_a_deleted_event_are_both_named(gateway: Gateway) -> None:
    for i in range(6):
        await gateway.client.put(f"/v1/secrets/local/t/{i}", json={"data": {"k": "v"}})
    before = await events(gateway)
    assert len(before) >= 6
    edited, deleted = before[1]["seq"], before[4]["seq"]
    async with gateway.runtime.store.write() as s:
        await s.execute(update(AuditEventRow).where(AuditEventRow.seq == edited).values(subject="someone-else"))
        await s.execute(delete(AuditEventRow).where(AuditEventRow.seq == deleted))
    out = (await gateway.client.get("/v1/audit/verify")).json()
    assert out["ok"] is False and out["first_bad_seq"] == edited and "modified" in out["problem"]
    named = {p["seq"] for p in out["problems"]}
    assert {edited, deleted} <= named


async def test_a_truncated_tail_is_caught_by_the_signed_checkpoint(gateway: Gateway) -> None:
    for i in range(3):
        await gateway.client.put(f"/v1/secrets/local/t/{i}", json={"data": {"k": "v"}})
    cp = await gateway.runtime.audit.checkpoint()
    async with gateway.runtime.store.write() as s:
        await s.execute(delete(AuditEventRow).where(AuditEventRow.seq >= cp["seq"] - 1))
    out = (await gateway.client.get("/v1/audit/verify")).json()
    assert out["ok"] is False and out["checkpoints"] == 1 and "deleted" in out["problem"]


async def test_fail_closed_when_a_required_sink_is_down_and_recovery(settings_factory, tmp_path: Path) -> None:
    import httpx

    from gateway.app import create_app

    sink_dir = tmp_path / "audit"  # does not exist yet: every append fails
    app = create_app(settings_factory(audit_sinks=[{"type": "file", "path": str(sink_dir / "audit.jsonl")}],
                                      audit_wait_seconds=0.3))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://g",
                                     headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as c:
            await static_for(c)
            r = await c.post("/v1/credentials", json={"connector": "vendor", "resource": "default", "wrap": True})
            assert r.status_code == 503 and r.json()["error"]["code"] == "audit_unavailable"
            assert "wrap_token" not in r.text and CANARY not in r.text
            r = await c.get("/v1/secrets/local/vendor/key", params={"reveal": "true"})
            assert r.status_code == 503 and CANARY not in r.text
            ready = await c.get("/readyz")
            assert ready.status_code == 503 and ready.json()["checks"]["audit"] == "unavailable"
            leases = (await c.get("/v1/leases")).json()["items"]
            assert leases and all(x["state"] == "revoked" for x in leases)  # nothing handed out stays live

            sink_dir.mkdir()  # the sink is back
            r = await c.post("/v1/credentials", json={"connector": "vendor", "resource": "default", "wrap": True})
            assert r.status_code == 200
            assert (await c.get("/readyz")).status_code == 200
    lines = [json.loads(line) for line in (sink_dir / "audit.jsonl").read_text().splitlines()]
    assert lines and lines[-1]["action"] == "credentials:wrap" and lines[-1]["hash"]
    assert CANARY not in (sink_dir / "audit.jsonl").read_text()


async def static_for(c) -> None:
    await c.put("/v1/secrets/local/vendor/key", json={"data": {"api_key": CANARY}})
    await c.put("/v1/connectors/vendor", json={"type": "static", "auth_method": "static",
                                               "secret": "local/vendor/key", "resources": ["default"]})

