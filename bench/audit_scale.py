"""The audit trail at scale: a page of the audit query under every filter, and verification.

    .venv/bin/python bench/audit_scale.py [--events 1000000] [--stores postgres,sqlite] [--reps 20] [--before]

For each store (a database of its own on the local PostgreSQL, dropped after; a SQLite
file in a temporary directory) the gateway is started in-process (migrations, audit key),
``--events`` events with a valid keyed chain and a checkpoint every 100 events are written
straight into the store, and then, per filter: the median and the slowest of ``--reps``
pages (``limit=100``) of :func:`gateway.audit.search.search`, each from a random ``after``,
and the same through ``GET /v1/audit`` in-process (auth, policy, the request's own audit
event, serialisation). Then ``verify``: the first (full, marks the head's checkpoint),
an incremental one after 1,000 more events, and ``full=true``. ``--before``: also time the
query as it was before migration 0013 (no LIMIT, the connector filtered in Python) for two
filters. Prints one table per store.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import secrets
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PG_BASE = os.environ.get("BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432")
ACTIONS = ["secrets:read"] * 14 + ["credentials:issue"] * 4 + ["leases:read", "policies:manage"]
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def event(seq: int) -> dict:
    action = ACTIONS[seq % len(ACTIONS)]
    issue = action == "credentials:issue"
    return {
        "seq": seq, "time": T0 + timedelta(seconds=2 * seq), "request_id": f"req-{seq}", "issuer": "credgate",
        "subject": f"client:c{seq % 50}", "action": action, "target": "POST /v1/credentials" if issue else "GET /v1/x",
        "decision": "deny" if seq % 50 == 7 else "allow", "rule": "r", "outcome": "200",
        "lease_id": f"lease_{seq:020d}" if issue else None, "client_addr": "127.0.0.1",
        "details": {"connector": f"conn-{(seq // 20) % 20}", "resource": "default"} if issue else None,
    }


async def fill(rt, n: int, start: int = 1, prev: str | None = None) -> str:
    """``n`` events from ``start`` with a valid chain under the deployment's key, checkpointed."""
    from sqlalchemy import insert

    from gateway.audit.trail import GENESIS, chain_hash, checkpoint_mac
    from gateway.store.models import AuditCheckpointRow, AuditEventRow

    key, chain_from = rt.audit._chain_key, rt.audit.chain_from  # noqa: SLF001 - the bench writes the chain itself
    prev = prev or GENESIS
    batch, cps = [], []
    for seq in range(start, start + n):
        e = event(seq)
        e["prev_hash"] = prev
        e["hash"] = prev = chain_hash(prev, e, key if seq >= chain_from else None)
        batch.append(e)
        if seq % 100 == 0 or seq == start + n - 1:
            cps.append({"seq": seq, "hash": prev, "time": e["time"], "chain_from": chain_from,
                        "mac": checkpoint_mac(key, seq, prev, e["time"], chain_from)})
        if len(batch) == 10_000 or seq == start + n - 1:
            async with rt.store.write() as s:
                await s.execute(insert(AuditEventRow), batch)
                if cps:
                    await s.execute(insert(AuditCheckpointRow), cps)
            batch, cps = [], []
    rt.audit._high = rt.audit._checkpointed = start + n - 1  # noqa: SLF001
    return prev


async def before_search(store, where, limit):
    """The query before migration 0013: no LIMIT, the connector filtered in Python."""
    from sqlalchemy import select

    from gateway.store.models import AuditEventRow

    q = select(AuditEventRow)
    if where.action is not None:
        q = q.where(AuditEventRow.action == where.action)
    if where.after is not None:
        q = q.where(AuditEventRow.seq > where.after)
    items = []
    async with store.read() as s:
        for row in (await s.execute(q.order_by(AuditEventRow.seq))).scalars():
            if where.connector is not None and (row.details or {}).get("connector") != where.connector:
                continue
            items.append(row)
            if len(items) > limit:
                break
    return items


def cases(n: int):
    from gateway.audit.search import Filter

    recent, old = T0 + timedelta(seconds=2 * (n - 500)), T0 + timedelta(seconds=2 * (n // 10))
    return [
        ("no filter", Filter()),
        ("since (last 500 events)", Filter(since=recent)),
        ("since (90% of the trail)", Filter(since=old)),
        ("until (first 10%)", Filter(until=old)),
        ("since+until (a 1,000-event window)", Filter(since=old, until=old + timedelta(seconds=2000))),
        ("subject (1 in 50)", Filter(subject="client:c7")),
        ("action (70%)", Filter(action="secrets:read")),
        ("action (5%)", Filter(action="policies:manage")),
        ("connector (1 in 100)", Filter(connector="conn-3")),
        ("connector absent", Filter(connector="nobody")),
        ("lease_id", Filter(lease_id=f"lease_{(n // 2) - (n // 2) % 20 + 15:020d}")),
        ("decision=deny (2%)", Filter(decision="deny")),
        ("connector+action+since", Filter(connector="conn-3", action="credentials:issue", since=old)),
        ("subject+decision", Filter(subject="client:c7", decision="deny")),
        ("subject+connector (no match)", Filter(subject="client:c1", connector="conn-4")),
    ]


def ms(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 1000:8.1f} {max(xs) * 1000:8.1f}"


async def run_store(name: str, url: str, n: int, reps: int, before: bool, tmp: Path) -> None:
    import dataclasses

    import httpx

    from gateway.audit.search import search
    from gateway.crypto.keyring import new_key_file
    from gateway.settings import load_settings
    from gateway.web.app import create_app

    kek = tmp / f"kek-{name}"
    new_key_file(kek)
    token = "cgt_bench-admin-token-" + "x" * 24
    settings = load_settings(data_dir=tmp / f"data-{name}", database_url=url, kek_file=kek, bootstrap_token=token,
                             reaper_enabled=False, rate_per_address=0, rate_per_principal=0)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        rt = app.state.runtime
        from sqlalchemy import delete, text

        from gateway.store.models import AuditCheckpointRow, AuditEventRow

        async with rt.store.write() as s:  # start from an empty trail: the bench writes every event
            await s.execute(delete(AuditEventRow))
            await s.execute(delete(AuditCheckpointRow))
        t = time.monotonic()
        await fill(rt, n)
        print(f"\n## {name}: {n:,} events written in {time.monotonic() - t:.1f}s", flush=True)
        async with rt.store.write() as s:
            await s.execute(text("ANALYZE audit_events" if rt.store.dialect == "postgresql" else "ANALYZE"))
        print(f"{'filter':38} {'rows':>5} {'query p50':>9} {'max':>8} {'HTTP p50':>9} {'max':>8}  (ms, limit=100, random after)")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://g",
                                     headers={"Authorization": f"Bearer {token}"}) as c:
            for label, where in cases(n):
                q, h, rows = [], [], 0
                for i in range(reps):
                    w = dataclasses.replace(where, after=None if i == 0 else random.randint(0, n))
                    t = time.perf_counter()
                    page = await search(rt.store, w, 100)
                    q.append(time.perf_counter() - t)
                    rows = max(rows, len(page.items))
                    params = {k: (v.isoformat() if isinstance(v, datetime) else v)
                              for k, v in dataclasses.asdict(w).items() if v is not None}
                    t = time.perf_counter()
                    r = await c.get("/v1/audit", params={**params, "limit": 100})
                    h.append(time.perf_counter() - t)
                    assert r.status_code == 200, r.text
                print(f"{label:38} {rows:5d} {ms(q)} {ms(h)}", flush=True)
            if before:
                for label, where in (("BEFORE: no filter", cases(n)[0][1]), ("BEFORE: connector (1 in 100)", cases(n)[8][1])):
                    t = time.perf_counter()
                    await before_search(rt.store, where, 100)
                    a = time.perf_counter() - t
                    t = time.perf_counter()
                    await before_search(rt.store, dataclasses.replace(where, after=n // 2), 100)
                    print(f"{label:38} {'':5} {a * 1000:8.1f} {(time.perf_counter() - t) * 1000:8.1f}  (first page, from the middle)", flush=True)
            for label, kw in (("verify: first (full walk, marks)", {}), ("verify: incremental, 1,000 new events", {}),
                              ("verify: full=true", {"full": True})):
                if "incremental" in label:  # after the head: the GETs above were audited too
                    from sqlalchemy import select
                    async with rt.store.read() as s:
                        top = (await s.execute(select(AuditEventRow.seq, AuditEventRow.hash)
                                               .order_by(AuditEventRow.seq.desc()).limit(1))).first()
                    await fill(rt, 1000, start=top[0] + 1, prev=top[1])
                t = time.perf_counter()
                out = await rt.audit.verify(**kw)
                took = time.perf_counter() - t
                print(f"{label:38} ok={out['ok']} walked {out['walked']:,} from {out['from_seq']:,}: {took * 1000:9.1f} ms",
                      flush=True)


async def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--stores", default="postgres,sqlite")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--before", action="store_true")
    args = p.parse_args()
    import psycopg

    with tempfile.TemporaryDirectory(prefix="cg-audit-scale-") as d:
        tmp = Path(d)
        for store in args.stores.split(","):
            if store == "sqlite":
                await run_store("SQLite", f"sqlite:///{tmp / 'store.db'}", args.events, args.reps, args.before, tmp)
                continue
            db = "credgate_bench_audit_" + secrets.token_hex(4)
            with psycopg.connect(f"{PG_BASE}/postgres", autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{db}"')
            try:
                url = f"{PG_BASE.replace('postgresql://', 'postgresql+psycopg://', 1)}/{db}"
                await run_store("PostgreSQL", url, args.events, args.reps, args.before, tmp)
            finally:
                with psycopg.connect(f"{PG_BASE}/postgres", autocommit=True) as conn:
                    conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
