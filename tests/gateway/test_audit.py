"""The audit trail over the API: what is recorded, tamper evidence (keyed chain, checkpoints
in and out of the store), fail-closed sinks for credentials and changes of authority, the
reaper's and bulk revocations' events, bounded fields. On SQLite and PostgreSQL."""

from __future__ import annotations

import json
import shutil
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import delete, select, update

from gateway.web.app import create_app
from gateway.audit.trail import GENESIS, chain_hash
from gateway.store.models import AuditCheckpointRow, AuditEventRow, AuditKeyRow, LeaseRow, utcnow
from tests.conftest import ADMIN_TOKEN, Gateway

CANARY = "CANARY-audit-5e1f"


async def events(gw: Gateway | httpx.AsyncClient, **params) -> list[dict]:
    c = gw.client if isinstance(gw, Gateway) else gw
    r = await c.get("/v1/audit", params={"limit": 1000, **params})
    assert r.status_code == 200, r.text
    return r.json()["items"]


async def verify(c: httpx.AsyncClient, full: bool = False) -> dict:
    """``full``: walk the whole chain (the default starts after the last checkpoint an
    earlier verification marked clean: tampering before it needs a full walk)."""
    r = await c.get("/v1/audit/verify", params={"full": "true"} if full else None)
    assert r.status_code == 200, r.text
    return r.json()


async def static_for(c: httpx.AsyncClient) -> None:
    await c.put("/v1/secrets/local/vendor/key", json={"data": {"api_key": CANARY}})
    r = await c.put("/v1/connectors/vendor", json={"type": "static", "auth_method": "static",
                                                   "secret": "local/vendor/key", "resources": ["default"]})
    assert r.status_code in (200, 201), r.text


@asynccontextmanager
async def running(settings):
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://g",
                                     headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as c:
            yield app, c


def sink(tmp_path: Path, name: str = "audit") -> tuple[Path, list[dict]]:
    folder = tmp_path / name
    folder.mkdir(exist_ok=True)
    return folder / "audit.jsonl", [{"type": "file", "path": str(folder / "audit.jsonl")}]


def sink_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def table(store, model, order) -> list:
    async with store.read() as s:
        return list((await s.execute(select(model).order_by(order))).scalars())


# --- what is recorded -----------------------------------------------------------------


async def test_allowed_and_refused_requests_are_recorded_without_values(gateway: Gateway) -> None:
    await static_for(gateway.client)
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
    # A change of authority is recorded before it is made, then with its outcome.
    key_events = [e for e in everything if e["target"] == "POST /v1/admin-keys"]
    assert [e["outcome"] for e in key_events] == ["request", "201"]
    assert (await verify(gateway.client))["ok"] is True


# --- tamper evidence ------------------------------------------------------------------


async def test_an_edited_and_a_deleted_event_are_both_named(gateway: Gateway) -> None:
    for i in range(6):
        await gateway.client.put(f"/v1/secrets/local/t/{i}", json={"data": {"k": "v"}})
    before = await events(gateway)
    assert len(before) >= 6
    edited, deleted = before[1]["seq"], before[4]["seq"]
    async with gateway.runtime.store.write() as s:
        await s.execute(update(AuditEventRow).where(AuditEventRow.seq == edited).values(subject="someone-else"))
        await s.execute(delete(AuditEventRow).where(AuditEventRow.seq == deleted))
    out = await verify(gateway.client)
    assert out["ok"] is False and out["first_bad_seq"] == edited and "modified" in out["problem"]
    named = {p["seq"] for p in out["problems"]}
    assert {edited, deleted} <= named


async def test_an_edit_with_the_chain_recomputed_and_the_checkpoints_deleted_is_found(gateway: Gateway) -> None:
    """Write access to the database is not enough: the links are HMACs under a sealed key."""
    for i in range(5):
        await gateway.client.put(f"/v1/secrets/local/t/{i}", json={"data": {"k": "v"}})
    await gateway.runtime.audit.checkpoint()
    rows = await table(gateway.runtime.store, AuditEventRow, AuditEventRow.seq)
    target = rows[2].seq
    async with gateway.runtime.store.write() as s:
        prev = GENESIS
        for row in rows:
            e = {c.name: getattr(row, c.name) for c in AuditEventRow.__table__.columns}
            if row.seq == target:
                e["subject"] = "someone-else"
            e["prev_hash"], e["hash"] = prev, chain_hash(prev, e)  # the plain SHA-256 chain, recomputed
            prev = e["hash"]
            await s.execute(update(AuditEventRow).where(AuditEventRow.seq == row.seq).values(
                subject=e["subject"], prev_hash=e["prev_hash"], hash=e["hash"]))
        await s.execute(delete(AuditCheckpointRow))
    out = await verify(gateway.client)
    assert out["ok"] is False
    assert out["first_bad_seq"] == 1 and "modified" in out["problem"]  # every recomputed link is refused
    assert target in {p["seq"] for p in out["problems"] if "modified" in p["problem"]}


async def test_a_truncated_tail_is_caught_by_the_checkpoint(gateway: Gateway) -> None:
    for i in range(3):
        await gateway.client.put(f"/v1/secrets/local/t/{i}", json={"data": {"k": "v"}})
    cp = await gateway.runtime.audit.checkpoint()
    async with gateway.runtime.store.write() as s:
        await s.execute(delete(AuditEventRow).where(AuditEventRow.seq >= cp["seq"] - 1))
    out = await verify(gateway.client)
    assert out["ok"] is False and out["first_bad_seq"] == cp["seq"] - 1 and "deleted" in out["problem"]


async def test_events_deleted_after_the_last_checkpoint_are_reported(gateway: Gateway) -> None:
    for i in range(3):
        await gateway.client.put(f"/v1/secrets/local/a/{i}", json={"data": {"k": "v"}})
    cp = await gateway.runtime.audit.checkpoint()
    for i in range(4):
        await gateway.client.put(f"/v1/secrets/local/b/{i}", json={"data": {"k": "v"}})
    head = (await events(gateway))[-1]["seq"] + 1  # + the event of that query
    async with gateway.runtime.store.write() as s:
        await s.execute(delete(AuditEventRow).where(AuditEventRow.seq > cp["seq"]))
    out = await verify(gateway.client)
    assert out["ok"] is False and out["first_bad_seq"] == cp["seq"] + 1
    deleted = f"events {cp['seq'] + 1}-{head} were recorded by this gateway but deleted from the store"
    assert out["problem"].startswith(deleted)
    # New events take the deleted numbers again; that does not hide the deletion, and no
    # checkpoint certifies the shorter chain.
    for i in range(8):
        await gateway.client.put(f"/v1/secrets/local/c/{i}", json={"data": {"k": "v"}})
    await gateway.runtime.audit.checkpoint()
    out = await verify(gateway.client)
    assert out["ok"] is False and out["problem"].startswith(deleted) and out["events"] > head
    assert [c.seq for c in await table(gateway.runtime.store, AuditCheckpointRow, AuditCheckpointRow.seq)][-1] == cp["seq"]


async def test_events_no_checkpoint_covers_are_reported(gateway: Gateway) -> None:
    for i in range(3):
        await gateway.client.put(f"/v1/secrets/local/a/{i}", json={"data": {"k": "v"}})
    cp = await gateway.runtime.audit.checkpoint()
    async with gateway.runtime.store.write() as s:  # a checkpoint that does not verify covers nothing
        await s.execute(update(AuditCheckpointRow).where(AuditCheckpointRow.seq == cp["seq"]).values(hash="0" * 64))
    out = await verify(gateway.client)
    assert out["ok"] is False
    assert {"seq": 1, "problem": f"events 1-{out['events']} are after the last checkpoint: not covered"} in out["problems"]


async def test_a_tail_truncated_with_its_checkpoints_is_found_against_the_sink_file(settings_factory, tmp_path: Path) -> None:
    path, sinks = sink(tmp_path)
    async with running(settings_factory(audit_sinks=sinks)) as (app, c):
        for i in range(3):
            await c.put(f"/v1/secrets/local/a/{i}", json={"data": {"k": "v"}})
        first = await app.state.runtime.audit.checkpoint()
        for i in range(3):
            await c.put(f"/v1/secrets/local/b/{i}", json={"data": {"k": "v"}})
        assert (await verify(c))["ok"] is True
    # Gateway stopped (a final checkpoint was published). The store loses its tail and the
    # checkpoints that vouched for it.
    lines = sink_lines(path)
    published = [x for x in lines if x.get("type") == "audit-checkpoint"]
    assert published and all(x["mac"] and "signature" not in x for x in published)
    last = published[-1]["seq"]
    assert last > first["seq"]
    await truncate(settings_factory, first["seq"])
    async with running(settings_factory(audit_sinks=[])) as (app, c):  # the sink is not this gateway's any more
        body = {"source": "audit.jsonl",
                "checkpoints": [x for x in lines if x.get("type") == "audit-checkpoint"],
                "events": [x for x in lines if "type" not in x]}
        r = await c.post("/v1/audit/verify", json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["ok"] is False and out["first_bad_seq"] == first["seq"] + 1
        assert out["problem"] == (f"the store ends at event {first['seq']} but audit.jsonl records events up to {last}: "
                                  f"events {first['seq'] + 1}-{last} were deleted (the tail was truncated)")
        assert (await verify(c))["ok"] is True  # the store alone can't tell
        # A forged line in the file is not believed.
        forged = dict(published[-1], seq=last + 50)
        r = await c.post("/v1/audit/verify", json={"checkpoints": [forged]})
        assert {"seq": last + 50, "problem": f"checkpoint {last + 50} in FILE is not authentic"} in r.json()["problems"]


async def truncate(settings_factory, after: int) -> None:
    """Delete the store's events after ``after`` and their checkpoints, with no gateway running."""
    from gateway.store import Store

    store = Store(settings_factory().store_url)
    try:
        async with store.write() as s:
            await s.execute(delete(AuditEventRow).where(AuditEventRow.seq > after))
            await s.execute(delete(AuditCheckpointRow).where(AuditCheckpointRow.seq > after))
    finally:
        await store.aclose()


async def test_a_restarted_gateway_compares_the_store_with_its_own_sink_file(settings_factory, tmp_path: Path) -> None:
    path, sinks = sink(tmp_path)
    async with running(settings_factory(audit_sinks=sinks)) as (app, c):
        for i in range(4):
            await c.put(f"/v1/secrets/local/a/{i}", json={"data": {"k": "v"}})
        first = await app.state.runtime.audit.checkpoint()
        await c.put("/v1/secrets/local/b/0", json={"data": {"k": "v"}})
    await truncate(settings_factory, first["seq"])
    async with running(settings_factory(audit_sinks=sinks)) as (app, c):
        out = await verify(c)
        assert out["ok"] is False and out["first_bad_seq"] == first["seq"] + 1
        assert any("truncated" in p["problem"] and f"file:{path}" in p["problem"] for p in out["problems"])
        assert await app.state.runtime.audit.checkpoint() is None  # the shorter chain is not certified


async def test_checkpoints_verify_after_the_signing_key_is_rotated(gateway: Gateway) -> None:
    for i in range(3):
        await gateway.client.put(f"/v1/secrets/local/t/{i}", json={"data": {"k": "v"}})
    await gateway.runtime.audit.checkpoint()
    for _ in range(2):  # no grace: the old keys are retired at once
        assert (await gateway.client.post("/v1/keys/signing/rotate", json={})).status_code == 200
    out = await verify(gateway.client)
    assert out["ok"] is True and out["checkpoints"] >= 1 and out["covered_to"] == out["events"]


async def test_an_upgraded_deployment_keeps_its_plain_chain_verifiable(settings_factory) -> None:
    """A store from before migration 0008: plain SHA-256 links and signed checkpoints.
    After the upgrade they verify without the signing key; new events are keyed; an
    edit of the old part is still found."""
    async with running(settings_factory()) as (app, c):
        for i in range(4):
            await c.put(f"/v1/secrets/local/old/{i}", json={"data": {"k": "v"}})
        rt = app.state.runtime
        rows = await table(rt.store, AuditEventRow, AuditEventRow.seq)
        async with rt.store.write() as s:  # what a pre-0008 gateway wrote, and what 0008 leaves
            prev = GENESIS
            for row in rows:
                e = {col.name: getattr(row, col.name) for col in AuditEventRow.__table__.columns}
                e["prev_hash"], e["hash"] = prev, chain_hash(prev, e)
                prev = e["hash"]
                await s.execute(update(AuditEventRow).where(AuditEventRow.seq == row.seq).values(
                    prev_hash=e["prev_hash"], hash=e["hash"]))
            await s.execute(delete(AuditCheckpointRow))
        rows = await table(rt.store, AuditEventRow, AuditEventRow.seq)
        by_seq = {r.seq: r.hash for r in rows}
        legacy = rows[1].seq
        sig = rt.signing.sign({"seq": legacy, "hash": by_seq[legacy], "time": utcnow().isoformat(),
                               "typ": "audit-checkpoint"}, typ="cg-audit+jwt")
        async with rt.store.write() as s:
            s.add(AuditCheckpointRow(seq=legacy, hash=by_seq[legacy], time=utcnow(), signature=sig))
            await s.execute(update(AuditKeyRow).values(chain_from=max(by_seq) + 1))
        last_plain = max(by_seq)
        rt.audit._high = 0  # noqa: SLF001 - this process "wrote" nothing past the rewritten store
        rt.audit._checkpointed = 10**9  # noqa: SLF001 - and must not checkpoint at shutdown
    async with running(settings_factory()) as (app, c):
        rt = app.state.runtime
        assert rt.audit.chain_from == last_plain + 1
        cps = {cp.seq: cp for cp in await table(rt.store, AuditCheckpointRow, AuditCheckpointRow.seq)}
        assert cps[legacy].mac and cps[last_plain].mac  # the signed one got a MAC; the switch is certified
        await c.put("/v1/secrets/local/new/0", json={"data": {"k": "v"}})
        out = await verify(c)
        assert out["ok"] is True and out["chain_from"] == last_plain + 1, out
        new = (await events(c))[-1]
        assert new["seq"] > last_plain and new["hash"] != chain_hash(new["prev_hash"], new)  # keyed, not plain
        assert (await c.post("/v1/keys/signing/rotate", json={})).status_code == 200
        assert (await verify(c))["ok"] is True
        # Rewriting the old, plain part (recomputing its links) breaks the link of the first keyed event.
        rows = await table(rt.store, AuditEventRow, AuditEventRow.seq)
        async with rt.store.write() as s:
            prev = GENESIS
            for row in rows:
                if row.seq > last_plain:
                    break
                e = {col.name: getattr(row, col.name) for col in AuditEventRow.__table__.columns}
                if row.seq == 1:
                    e["subject"] = "someone-else"
                e["prev_hash"], e["hash"] = prev, chain_hash(prev, e)
                prev = e["hash"]
                await s.execute(update(AuditEventRow).where(AuditEventRow.seq == row.seq).values(
                    subject=e["subject"], prev_hash=e["prev_hash"], hash=e["hash"]))
        out = await verify(c, full=True)  # the rewritten part was verified before: only a full walk re-reads it
        assert out["ok"] is False
        assert any(p["seq"] == last_plain + 1 and "does not link" in p["problem"] for p in out["problems"])
        assert any(p["seq"] == last_plain and "differs from its checkpoint" in p["problem"] for p in out["problems"])


# --- fail closed ------------------------------------------------------------------------


async def test_fail_closed_when_a_required_sink_is_down_and_recovery(settings_factory, tmp_path: Path) -> None:
    sink_dir = tmp_path / "audit"
    sink_dir.mkdir()
    app = create_app(settings_factory(audit_sinks=[{"type": "file", "path": str(sink_dir / "audit.jsonl")}],
                                      audit_wait_seconds=0.3))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://g",
                                     headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as c:
            await static_for(c)
            shutil.rmtree(sink_dir)  # every append fails from now on
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
    lines = [x for x in sink_lines(sink_dir / "audit.jsonl") if "type" not in x]
    assert lines and lines[-1]["action"] == "credentials:wrap" and lines[-1]["hash"]
    assert CANARY not in (sink_dir / "audit.jsonl").read_text()


async def test_with_the_sink_down_no_token_is_handed_out_and_no_authority_changes(settings_factory, tmp_path: Path) -> None:
    from joserfc.jwk import RSAKey

    path, sinks = sink(tmp_path)
    async with running(settings_factory(audit_sinks=sinks, audit_wait_seconds=0.3)) as (app, c):
        rt = app.state.runtime
        await static_for(c)
        client = (await c.post("/v1/clients", json={"client_id": "svc", "roles": ["operator"]})).json()
        kid = rt.signing.jwks()["keys"][0]["kid"]
        kek = (await c.get("/v1/keys/status")).json()
        shutil.rmtree(path.parent)  # the required sink goes away

        attempts = {
            "access token": await c.post("/v1/auth/token", data={
                "grant_type": "client_credentials", "client_id": "svc", "client_secret": client["client_secret"]}),
            "run token": await c.post("/v1/runs/run-1/token", json={"connectors": ["vendor"], "resources": ["default"]}),
            "admin key": await c.post("/v1/admin-keys", json={"name": "k2", "role": "admin"}),
            "client": await c.post("/v1/clients", json={"client_id": "svc2", "roles": ["admin"]}),
            "policy": await c.put("/v1/policies/p", json={"rules": [
                {"principals": {"roles": ["auditor"]}, "actions": ["secrets:read"]}]}),
            "issuer": await c.put("/v1/issuers/idp", json={
                "issuer_url": "https://idp.example", "audiences": ["credgate"],
                "jwks": {"keys": [RSAKey.generate_key(2048).as_dict(private=False)]}}),
            "signing key": await c.post("/v1/keys/signing/rotate", json={}),
            "kek": await c.post("/v1/keys/rotate"),
        }
        for what, r in attempts.items():
            assert r.status_code == 503, (what, r.status_code, r.text)
            assert r.json()["error"]["code"] == "audit_unavailable", what
            assert r.headers.get("retry-after"), what
            assert "token" not in r.json()["error"] and "client_secret" not in r.text, what
        assert "access_token" not in attempts["access token"].text

        path.parent.mkdir()  # back: nothing of the above happened
        assert [k["name"] for k in (await c.get("/v1/admin-keys")).json()["items"]] == ["bootstrap"]
        assert [x["client_id"] for x in (await c.get("/v1/clients")).json()["items"]] == ["svc"]
        assert (await c.get("/v1/policies/p")).status_code == 404
        assert (await c.get("/v1/issuers/idp")).status_code == 404
        assert await rt.runs.get("run-1") is None
        assert rt.signing.jwks()["keys"][0]["kid"] == kid
        assert (await c.get("/v1/keys/status")).json() == kek
        # Each attempt was recorded before it was refused (the store took it, the sink did not).
        refused = [e for e in await events(c) if e["outcome"] == "503 audit_unavailable"]
        assert len(refused) >= len(attempts)
        assert (await c.post("/v1/admin-keys", json={"name": "k2", "role": "admin"})).status_code == 201


# --- lease events -----------------------------------------------------------------------


async def test_reaper_revocations_are_audited(gateway: Gateway) -> None:
    await static_for(gateway.client)
    ids = [(await gateway.client.post("/v1/credentials", json={"connector": "vendor", "resource": "default", "wrap": True})).json()["lease_id"]
           for _ in range(2)]
    rt = gateway.runtime
    async with rt.store.write() as s:
        await s.execute(update(LeaseRow).where(LeaseRow.id == ids[0]).values(expires_at=utcnow() - timedelta(seconds=5)))
    await rt.leases.mark_revoking(lease_ids=[ids[1]])  # due now: the reaper's next tick revokes it
    done = await rt.reaper.tick()
    assert done["expired"] == 1 and done["revoked"] == 1
    by_reaper = [e for e in await events(gateway) if e["subject"] == "reaper"]
    assert {(e["lease_id"], e["action"], e["outcome"]) for e in by_reaper} == {
        (ids[0], "leases:expire", "expired"), (ids[1], "leases:revoke", "revoked")}
    assert all(e["issuer"] == "credgate" and e["details"]["connector"] == "vendor" for e in by_reaper)
    assert (await verify(gateway.client))["ok"] is True


async def test_bulk_and_run_revocations_record_each_lease(gateway: Gateway) -> None:
    await static_for(gateway.client)
    ids = [(await gateway.client.post("/v1/credentials", json={"connector": "vendor", "resource": "default", "wrap": True})).json()["lease_id"]
           for _ in range(3)]
    r = await gateway.client.post("/v1/leases/revoke", json={"connector": "vendor"})
    assert r.status_code == 200 and r.json()["matched"] == 3
    ended = [e for e in await events(gateway) if e["action"] == "leases:revoke" and e["outcome"] == "lease ended"]
    assert sorted(e["lease_id"] for e in ended) == sorted(ids)
    assert all(e["subject"] == "admin_key:bootstrap" and e["target"] == "POST /v1/leases/revoke" for e in ended)

    run = (await gateway.client.post("/v1/runs/run-9/token", json={"connectors": ["vendor"], "resources": ["default"]})).json()
    async with gateway.as_token(run["token"]) as pipeline:
        who = (await pipeline.get("/v1/auth/whoami")).json()
        lease = (await pipeline.post("/v1/runs/run-9/credentials", json={"connector": "vendor", "resource": "default", "wrap": True})).json()["lease_id"]
        assert (await gateway.client.post("/v1/runs/run-9/revoke")).status_code == 200
        refused = await pipeline.post("/v1/runs/run-9/credentials", json={"connector": "vendor", "resource": "default",
                                                                          "wrap": True})
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "run_revoked"
    everything = await events(gateway)
    assert any(e["lease_id"] == lease and e["action"] == "leases:revoke" and e["target"] == "POST /v1/runs/run-9/revoke"
               for e in everything)
    refusal = next(e for e in everything if e["request_id"] == refused.headers["x-request-id"])
    assert refusal["outcome"] == "401 run_revoked"
    assert (refusal["issuer"], refusal["subject"]) == (who["issuer"], who["subject"])  # who asked


# --- bounded fields ---------------------------------------------------------------------


async def test_no_caller_input_can_fail_an_audit_write(gateway: Gateway) -> None:
    """A client_id far over the subject column on the token endpoint is still audited,
    bounded; the store keeps working (PostgreSQL refused the whole batch before)."""
    huge = "c" * 5000 + "é" * 300
    r = await gateway.client.post("/v1/auth/token", data={"grant_type": "client_credentials", "client_id": huge,
                                                           "client_secret": "x" * 3000})
    assert r.status_code in (400, 401)
    event = next(e for e in await events(gateway) if e["request_id"] == r.headers["x-request-id"])
    for field in ("subject", "issuer", "target", "outcome"):
        assert event[field] is None or len(event[field]) <= 256
    assert (await gateway.client.get("/readyz")).status_code == 200

    # The one place every event passes through bounds whatever a caller could put in it.
    rt = gateway.runtime
    wild = {"request_id": "r" * 500, "issuer": "i" * 900, "subject": "s\x00" * 900, "action": "a" * 300,
            "target": "t" * 5000, "decision": "allow" * 10, "rule": "u" * 900, "outcome": "o" * 900,
            "lease_id": "l" * 300, "client_addr": "1" * 300,
            "details": {"k" * 300: "v" * 100_000, "many": list(range(10_000)), "deep": {"a": {"b": {"c": {"d": {"e": 1}}}}},
                        "bad": "\ud800"}}
    await rt.audit.record(wild, fail_closed=True)
    stored = (await events(gateway))[-1]
    assert stored["subject"].endswith("...[cut]") and len(stored["subject"]) == 256 and "\x00" not in stored["subject"]
    assert len(stored["target"]) == 700 and len(stored["lease_id"]) == 40 and len(stored["decision"]) == 16
    assert len(json.dumps(stored["details"])) <= 4000
    assert (await gateway.client.get("/readyz")).status_code == 200
    assert (await verify(gateway.client))["ok"] is True


# --- incremental verification and the query at scale ------------------------------------


async def _writes(gw: Gateway, n: int, tag: str) -> None:
    for i in range(n):
        await gw.client.put(f"/v1/secrets/local/{tag}/{i}", json={"data": {"k": "v"}})


async def test_incremental_verify_starts_at_the_marked_checkpoint_and_equals_a_full_walk(gateway: Gateway) -> None:
    await _writes(gateway, 4, "a")
    first = await verify(gateway.client)  # no mark yet: the whole chain, then the newest checkpoint is marked
    assert first["ok"] is True and first["incremental"] is False and first["from_seq"] == 1
    marked = first["covered_to"]
    await _writes(gateway, 3, "b")
    inc = await verify(gateway.client)
    assert inc["ok"] is True and inc["incremental"] is True and inc["from_seq"] == marked + 1
    assert inc["walked"] < inc["events"]
    full = await verify(gateway.client, full=True)
    assert full["incremental"] is False and full["from_seq"] == 1 and full["walked"] == full["events"]
    same = ("ok", "first_bad_seq", "problem", "problems", "chain_from")  # (events: the first verify is audited too)
    assert {k: inc[k] for k in same} == {k: full[k] for k in same}


async def test_incremental_verify_finds_tampering_after_the_mark_and_only_a_full_walk_before_it(gateway: Gateway) -> None:
    await _writes(gateway, 4, "a")
    marked = (await verify(gateway.client))["covered_to"]
    await _writes(gateway, 4, "b")
    rows = await table(gateway.runtime.store, AuditEventRow, AuditEventRow.seq)
    before, after = rows[1].seq, rows[-2].seq
    assert before < marked < after
    async with gateway.runtime.store.write() as s:
        await s.execute(update(AuditEventRow).where(AuditEventRow.seq == after).values(subject="someone-else"))
    out = await verify(gateway.client)
    assert out["incremental"] is True and out["ok"] is False and out["first_bad_seq"] == after
    async with gateway.runtime.store.write() as s:  # undo it; now edit an event the mark vouches for
        await s.execute(update(AuditEventRow).where(AuditEventRow.seq == after).values(subject=rows[-2].subject))
        await s.execute(update(AuditEventRow).where(AuditEventRow.seq == before).values(subject="someone-else"))
    assert (await verify(gateway.client))["ok"] is True  # incremental: trusts what was verified before
    out = await verify(gateway.client, full=True)
    assert out["ok"] is False and out["first_bad_seq"] == before and "modified" in out["problem"]


async def test_events_deleted_before_the_mark_are_found_by_the_incremental_walk(gateway: Gateway) -> None:
    await _writes(gateway, 4, "a")
    marked = (await verify(gateway.client))["covered_to"]
    async with gateway.runtime.store.write() as s:
        await s.execute(delete(AuditEventRow).where(AuditEventRow.seq == 2))
    out = await verify(gateway.client)
    assert out["ok"] is False and out["incremental"] is False  # the mark's count no longer holds: a full walk
    assert any(p["seq"] == 2 and "missing" in p["problem"] for p in out["problems"])
    assert any(f"checkpoint {marked}" in p["problem"] and "deleted or added" in p["problem"] for p in out["problems"])


async def test_a_forged_or_copied_verification_mark_is_refused_and_reported(gateway: Gateway) -> None:
    await _writes(gateway, 3, "a")
    marked = (await verify(gateway.client))["covered_to"]
    async with gateway.runtime.store.read() as s:
        mark = (await s.get(AuditCheckpointRow, marked)).verified
    assert mark and mark.startswith("v1:")
    await _writes(gateway, 3, "b")
    await gateway.runtime.audit.checkpoint()
    newest = (await table(gateway.runtime.store, AuditCheckpointRow, AuditCheckpointRow.seq))[-1].seq
    assert newest > marked
    # Without the chain key, an attacker can only copy a real mark onto a newer checkpoint, or make one up;
    # and edit an event after the real mark (which the forged one would have skipped).
    for forged in (mark, f"v1:0:{newest}:" + "0" * 64):
        async with gateway.runtime.store.write() as s:
            await s.execute(update(AuditCheckpointRow).where(AuditCheckpointRow.seq == newest).values(verified=forged))
            await s.execute(update(AuditEventRow).where(AuditEventRow.seq == marked + 1).values(subject="someone-else"))
        out = await verify(gateway.client)
        assert out["ok"] is False and out["incremental"] is False and out["from_seq"] == 1
        assert any(p["seq"] == newest and "forged verification mark" in p["problem"] for p in out["problems"])
        assert any(p["seq"] == marked + 1 and "modified" in p["problem"] for p in out["problems"])


async def test_the_connector_filter_pages_in_sql_through_its_index(gateway: Gateway) -> None:
    await static_for(gateway.client)
    for i in range(5):
        r = await gateway.client.post("/v1/credentials", json={"connector": "vendor", "resource": "default", "wrap": True})
        assert r.status_code in (200, 201), r.text
        await gateway.client.put(f"/v1/secrets/local/x/{i}", json={"data": {"k": "v"}})
    everything = await events(gateway)
    want = [e["seq"] for e in everything if (e["details"] or {}).get("connector") == "vendor"]
    assert len(want) >= 5
    got, after = [], None
    while True:  # pages of 2: each ends where the next starts, none skips or repeats an event
        r = await gateway.client.get("/v1/audit", params={"connector": "vendor", "limit": 2,
                                                           **({"after": after} if after is not None else {})})
        page = r.json()
        got += [e["seq"] for e in page["items"]]
        after = page["next_after"]
        if after is None:
            break
        assert len(page["items"]) == 2 and after == page["items"][-1]["seq"]
    assert got == want
    both = await events(gateway, connector="vendor", action=everything[-1]["action"])
    assert all(e["details"]["connector"] == "vendor" for e in both)
    store = gateway.runtime.store
    if store.dialect == "sqlite":  # the planner finds the expression index (its SQL is the query's)
        from gateway.audit.search import Filter, search

        from sqlalchemy import text as sql
        async with store.read() as s:
            plan = " ".join(str(r) for r in (await s.execute(sql(
                "EXPLAIN QUERY PLAN SELECT seq FROM audit_events WHERE json_extract(details, '$.connector') = 'vendor' "
                "AND seq > 0 ORDER BY seq LIMIT 3"))).all())
        assert "ix_audit_events_connector_seq" in plan
        assert [e.seq for e in (await search(store, Filter(connector="vendor"), 2)).items] == want[:2]


async def test_the_run_filter_finds_every_event_of_one_run(gateway: Gateway) -> None:
    from tests.gateway.test_identity import setup_server_client, static

    await static(gateway, "wandb")
    server_token = await setup_server_client(gateway)
    async with gateway.as_token(server_token) as server:
        run_a = (await server.post("/v1/runs/run-A/token", json={"connectors": ["wandb"], "resources": ["default"]})).json()
        run_b = (await server.post("/v1/runs/run-B/token", json={"connectors": ["wandb"], "resources": ["default"]})).json()
        r = await server.post("/v1/runs/run-A/credentials", json={"connector": "wandb", "resource": "default", "wrap": True})
        assert r.status_code == 200, r.text
        delegated = r.json()["lease_id"]
    async with gateway.as_token(run_a["token"]) as pipeline:
        own = (await pipeline.post("/v1/credentials", json={"connector": "wandb", "resource": "default", "wrap": True})).json()
        assert (await pipeline.get("/v1/backends")).status_code == 403  # refused, still the run's event
    async with gateway.as_token(run_b["token"]) as other:
        assert (await other.post("/v1/credentials", json={"connector": "wandb", "resource": "default", "wrap": True})).status_code == 200
    async with gateway.as_token(server_token) as server:
        assert (await server.post("/v1/runs/run-A/revoke")).json()["leases_revoked"] == 2

    got = await events(gateway, run="run-A")
    seqs = [e["seq"] for e in got]
    assert seqs == sorted(seqs)
    seen = [(e["target"], e["subject"], e["outcome"]) for e in got]
    assert ("POST /v1/runs/run-A/token", "client:zenml-server", "200") in seen
    assert ("POST /v1/runs/run-A/credentials", "client:zenml-server", "200") in seen
    assert ("POST /v1/credentials", "run:run-A", "200") in seen
    assert ("GET /v1/backends", "run:run-A", "403 permission_denied") in seen
    assert ("POST /v1/runs/run-A/revoke", "client:zenml-server", "200") in seen
    ended = {e["lease_id"] for e in got if e["outcome"] == "lease ended"}
    assert ended == {delegated, own["lease_id"]}
    # Nothing of run B, nor anything else.
    assert not any("run-B" in (e["target"] or "") or e["subject"] == "run:run-B" for e in got)
    everything = await events(gateway)
    want = [e["seq"] for e in everything if (e["details"] or {}).get("run_id") == "run-A" or e["subject"] == "run:run-A"]
    assert seqs == want
    # Pages of 2, through the keyset.
    paged, after = [], None
    while True:
        page = (await gateway.client.get("/v1/audit", params={"run": "run-A", "limit": 2,
                                                              **({"after": after} if after is not None else {})})).json()
        paged += [e["seq"] for e in page["items"]]
        after = page["next_after"]
        if after is None:
            break
    assert paged == seqs
    # Combined with another filter.
    assert [e["seq"] for e in await events(gateway, run="run-A", subject="run:run-A")] == \
        [e["seq"] for e in got if e["subject"] == "run:run-A"]
    for bad in ("", "a b", "x" * 129):
        r = await gateway.client.get("/v1/audit", params={"run": bad})
        assert r.status_code == 422 and r.json()["error"]["code"], (bad, r.text)
    store = gateway.runtime.store
    if store.dialect == "sqlite":
        from sqlalchemy import text as sql

        async with store.read() as s:
            plan = " ".join(str(r) for r in (await s.execute(sql(
                "EXPLAIN QUERY PLAN SELECT seq FROM audit_events WHERE json_extract(details, '$.run_id') = 'run-A' "
                "AND seq > 0 ORDER BY seq LIMIT 3"))).all())
        assert "ix_audit_events_run_id_seq" in plan, plan


async def test_the_hmac_filter_finds_the_events_naming_a_wrap_token_or_client_secret(gateway: Gateway) -> None:
    await static_for(gateway.client)
    wraps = []
    for _ in range(2):
        r = await gateway.client.post("/v1/credentials", json={"connector": "vendor", "resource": "default", "wrap": True})
        assert r.status_code == 200, r.text
        wraps.append(r.json()["wrap_token"])
    async with gateway.as_token(None) as anon:
        assert (await anon.post("/v1/unwrap", json={"wrap_token": wraps[0]})).status_code == 200
        assert (await anon.post("/v1/unwrap", json={"wrap_token": wraps[0]})).status_code != 200  # replayed: recorded too
        assert (await anon.post("/v1/unwrap", json={"wrap_token": wraps[1]})).status_code == 200
    created = (await gateway.client.post("/v1/clients", json={"client_id": "svc"})).json()
    async with gateway.as_token(None) as anon:
        for secret in (created["client_secret"], "cgs_wrong"):
            await anon.post("/v1/auth/token", content=f"grant_type=client_credentials&client_id=svc&client_secret={secret}",
                            headers={"Content-Type": "application/x-www-form-urlencoded"})

    async def keyed(value: str) -> str:
        return (await gateway.client.post("/v1/audit/hash", json={"value": value})).json()["hmac"]

    first = await events(gateway, hmac=await keyed(wraps[0]))
    assert [(e["target"], e["details"]["wrap_token"]) for e in first] == [("POST /v1/unwrap", await keyed(wraps[0]))] * 2
    assert first[0]["outcome"] == "200" and first[1]["outcome"] != "200"
    assert len(await events(gateway, hmac=await keyed(wraps[1]))) == 1
    right = await events(gateway, hmac=await keyed(created["client_secret"]))
    assert [(e["target"], e["outcome"]) for e in right] == [("POST /v1/auth/token", "200")]
    wrong = await events(gateway, hmac=await keyed("cgs_wrong"))
    assert len(wrong) == 1 and wrong[0]["outcome"].startswith("401")
    assert await events(gateway, hmac=await keyed("never-seen")) == []
    for bad in ("abc", "hmac-sha256:" + "0" * 63, "hmac-sha256:" + "G" * 64, wraps[0]):
        r = await gateway.client.get("/v1/audit", params={"hmac": bad})
        assert r.status_code == 422 and r.json()["error"]["code"], (bad, r.text)
    params = {p["name"]: p for p in gateway.app.openapi()["paths"]["/v1/audit"]["get"]["parameters"]}
    assert params["run"]["description"] and "wrap_token" in params["hmac"]["description"]
    store = gateway.runtime.store
    if store.dialect == "sqlite":
        from sqlalchemy import text as sql

        async with store.read() as s:
            plan = " ".join(str(r) for r in (await s.execute(sql(
                "EXPLAIN QUERY PLAN SELECT seq FROM audit_events WHERE json_extract(details, '$.wrap_token') = 'x' "
                "AND seq > 0 ORDER BY seq LIMIT 3"))).all())
        assert "ix_audit_events_wrap_token_seq" in plan, plan


async def test_newest_first_pages_back_in_time_without_a_gap_or_a_repeat(gateway: Gateway) -> None:
    for i in range(5):
        await gateway.client.put(f"/v1/secrets/local/n/{i}", json={"data": {"k": "v"}})
    want = [e["seq"] for e in await events(gateway, action="secrets:write")][::-1]
    assert len(want) >= 5
    got, before = [], None
    while True:
        r = await gateway.client.get("/v1/audit", params={"action": "secrets:write", "order": "desc", "limit": 2,
                                                           **({"before": before} if before is not None else {})})
        assert r.status_code == 200, r.text
        page = r.json()
        got += [e["seq"] for e in page["items"]]
        before = page["next_after"]
        if before is None:
            break
        assert before == page["items"][-1]["seq"]
    assert got == want
    bad = await gateway.client.get("/v1/audit", params={"order": "sideways"})
    assert bad.status_code == 422
