"""The web console at scale: each console page's latency (the whole page: the console's own
API calls in-process, rendering) on a PostgreSQL store, empty and then holding --leases leases
(1,000,000 by default), --runs runs and --audit-events audit events inserted straight into it
(bench/run.py's insert_leases and insert_audit_events). A page that answers from the indexed
keyset queries takes about as long at 1,000,000 leases as at none.

    .venv/bin/python bench/console_scale.py [--leases N] [--rounds R] [--write bench/CONSOLE.md]

Needs the PostgreSQL server at 127.0.0.1:5432 (BENCH_POSTGRES_URL)."""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.run import (  # noqa: E402
    PG_BASE, Gateway, insert_audit_events, insert_leases, log, pct, pg_admin, recreate_db,
)

STORE_DB = "credgate_bench_console"
PAGES = (
    ("overview", "/console"),
    ("leases, first page", "/console/leases"),
    ("leases, next page", "NEXT"),
    ("leases: state=active", "/console/leases?state=active"),
    ("leases: connector + state", "/console/leases?connector=vendor&state=revoked"),
    ("leases: principal", "/console/leases?principal=credgate%2Fclient%3A7"),
    ("leases: run", "/console/leases?run=run-42"),
    ("runs", "/console/runs"),
    ("audit, first page", "/console/audit"),
    ("audit: principal", "/console/audit?subject=admin_key%3Abootstrap"),
)


def sign_in(url: str, key: str) -> httpx.Client:
    c = httpx.Client(base_url=url, headers={"Origin": url}, timeout=120)
    pre = re.search(r'name="pre" value="([^"]+)"', c.get("/console/login").text).group(1)
    r = c.post("/v1/auth/console/key", data={"pre": pre, "key": key})
    assert r.status_code == 303 and r.headers["location"] == "/console", r.text
    return c


def measure(c: httpx.Client, rounds: int) -> dict[str, tuple[float, float]]:
    first = c.get("/console/leases").text
    token = re.search(r'page_token=(lease_[A-Za-z0-9_]+)', first)
    out = {}
    for name, path in PAGES:
        if path == "NEXT":
            if token is None:
                continue
            path = f"/console/leases?page_token={token.group(1)}"
        c.get(path)  # warm (the first request of a kind pays for caches and plans)
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            r = c.get(path)
            times.append((time.perf_counter() - t0) * 1000)
            assert r.status_code == 200 and 'data-testid="error"' not in r.text, (path, r.status_code, r.text[-500:])
        out[name] = (pct(times, 0.5), pct(times, 0.99))
    return out


API = (  # what the pages ask the API (the admin key as bearer), timed the same way
    ("GET /v1/auth/whoami", "/v1/auth/whoami"),
    ("GET /v1/leases?limit=50", "/v1/leases?limit=50"),
    ("GET /v1/leases?state=active&limit=50", "/v1/leases?state=active&limit=50"),
    ("GET /v1/leases?run=run-42&limit=50", "/v1/leases?run=run-42&limit=50"),
    ("GET /v1/leases/summary", "/v1/leases/summary"),
    ("GET /v1/leases/issuance?hours=24", "/v1/leases/issuance?hours=24"),
    ("GET /v1/runs?limit=50", "/v1/runs?limit=50"),
)


def measure_api(url: str, key: str, rounds: int) -> dict[str, tuple[float, float]]:
    out = {}
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as c:
        for name, path in API:
            c.get(path)
            times = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                r = c.get(path)
                times.append((time.perf_counter() - t0) * 1000)
                assert r.status_code == 200, (path, r.status_code, r.text[:300])
            out[name] = (pct(times, 0.5), pct(times, 0.99))
    return out


def insert_runs(dsn: str, n: int) -> None:
    with pg_admin(dsn) as c:
        c.execute("""INSERT INTO runs (run_id, created_by, created_at, revoked_at)
                     SELECT 'run-' || g, 'credgate/client:' || (g %% 50), now() - interval '30 days' + g * interval '1 minute',
                            CASE WHEN g %% 3 = 0 THEN now() - interval '1 day' END
                     FROM generate_series(0, %s - 1) AS g""", (n,))
        c.execute("ANALYZE runs")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--leases", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=5000)
    ap.add_argument("--audit-events", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--write", type=Path, help="write the results (markdown) to this file")
    args = ap.parse_args()
    store = f"{PG_BASE}/{STORE_DB}"
    recreate_db(STORE_DB)
    work = Path(tempfile.mkdtemp(prefix="cg-console-bench-"))
    gw = Gateway(work, "console", None, database_url=store)
    try:
        gw.start()
        gw.setup()
        empty = measure(sign_in(gw.url, gw.token), args.rounds)
        empty.update(measure_api(gw.url, gw.token, args.rounds))
        gw.stop()
        log(f"inserting {args.leases:,} leases, {args.runs:,} runs, {args.audit_events:,} audit events")
        ins = insert_leases(store, args.leases)
        insert_runs(store, args.runs)
        ains = insert_audit_events(store, args.audit_events)[0] if args.audit_events else 0.0
        gw.start()
        with pg_admin(store) as c:
            n = c.execute("SELECT count(*) FROM leases").fetchone()[0]
        load = os.getloadavg()
        full = measure(sign_in(gw.url, gw.token), args.rounds)
        full.update(measure_api(gw.url, gw.token, args.rounds))
    finally:
        gw.stop()
        with pg_admin() as c:
            c.execute(f'DROP DATABASE IF EXISTS "{STORE_DB}" WITH (FORCE)')
    lines = [
        "# The console at scale (bench/console_scale.py)",
        "",
        f"- {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; nproc {os.cpu_count()}; load average during the "
        f"measurement {load[0]:.2f} / {load[1]:.2f}; PostgreSQL store, one `credgate serve` process",
        f"- {n:,} leases ({args.leases:,} inserted in {ins:.0f} s: 10% active, 90% revoked, 50 principals, "
        f"5,000 run ids, issued over 23 days), {args.runs:,} runs, {args.audit_events:,} audit events "
        f"(inserted in {ains:.0f} s)",
        f"- each page fetched {args.rounds} times after one warm-up, signed in as the bootstrap admin key; "
        "the whole page: the console's in-process API calls and the rendering",
        "",
        f"| page | p50 / p99 ms, empty store | p50 / p99 ms, {n:,} leases |",
        "|---|---|---|",
    ]
    for name, _ in PAGES + API:
        if name in full:
            e, f = empty.get(name), full[name]
            shown = f"{e[0]:.1f} / {e[1]:.1f}" if e else "- (one page only)"
            lines.append(f"| {name} | {shown} | {f[0]:.1f} / {f[1]:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        args.write.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
