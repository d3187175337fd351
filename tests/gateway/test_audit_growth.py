"""Audit growth under attack (issue 14 item 8): refusals that change nothing are folded into
one event per kind and window (the first written as ever, the rest counted), with a bounded
table of kinds; retention archives old events and prunes them while the chain still verifies
from the cut on (an anchor checkpoint and the audited prune) and the archive verifies against it."""

from __future__ import annotations

import asyncio
import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest
from sqlalchemy import delete, func, select

from gateway.audit.trail import PRUNE_ACTION, AuditUnavailable
from gateway.store.models import AuditEventRow
from tests.conftest import ADMIN_TOKEN
from tests.gateway.test_audit import running, table, verify

sqlite_only = pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)


async def rows(store) -> list[dict]:
    return [{c.name: getattr(r, c.name) for c in AuditEventRow.__table__.columns}
            for r in await table(store, AuditEventRow, AuditEventRow.seq)]


def size(events: list[dict]) -> int:
    """Bytes an event takes in the store, near enough: its fields and chain hashes as JSON."""
    return sum(len(json.dumps(e, default=str)) for e in events)


async def flood(app, n: int, *, path: str = "/v1/secrets/local/app/k{i}", batch: int = 250) -> list[int]:
    statuses: list[int] = []
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://g") as c:
        for start in range(0, n, batch):
            rs = await asyncio.gather(*(c.get(path.format(i=i), headers={"Authorization": f"Bearer cgt_bogus-{i}"})
                                        for i in range(start, min(n, start + batch))))
            statuses += [r.status_code for r in rs]
    return statuses


def aggregates(events: list[dict]) -> list[dict]:
    return [e for e in events if (e.get("details") or {}).get("aggregate")]


@sqlite_only
async def test_a_flood_of_bogus_tokens_is_a_few_rows_that_count_it_exactly(settings_factory, tmp_path: Path) -> None:
    # Before: every refusal its own row (window 0).
    async with running(settings_factory(data_dir=tmp_path / "before", audit_refusal_window_seconds=0)) as (app, c):
        base = len(await rows(app.state.runtime.store))
        assert set(await flood(app, 500)) == {401}
        plain = (await rows(app.state.runtime.store))[base:]
        assert len(plain) == 500 and not aggregates(plain)
    before = size(plain) / 500

    settings = settings_factory(audit_refusal_window_seconds=3600)
    async with running(settings) as (app, c):
        store = app.state.runtime.store
        base = len(await rows(store))
        assert set(await flood(app, 5000)) == {401}
        # In the same window: a refusal of another kind (a 403 of a denied caller) and requests
        # that succeed or change authority, each its own event.
        ops = (await c.post("/v1/admin-keys", json={"name": "ops", "role": "operator"})).json()["token"]
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://g",
                                     headers={"Authorization": f"Bearer {ops}"}) as o:
            for _ in range(5):
                assert (await o.get("/v1/secrets/local/app/k1", params={"reveal": "true"})).status_code == 403
                assert (await o.post("/v1/admin-keys", json={"name": "x", "role": "operator"})).status_code == 403
        for i in range(3):
            assert (await c.get("/v1/backends")).status_code == 200
            assert (await c.post("/v1/admin-keys", json={"name": f"k{i}", "role": "operator"})).status_code == 201
        during = (await rows(store))[base:]
        flood_events = [e for e in during if e["outcome"] == "401 invalid_token"]
        # The first 3 (audit_refusal_first) as ever, the rest counted.
        assert len(flood_events) == 3 and not aggregates(flood_events)
        assert flood_events[0]["target"] == "GET /v1/secrets/local/app/k0" and flood_events[0]["client_addr"]
        denied_reads = [e for e in during if e["outcome"] == "403 permission_denied" and e["action"] == "secrets:reveal"]
        assert len(denied_reads) == 3  # its own kind: its first are written, not folded into the 401s
        denied_authority = [e for e in during if e["outcome"] == "403 permission_denied"
                            and e["target"] == "POST /v1/admin-keys"]
        assert len(denied_authority) == 5  # refusals of a change of authority are never folded
        assert len([e for e in during if e["target"] == "GET /v1/backends" and e["outcome"] == "200"]) == 3
        assert [e["outcome"] for e in during if e["target"] == "POST /v1/admin-keys"
                and e["subject"] == "admin_key:bootstrap"].count("request") == 4
        assert app.state.runtime.audit.refusal_kinds == 2
        assert (await verify(c))["ok"] is True

    # At shutdown the window's counts are written: one aggregate per kind, summing exactly.
    async with running(settings) as (app, c):
        after = (await rows(app.state.runtime.store))[base:]
        flood_events = [e for e in after if e["outcome"] == "401 invalid_token"]
        agg = aggregates(flood_events)
        assert len(flood_events) == 4 and len(agg) == 1
        a = agg[0]["details"]["aggregate"]
        assert 3 + a["count"] == 5000
        assert a["kind"] == "GET /v1/secrets/{mount}/{path:path}" or a["kind"].startswith("GET /v1/secrets/")
        assert a["first_time"] <= a["last_time"] and agg[0]["client_addr"] == flood_events[0]["client_addr"]
        denied = aggregates([e for e in after if e["action"] == "secrets:reveal"])
        assert len(denied) == 1 and denied[0]["details"]["aggregate"]["count"] == 2
        assert len([e for e in after if e["target"] == "POST /v1/admin-keys" and e["outcome"] == "403 permission_denied"]) == 5
        assert (await verify(c))["ok"] is True
    now = size(flood_events) / 5000
    print(f"\naudit bytes per refused request: {before:.0f} one row each (window 0), "
          f"{now:.2f} aggregated (5000 refusals -> {len(flood_events)} rows)")
    assert now < before / 100


@sqlite_only
async def test_the_window_closes_and_a_new_one_starts_with_its_first_event(settings_factory) -> None:
    async with running(settings_factory(audit_refusal_window_seconds=0.3)) as (app, c):
        store = app.state.runtime.store
        base = len(await rows(store))
        assert set(await flood(app, 50, batch=50)) == {401}
        for _ in range(100):  # the aggregate lands when the window closes
            if aggregates((await rows(store))[base:]):
                break
            await asyncio.sleep(0.05)
        assert set(await flood(app, 50, batch=50)) == {401}
        assert (await verify(c))["ok"] is True
    async with running(settings_factory(audit_refusal_window_seconds=0.3)) as (app, c):
        events = [e for e in (await rows(app.state.runtime.store))[base:] if e["outcome"] == "401 invalid_token"]
        firsts = [e for e in events if not (e["details"] or {}).get("aggregate")]
        assert len(firsts) == 6 and len(aggregates(events)) == 2
        assert len(firsts) + sum(e["details"]["aggregate"]["count"] for e in aggregates(events)) == 100


@sqlite_only
async def test_the_table_of_kinds_stays_within_its_cap_and_the_overflow_is_written(settings_factory) -> None:
    cap = 500
    async with running(settings_factory(audit_refusal_window_seconds=3600)) as (app, c):
        audit = app.state.runtime.audit
        base = len(await rows(app.state.runtime.store))

        def refused(i: int) -> dict:
            return {"request_id": None, "issuer": None, "subject": None, "action": None, "target": "GET /v1/backends",
                    "decision": "deny", "rule": None, "outcome": "401 invalid_token", "lease_id": None,
                    "client_addr": f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", "details": None}

        largest = 0
        for start in range(0, 10_000, 1000):
            # Each address twice: the first written, the second counted until its kind is pushed out.
            await asyncio.gather(*(audit.refusal(refused(i), kind="GET /v1/backends", window=3600, cap=cap)
                                   for i in range(start, start + 1000) for _ in range(2)))
            largest = max(largest, audit.refusal_kinds)
        assert largest <= cap
        events = (await rows(app.state.runtime.store))[base:]
        firsts = [e for e in events if not (e["details"] or {}).get("aggregate")]
        agg = aggregates(events)
        assert len({e["client_addr"] for e in firsts}) == 10_000
        assert len(agg) >= 10_000 - cap and all(e["details"]["aggregate"]["count"] == 1 for e in agg)
        assert (await verify(c))["ok"] is True


async def test_prune_archives_deletes_and_the_chain_still_verifies(settings_factory, tmp_path: Path) -> None:
    async with running(settings_factory()) as (app, c):
        rt = app.state.runtime
        for i in range(5):
            assert (await c.put(f"/v1/secrets/local/app/k{i}", json={"data": {"v": "x"}})).status_code in (200, 201)
        await asyncio.sleep(0.01)
        cut = datetime.now(timezone.utc)
        await asyncio.sleep(0.01)
        for i in range(3):
            assert (await c.get("/v1/backends")).status_code == 200
        old = [e for e in await rows(rt.store) if e["time"] < cut]
        archive = tmp_path / "audit-archive.jsonl"
        out = await rt.audit.prune(cut, archive)
        assert out["pruned"] == len(old) and out["pruned_through"] == old[-1]["seq"]

        kept = await rows(rt.store)
        assert kept[0]["seq"] == old[-1]["seq"] + 1 and all(e["time"] >= cut for e in kept)
        prunes = [e for e in kept if e["action"] == PRUNE_ACTION]
        assert [e["outcome"] for e in prunes] == ["request", f"pruned {len(old)} events"]
        assert prunes[0]["details"]["pruned_through"] == out["pruned_through"]
        report = await verify(c)
        assert report["ok"] is True, report
        assert report["covered_to"] == kept[-1]["seq"]

        lines = [json.loads(x) for x in archive.read_text().splitlines()]
        archived = [x for x in lines if "type" not in x]
        assert [e["seq"] for e in archived] == [e["seq"] for e in old]
        good = await rt.audit.verify(lines, against_name=archive.name)
        assert good["ok"] is True, good
        assert good["compared"]["events"] == len(old)

        # Tampering with the archive is detected: an edited event, and a dropped one.
        edited = [dict(x) for x in lines]
        edited[2]["outcome"] = "299 edited"
        bad = await rt.audit.verify(edited, against_name="archive")
        assert not bad["ok"] and any(p["seq"] == archived[2]["seq"] and "modified" in p["problem"]
                                     for p in bad["problems"])
        dropped = [x for x in lines if x.get("seq") != archived[1]["seq"] or "type" in x]
        bad = await rt.audit.verify(dropped, against_name="archive")
        assert not bad["ok"] and any("missing" in p["problem"] for p in bad["problems"])

        # Deleting more from the head than the prune cut is not hidden by the anchor.
        async with rt.store.write() as s:
            await s.execute(delete(AuditEventRow).where(AuditEventRow.seq == kept[0]["seq"]))
        broken = await verify(c)
        assert not broken["ok"] and broken["first_bad_seq"] == 1


@sqlite_only
async def test_the_retention_policy_archives_and_prunes_old_events_by_itself(settings_factory, tmp_path: Path) -> None:
    """audit_retention_days: the reaper's leader prunes on its own, pass after pass, each
    pass into a new archive; the store keeps only recent events, the chain verifies from
    the cut, each archive verifies against it, and a replica that does not lead prunes nothing."""
    keep_days = 1.0 / 86400  # one second
    archive_dir = tmp_path / "archive"
    settings = settings_factory(reaper_enabled=True, audit_retention_days=keep_days, audit_archive_dir=archive_dir,
                                audit_retention_check_seconds=0.3)
    async with running(settings) as (app, c):
        rt = app.state.runtime
        for i in range(4):
            assert (await c.put(f"/v1/secrets/local/app/k{i}", json={"data": {"v": "x"}})).status_code in (200, 201)
        first = (await rows(rt.store))[0]["seq"]
        for _ in range(100):  # a pass prunes what is a second old
            await asyncio.sleep(0.1)
            if archives := sorted(archive_dir.glob("audit-before-*.jsonl")):
                break
        assert archives, "no retention pass ran"
        assert (await c.get("/v1/backends")).status_code == 200
        await asyncio.sleep(1.5)  # the next passes prune the first ones' own events
        kept = await rows(rt.store)
        assert kept[0]["seq"] > first
        assert all(e["action"] != "secrets:write" for e in kept)
        report = await verify(c)
        assert report["ok"] is True, report
        archives = sorted(archive_dir.glob("audit-before-*.jsonl"))
        archived = [json.loads(x) for a in archives for x in a.read_text().splitlines()]
        assert [e["seq"] for e in archived if "type" not in e][0] == first
        # The archives, read together in order, continue into what the store keeps.
        together = await rt.audit.verify(archived, against_name="the archives")
        assert together["ok"] is True, together
        assert together["compared"]["events"] == len([e for e in archived if "type" not in e]) > 4
        assert oct(archive_dir.stat().st_mode & 0o777) == "0o700"
        assert any(e["action"] == PRUNE_ACTION and e["subject"] == "audit retention" for e in kept)

    # Not leading (another replica is): nothing is pruned however old.
    other = settings_factory(data_dir=tmp_path / "other", database_url=f"sqlite:///{tmp_path / 'other.db'}",
                             reaper_enabled=True, audit_retention_days=keep_days,
                             audit_archive_dir=tmp_path / "other-archive", audit_retention_check_seconds=0.2)
    async with running(other) as (app, c):
        app.state.runtime.reaper._sqlite_leader = False
        app.state.runtime.reaper._lead = _never  # type: ignore[method-assign]
        assert (await c.put("/v1/secrets/local/app/k", json={"data": {"v": "x"}})).status_code in (200, 201)
        await asyncio.sleep(1.6)
        assert not list((tmp_path / "other-archive").glob("*.jsonl"))


async def _never() -> bool:
    return False


@sqlite_only
async def test_prune_is_refused_when_it_cannot_be_audited(settings_factory, tmp_path: Path) -> None:
    sink_dir = tmp_path / "audit"
    sink_dir.mkdir()
    settings = settings_factory(audit_sinks=[{"type": "file", "path": str(sink_dir / "audit.jsonl")}],
                                audit_wait_seconds=0.3)
    async with running(settings) as (app, c):
        rt = app.state.runtime
        assert (await c.get("/v1/backends")).status_code == 200
        cut = datetime.now(timezone.utc)
        async with rt.store.read() as s:
            count = (await s.execute(select(func.count()).select_from(AuditEventRow))).scalar()
        shutil.rmtree(sink_dir)  # the required sink is down
        with pytest.raises(AuditUnavailable):
            await rt.audit.prune(cut, tmp_path / "archive.jsonl")
        async with rt.store.read() as s:
            assert (await s.execute(select(func.count()).select_from(AuditEventRow)
                                    .where(AuditEventRow.time < cut))).scalar() >= count  # nothing deleted
        sink_dir.mkdir()
    assert ADMIN_TOKEN


def test_credgate_audit_prune_then_verify_and_verify_against_the_archive(tmp_path: Path) -> None:
    import re
    import subprocess

    from tests.gateway.test_audit_cli import CREDGATE, clean_env, cli, serve, stop

    proc, addr, out = serve(tmp_path, with_sink=True)  # a file sink too: its pruned lines must not upset verify
    try:
        token = re.findall(r"^CREDGATE_TOKEN=(\S+)$", out.read_text(), re.M)[0]
        assert cli(addr, token, "backend", "list").returncode == 0
        assert cli(addr, "cgt_bogus", "backend", "list").returncode != 0
    finally:
        stop(proc, out)
    cut = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    archive = tmp_path / "archive.jsonl"
    cfg = tmp_path / "with-sink.yaml"
    pruned = subprocess.run([CREDGATE, "audit", "prune", "--before", cut, "--archive", str(archive), "--config",
                             str(cfg), "--dev"], capture_output=True, text=True, timeout=60, env=clean_env())
    assert pruned.returncode == 0 and pruned.stdout.startswith("pruned "), pruned.stdout + pruned.stderr
    proc, addr, out = serve(tmp_path, with_sink=True)
    try:
        ok = cli(addr, token, "audit", "verify")
        assert ok.returncode == 0 and ok.stdout.startswith("ok:"), ok.stdout + ok.stderr
        ok = cli(addr, token, "audit", "verify", "--against", str(archive))
        assert ok.returncode == 0 and "of archive.jsonl" in ok.stdout, ok.stdout + ok.stderr
        tampered = tmp_path / "tampered.jsonl"
        tampered.write_text(archive.read_text().replace('"outcome": "401 invalid_token"', '"outcome": "200"'))
        bad = cli(addr, token, "audit", "verify", "--against", str(tampered))
        assert bad.returncode == 1 and "modified in tampered.jsonl" in bad.stdout, bad.stdout + bad.stderr
    finally:
        stop(proc, out)
    assert "invalid_token" in archive.read_text()
