"""1 worker vs 2 on the metadata read (``GET /v1/secrets/local/vendor/key``), on SQLite and on
PostgreSQL: `credgate serve` with CREDGATE_WORKERS=1 and =2, interleaved rounds, wrk -t1 -c32
-d5s after a 2 s warm-up, and the server's CPU (the serve process and its workers, from /proc)
per request. Needs wrk and the PostgreSQL server of bench/run.py (BENCH_POSTGRES_URL); makes and
drops its own databases. Usage: python bench/workers.py [ROUNDS]

Measured 2026-11-28, 2 cores, other sessions' tests running (load 1.6-1.8), 2 rounds:
SQLite 1,143 / 1,174 req/s with 1 worker, 1,249 / 1,496 with 2; PostgreSQL 932 / 965 with 1,
1,391 / 1,303 with 2; 820-1,065 us of server CPU per request either way (2 workers got
1.0-1.4 cores: wrk and the other sessions had the rest). After merging main (load 1.3):
SQLite 1,240 -> 1,682 req/s (1.36x), PostgreSQL 1,096 -> 1,574 (1.44x), 790-870 us/req.
"""
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path
import psycopg
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.run import PG_BASE, Gateway, lua_script, wrk  # noqa: E402
TICK = os.sysconf("SC_CLK_TCK")
def tree_cpu(pid):
    pids = [pid] + [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    tot = 0.0
    for p in pids:
        f = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        tot += (int(f[11]) + int(f[12])) / TICK
    return tot
work = Path(tempfile.mkdtemp(prefix="credgate-bench-workers-"))
made = []
def newdb():
    name = "credgate_pw_bench_" + secrets.token_hex(4)
    with psycopg.connect(f"{PG_BASE}/postgres", autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    made.append(name)
    return f"{PG_BASE}/{name}"
try:
    gws = {}
    for store in ("sqlite", "postgres"):
        for n in (1, 2):
            gw = Gateway(work, f"{store}-{n}", n, newdb() if store == "postgres" else None)
            gw.start(); time.sleep(1.5); gw.setup(); gw.stop(); gws[f"{store}-{n}"] = gw
    for rnd in range(int(sys.argv[1]) if len(sys.argv) > 1 else 2):
        for name, gw in gws.items():
            gw.start(); time.sleep(1.5)
            try:
                gw.refresh_jwt()
                s = lua_script(work, name, path="/v1/secrets/local/vendor/key", headers={"Authorization": f"Bearer {gw.jwt}"})
                wrk("warm", "credgate", gw.url + "/v1/secrets/local/vendor/key", s, connections=32, duration=2)
                c0 = tree_cpu(gw.proc.pid)
                r = wrk(name, "credgate", gw.url + "/v1/secrets/local/vendor/key", s, connections=32, duration=5)
                cpu = tree_cpu(gw.proc.pid) - c0
                print(f"round {rnd} {name}: {r.rps:.0f} req/s p50 {r.p50_ms:.1f} ms p99 {r.p99_ms:.1f} ms, "
                      f"server CPU {cpu / max(r.requests, 1) * 1e6:.0f} us/req ({cpu / 5:.2f} cores) {r.errors or r.non2xx or ''} "
                      f"load={os.getloadavg()[0]:.1f}", flush=True)
            finally:
                gw.stop()
finally:
    with psycopg.connect(f"{PG_BASE}/postgres", autocommit=True) as c:
        for name in made:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
