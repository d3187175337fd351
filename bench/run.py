"""credgate benchmark: the gateway against a bare FastAPI app, in one run.

    .venv/bin/python bench/run.py [--duration 10] [--connections 32] [--scenarios bare,a,b,c,d,e]

Starts a bare FastAPI app and `credgate serve` (same server: uvicorn, uvloop,
httptools, one worker), drives both with wrk, prints requests/s, p50 and p99 per
scenario with its ratio to the baseline and the target, and writes the table to
bench/RESULTS.md (with --write-results). See bench/README.md.

Only loopback is used: the gateway, the bare app and PostgreSQL on 127.0.0.1.
Every load run is bounded by --duration and --connections.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout: tests.services.waiting, shared with the tests

from tests.services.waiting import clean_env, free_port, wait_until_serving  # noqa: E402
PY = sys.executable
CREDGATE = str(Path(PY).parent / "credgate")
PG_BASE = os.environ.get("BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432")
STORE_DB = "credgate_bench_store"
TARGET_DB = "credgate_bench_target"
CLIENT_ID = "bench"
N_LEASES = 1_000_000
N_EXPIRED = 10_000


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --- servers ------------------------------------------------------------------


class BareApp:
    def __init__(self, work: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.out = work / "bare.out"
        self.proc = subprocess.Popen(
            [PY, "-m", "uvicorn", "bench.bare_app:app", "--host", "127.0.0.1", "--port", str(self.port),
             "--loop", "uvloop", "--http", "httptools", "--workers", "1", "--no-access-log", "--log-level", "warning"],
            cwd=ROOT, stdout=self.out.open("w"), stderr=subprocess.STDOUT, env=clean_env(),
        )
        wait_until_serving(f"{self.url}/ping", self.proc, 120, log=self.out, name="bare app", interval=0.02)

    def stop(self) -> None:
        stop(self.proc)


class Gateway:
    """`credgate serve` (not dev mode) with a KEK file and a bootstrap token."""

    def __init__(self, work: Path, name: str, database_url: str | None = None, **env: str) -> None:
        self.work = work / name
        self.work.mkdir(parents=True, exist_ok=True)
        self.kek = self.work / "kek"
        if not self.kek.exists():
            subprocess.run([CREDGATE, "keys", "generate", "--out", str(self.kek)], check=True,
                           capture_output=True, env=clean_env())
        self.token = "cgt_bench_" + secrets.token_urlsafe(32)
        self.database_url = database_url
        self.extra_env = env
        self.proc: subprocess.Popen | None = None
        self.startup_seconds = float("nan")
        self.jwt = ""

    def start(self) -> float:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = clean_env(
            CREDGATE_DATA_DIR=str(self.work / "data"),
            CREDGATE_KEK_FILE=str(self.kek),
            CREDGATE_BOOTSTRAP_TOKEN=self.token,
            CREDGATE_PORT=str(self.port),
            CREDGATE_RATE_PER_ADDRESS="0",
            CREDGATE_RATE_PER_PRINCIPAL="0",
            CREDGATE_LOG_LEVEL="warning",
            **self.extra_env,
        )
        if self.database_url:
            env["CREDGATE_DATABASE_URL"] = self.database_url
        (self.work / "data").mkdir(exist_ok=True, mode=0o700)
        self.out = self.work / f"serve-{int(time.time())}.out"
        t0 = time.monotonic()
        self.proc = subprocess.Popen([CREDGATE, "serve"], stdout=self.out.open("w"), stderr=subprocess.STDOUT, env=env)
        wait_until_serving(f"{self.url}/readyz", self.proc, 120, log=self.out, name="credgate serve", interval=0.02)
        self.startup_seconds = time.monotonic() - t0
        self.admin = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=600)
        return self.startup_seconds

    def stop(self) -> None:
        stop(self.proc)

    @property
    def rss_mb(self) -> float:
        assert self.proc is not None
        return rss_mb(self.proc.pid)

    def call(self, method: str, path: str, ok: tuple[int, ...] = (200, 201, 204), **kw) -> httpx.Response:
        r = self.admin.request(method, path, **kw)
        if r.status_code not in ok:
            raise RuntimeError(f"{method} {path}: {r.status_code} {r.text[:500]}")
        return r

    def setup(self, *, postgres_target: bool) -> None:
        """Through the API: a static connector, optionally a postgres one, a client with a policy; its JWT."""
        self.call("PUT", "/v1/secrets/local/vendor/key", json={"data": {"api_key": "bench-" + secrets.token_hex(8), "entity": "ml"}})
        self.call("PUT", "/v1/connectors/vendor", json={
            "type": "static", "auth_method": "static", "secret": "local/vendor/key", "resources": ["default"],
            "default_ttl_seconds": 60, "max_ttl_seconds": 300})
        if postgres_target:
            self.call("PUT", "/v1/secrets/local/targets/pg", json={"data": {"dsn": f"{PG_BASE}/postgres"}})
            self.call("PUT", "/v1/connectors/pgbench", json={
                "type": "postgres", "auth_method": "password", "secret": "local/targets/pg",
                "resources": [TARGET_DB], "config": {"privileges": ["SELECT"]}, "max_ttl_seconds": 3600})
        self.call("PUT", "/v1/policies/bench", json={"rules": [{
            "description": "the benchmark's service client",
            "principals": {"issuer": "credgate", "subject": f"client:{CLIENT_ID}"},
            "actions": ["credentials:issue", "credentials:wrap", "secrets:read", "leases:read"],
            "connectors": ["*"], "resources": ["*"], "max_ttl_seconds": 3600}]})
        created = self.call("POST", "/v1/clients", json={"client_id": CLIENT_ID, "token_ttl_seconds": 7200}).json()
        self.client_secret = created["client_secret"]
        self.refresh_jwt()

    def refresh_jwt(self) -> None:
        r = httpx.post(f"{self.url}/v1/auth/token", timeout=30,
                       content=f"grant_type=client_credentials&client_id={CLIENT_ID}&client_secret={self.client_secret}",
                       headers={"Content-Type": "application/x-www-form-urlencoded"})
        r.raise_for_status()
        self.jwt = r.json()["access_token"]
        assert self.jwt.count(".") == 2, "expected a gateway JWT"


# --- wrk ------------------------------------------------------------------------


@dataclass
class Result:
    name: str
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int = 0
    errors: str = ""
    baseline: str = ""
    ratio: float | None = None
    target: str = ""
    verdict: str = ""
    base: Result | None = None  # the bare run measured just before this one
    notes: list[str] = field(default_factory=list)


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        raise ValueError(text)
    return float(m.group(1)) * _UNITS[m.group(2)]


def lua_script(work: Path, name: str, *, method: str = "GET", path: str = "/", headers: dict[str, str] | None = None,
               body: str | None = None, request_fn: str = "") -> Path:
    lines = [f"wrk.method = {json.dumps(method)}", f"wrk.path = {json.dumps(path)}"]
    for k, v in (headers or {}).items():
        lines.append(f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}")
    if body is not None:
        lines.append(f"wrk.body = {json.dumps(body)}")
    if request_fn:
        lines.append(request_fn)
    # Count statuses so a scenario that only returned errors cannot pass for fast.
    lines.append("""
local statuses = {}
response = function(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end
""")
    p = work / f"{name}.lua"
    p.write_text("\n".join(lines) + "\n")
    return p


def wrk(name: str, url: str, script: Path | None, *, connections: int, duration: int, threads: int = 1) -> Result:
    cmd = ["wrk", f"-t{min(threads, connections)}", f"-c{connections}", f"-d{duration}s", "--latency", "--timeout", "10s"]
    if script is not None:
        cmd += ["-s", str(script)]
    cmd.append(url)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    out = res.stdout
    if res.returncode != 0 or "Requests/sec" not in out:
        raise RuntimeError(f"wrk failed for {name}: {res.stdout}\n{res.stderr}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    dist = dict(re.findall(r"^\s+(50|99)%\s+(\S+)\s*$", out, re.M))
    if "50" not in dist or "99" not in dist:
        raise RuntimeError(f"could not parse wrk's latency distribution for {name}:\n{out}")
    total = int(re.search(r"(\d+) requests in", out).group(1))
    errors = []
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        errors.append(f"non-2xx {non2xx.group(1)}")
    sock = re.search(r"Socket errors: (.*)$", out, re.M)
    if sock:
        errors.append(f"socket errors: {sock.group(1)}")
    return Result(name, rps, _ms(dist["50"]), _ms(dist["99"]), total, "; ".join(errors))


# --- PostgreSQL helpers --------------------------------------------------------------


def pg_admin():
    import psycopg

    return psycopg.connect(f"{PG_BASE}/postgres", autocommit=True)


def recreate_db(name: str) -> None:
    with pg_admin() as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        c.execute(f'CREATE DATABASE "{name}"')


def prepare_target() -> None:
    """The target database of scenario (c): two tables in schema public."""
    import psycopg

    with pg_admin() as c:
        exists = c.execute("SELECT 1 FROM pg_database WHERE datname = %s", (TARGET_DB,)).fetchone()
        if not exists:
            c.execute(f'CREATE DATABASE "{TARGET_DB}"')
    with psycopg.connect(f"{PG_BASE}/{TARGET_DB}", autocommit=True) as c:
        c.execute("CREATE TABLE IF NOT EXISTS sales (id int primary key, amount numeric)")
        c.execute("CREATE TABLE IF NOT EXISTS customers (id int primary key, name text)")


async def plain_psycopg_loop(concurrency: int, duration: float) -> tuple[Result, list[str]]:
    """What the postgres connector does per credential, without the gateway: connect to the
    target database, SHOW password_encryption, and in one transaction CREATE ROLE ... VALID UNTIL,
    GRANT CONNECT, GRANT USAGE, GRANT SELECT ON ALL TABLES; then close. ``concurrency`` loops.
    Like the connector, the transaction first takes an advisory lock so that concurrent GRANTs
    into one database take turns (without it PostgreSQL fails some with "tuple concurrently
    updated", and the reference would be a loop that fails a third of its work)."""
    import psycopg
    from psycopg import sql

    latencies: list[float] = []
    roles: list[str] = []
    deadline = time.monotonic() + duration
    expires = datetime.now(timezone.utc).replace(microsecond=0).isoformat()

    async def one() -> None:
        role = "cgbench_" + secrets.token_hex(8)
        password = secrets.token_urlsafe(24)
        t0 = time.perf_counter()
        async with await psycopg.AsyncConnection.connect(f"{PG_BASE}/{TARGET_DB}", connect_timeout=10) as conn:
            (alg,) = await (await conn.execute("SHOW password_encryption")).fetchone()
            verifier = conn.pgconn.encrypt_password(password.encode(), role.encode(), alg.encode())
            r, s = sql.Identifier(role), sql.Identifier("public")
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext('credgate:grant'))")
                await conn.execute(sql.SQL(
                    "CREATE ROLE {} WITH LOGIN NOINHERIT NOSUPERUSER NOCREATEDB NOCREATEROLE "
                    "NOREPLICATION NOBYPASSRLS PASSWORD {} VALID UNTIL {}").format(
                        r, sql.Literal(verifier.decode()), sql.Literal(expires)))
                await conn.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(sql.Identifier(TARGET_DB), r))
                await conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(s, r))
                await conn.execute(sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA {} TO {}").format(s, r))
        roles.append(role)
        latencies.append((time.perf_counter() - t0) * 1000)

    failures: dict[str, int] = {}

    async def loop() -> None:
        while time.monotonic() < deadline:
            try:
                await one()
            except psycopg.Error as exc:  # counted like the gateway's non-2xx answers
                failures[type(exc).__name__] = failures.get(type(exc).__name__, 0) + 1

    t0 = time.monotonic()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    elapsed = time.monotonic() - t0
    latencies.sort()
    pct = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]  # noqa: E731
    errors = "; ".join(f"{k} {v}" for k, v in failures.items())
    return Result("c-psycopg", len(latencies) / elapsed, pct(0.50), pct(0.99), len(latencies), errors), roles


def drop_roles(roles: list[str]) -> None:
    import psycopg

    with psycopg.connect(f"{PG_BASE}/{TARGET_DB}", autocommit=True) as c:
        for role in roles:
            c.execute(f'DROP OWNED BY "{role}"')
            c.execute(f'DROP ROLE IF EXISTS "{role}"')


def drop_leftover_gateway_roles() -> int:
    """Roles a revocation left behind (the gateway stops before its reaper retries):
    the cg_ roles still granted CONNECT on the target database."""
    import psycopg

    with psycopg.connect(f"{PG_BASE}/{TARGET_DB}", autocommit=True) as c:
        rows = c.execute(
            "SELECT r.rolname FROM pg_database d, aclexplode(d.datacl) a JOIN pg_roles r ON r.oid = a.grantee "
            "WHERE d.datname = %s AND r.rolname LIKE 'cg\\_%%'", (TARGET_DB,)).fetchall()
    drop_roles([r for (r,) in rows])
    return len(rows)


INSERT_LEASES = """
    INSERT INTO leases (id, connector, connector_type, resource, principal, run_id, state, revocability,
        renewable, wrapped, issued_at, expires_at, max_expires_at, revoke_state, idempotency_key,
        request_hash, attempts, next_attempt_at, last_error, revoked_at, updated_at,
        kek_version, wrapped_dek, ciphertext)
"""


def insert_leases(dsn: str, n: int) -> float:
    """1,000,000 historical leases straight into the store (one INSERT ... SELECT generate_series):
    90% revoked in the past, 10% active static leases expiring in a day (the reaper leaves them be)."""
    import psycopg

    t0 = time.monotonic()
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(
            INSERT_LEASES + """
            SELECT 'lease_bench' || lpad(g::text, 12, '0'), 'vendor', 'static', 'default',
                'credgate/client:' || (g %% 50)::text, 'run-' || (g %% 5000)::text,
                CASE WHEN g %% 10 = 0 THEN 'active' ELSE 'revoked' END, 'expiry-only', false, true,
                now() - interval '30 days' + g * interval '2 seconds',
                CASE WHEN g %% 10 = 0 THEN now() + interval '1 day' ELSE now() - interval '1 day' END,
                now() + interval '1 day', '{}'::json, NULL, NULL, 0, NULL, NULL,
                CASE WHEN g %% 10 = 0 THEN NULL ELSE now() - interval '1 day' END, now(), NULL, NULL, NULL
            FROM generate_series(1, %s) AS g
            """,
            (n,),
        )
        c.execute("ANALYZE leases")
    return time.monotonic() - t0


def insert_expired_revocable(dsn: str, n: int) -> None:
    """``n`` active, revocable postgres leases that expired a minute ago; their roles were never
    created, so each revoke is a real DROP ROLE IF EXISTS round trip to the target."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(
            INSERT_LEASES + """
            SELECT 'lease_reap' || lpad(g::text, 12, '0'), 'pgbench', 'postgres', %s,
                'credgate/client:bench', NULL, 'active', 'revocable', true, false,
                now() - interval '1 hour', now() - interval '1 minute', now() + interval '1 hour',
                json_build_object('role', 'cg_reap' || lpad(g::text, 12, '0'), 'database', %s::text, 'schema', NULL),
                NULL, NULL, 0, NULL, NULL, NULL, now(), NULL, NULL, NULL
            FROM generate_series(1, %s) AS g
            """,
            (TARGET_DB, TARGET_DB, n),
        )


def count_reap_pending(dsn: str) -> int:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as c:
        return c.execute("SELECT count(*) FROM leases WHERE id LIKE 'lease_reap%' AND state IN ('active', 'revoking')").fetchone()[0]


# --- scenarios -----------------------------------------------------------------------


def issue_script(work: Path, gw: Gateway, name: str) -> Path:
    return lua_script(work, name, method="POST", path="/v1/credentials",
                      headers={"Authorization": f"Bearer {gw.jwt}", "Content-Type": "application/json"},
                      body=json.dumps({"connector": "vendor", "resource": "default", "wrap": True, "ttl_seconds": 60}))


def check_once(gw: Gateway, method: str, path: str, **kw) -> None:
    """One request first: the scenario measures successes, not a fast error."""
    r = httpx.request(method, gw.url + path, headers={"Authorization": f"Bearer {gw.jwt}"}, timeout=30, **kw)
    if r.status_code not in (200, 201):
        raise RuntimeError(f"{method} {path} -> {r.status_code} {r.text[:300]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=10, help="seconds of load per scenario (default 10)")
    ap.add_argument("--connections", type=int, default=32, help="wrk connections for a, b, d, e (default 32)")
    ap.add_argument("--pg-connections", type=int, default=8, help="concurrency of scenario c, both sides (default 8)")
    ap.add_argument("--scenarios", default="a,b,c,d,e", help="comma-separated subset of a,b,c,d,e (bare always runs)")
    ap.add_argument("--leases", type=int, default=N_LEASES, help="leases in the PostgreSQL store for d/e")
    ap.add_argument("--write-results", action="store_true", help="write the table to bench/RESULTS.md")
    args = ap.parse_args()
    wanted = set(args.scenarios.split(","))

    if shutil.which("wrk") is None:
        print("wrk is not installed. On Debian: apt-get update && apt-get install -y wrk", file=sys.stderr)
        return 2
    if not Path(CREDGATE).exists():
        print(f"{CREDGATE} not found: install credgate into this venv first (pip install -e .)", file=sys.stderr)
        return 2

    C, D = args.connections, args.duration
    results: list[Result] = []
    facts: list[str] = []
    work = Path(tempfile.mkdtemp(prefix="credgate-bench-"))
    log(f"work dir {work}")
    procs: list = []
    try:
        bare = BareApp(work)
        procs.append(bare)
        log("bare app up; warm-up and measure")
        wrk("warmup", f"{bare.url}/ping", None, connections=C, duration=2)
        base = wrk("bare", f"{bare.url}/ping", None, connections=C, duration=D)
        results.append(base)

        def against_bare(name: str, url: str, script: Path) -> Result:
            """Measure the bare app again right before ``name``: on a shared machine its rate
            drifts by a factor of two or more within minutes, so each ratio uses its neighbour."""
            ref = wrk(f"bare@{name}", f"{bare.url}/ping", None, connections=C, duration=D)
            results.append(ref)
            r = wrk(name, url, script, connections=C, duration=D)
            r.base = ref
            return r

        if wanted & {"a", "b", "c"}:
            gw = Gateway(work, "sqlite")
            procs.append(gw)
            gw.start()
            if "c" in wanted:
                prepare_target()
            gw.setup(postgres_target="c" in wanted)
            log(f"gateway (SQLite store) up in {gw.startup_seconds:.2f}s")
            if "a" in wanted:
                s = issue_script(work, gw, "a")
                check_once(gw, "POST", "/v1/credentials", json={"connector": "vendor", "resource": "default", "wrap": True})
                wrk("warmup", gw.url, s, connections=C, duration=2)
                r = against_bare("a", gw.url, s)
                r.notes.append("POST /v1/credentials static wrapped, gateway JWT, SQLite store")
                results.append(r)
                log(f"a: {r.rps:.0f} rps")
            if "b" in wanted:
                s = lua_script(work, "b", path="/v1/secrets/local/vendor/key", headers={"Authorization": f"Bearer {gw.jwt}"})
                check_once(gw, "GET", "/v1/secrets/local/vendor/key")
                wrk("warmup", gw.url, s, connections=C, duration=2)
                r = against_bare("b", gw.url, s)
                r.notes.append("GET /v1/secrets/local/vendor/key (metadata), gateway JWT")
                results.append(r)
                log(f"b: {r.rps:.0f} rps")
            if "c" in wanted:
                P = args.pg_connections
                log(f"c: plain psycopg loop, {P} concurrent, {D}s")
                plain, roles = asyncio.run(plain_psycopg_loop(P, D))
                plain.notes.append("connect + CREATE ROLE + 3 GRANTs, no gateway")
                drop_roles(roles)
                results.append(plain)
                s = lua_script(work, "c", method="POST", path="/v1/credentials",
                               headers={"Authorization": f"Bearer {gw.jwt}", "Content-Type": "application/json"},
                               body=json.dumps({"connector": "pgbench", "resource": TARGET_DB, "ttl_seconds": 600}))
                check_once(gw, "POST", "/v1/credentials", json={"connector": "pgbench", "resource": TARGET_DB, "ttl_seconds": 600})
                r = wrk("c", gw.url, s, connections=P, duration=D)
                r.notes.append(f"POST /v1/credentials postgres, {P} connections")
                results.append(r)
                log(f"c: gateway {r.rps:.0f} rps vs plain {plain.rps:.0f}; revoking the gateway's roles")
                t0 = time.monotonic()
                out = gw.call("POST", "/v1/leases/revoke", json={"connector": "pgbench"}).json()
                facts.append(f"(c) cleanup: bulk revoke of {out['matched']} postgres leases took "
                             f"{time.monotonic() - t0:.1f}s ({len(out['still_revoking'])} still revoking)")
            if "c" in wanted:
                gw.stop()
                left = drop_leftover_gateway_roles()
                if left:
                    facts.append(f"(c) cleanup: dropped {left} role(s) the gateway had not revoked yet")
            gw.stop()

        if wanted & {"d", "e"}:
            store_url = f"{PG_BASE}/{STORE_DB}"
            recreate_db(STORE_DB)
            if "e" in wanted:
                prepare_target()
            gw = Gateway(work, "postgres", database_url=store_url, CREDGATE_REAPER_INTERVAL_SECONDS="1")
            procs.append(gw)
            first = gw.start()
            gw.setup(postgres_target="e" in wanted)
            gw.stop()
            t0 = gw.start()
            rss0 = gw.rss_mb
            gw.stop()
            log(f"PostgreSQL store: first start (migrations) {first:.2f}s, restart at 0 leases {t0:.2f}s; inserting {args.leases:,} leases")
            ins = insert_leases(store_url, args.leases)
            t1 = gw.start()
            rss1 = gw.rss_mb
            gw.refresh_jwt()
            facts.append(f"start-up (process start to /readyz 200), PostgreSQL store: {t0:.2f}s at 0 leases, "
                         f"{t1:.2f}s at {args.leases:,} leases (first start with migrations: {first:.2f}s; "
                         f"inserting the leases took {ins:.1f}s)")
            facts.append(f"RSS after start: {rss0:.0f} MB at 0 leases, {rss1:.0f} MB at {args.leases:,} leases")
            log(facts[-2])
            if "d" in wanted:
                auth = {"Authorization": f"Bearer {gw.jwt}"}
                n = args.leases
                page_fn = ("math.randomseed(os.time())\nrequest = function()\n"
                           f"  local n = math.random(1, {n})\n"
                           "  return wrk.format(nil, string.format('/v1/leases?limit=100&page_token=lease_bench%012d', n))\nend")
                get_fn = ("math.randomseed(os.time() + 1)\nrequest = function()\n"
                          f"  local n = math.random(1, {n})\n"
                          "  return wrk.format(nil, string.format('/v1/leases/lease_bench%012d', n))\nend")
                check_once(gw, "GET", "/v1/leases?limit=100&page_token=lease_bench000000000001")
                check_once(gw, "GET", "/v1/leases/lease_bench000000000007")
                for name, fn, what in (("d-list", page_fn, "GET /v1/leases?limit=100 at a random page_token"),
                                       ("d-get", get_fn, "GET /v1/leases/{random id}")):
                    s = lua_script(work, name, headers=auth, request_fn=fn)
                    wrk("warmup", gw.url, s, connections=C, duration=2)
                    r = against_bare(name, gw.url, s)
                    r.notes.append(what + f", {n:,} leases in the PostgreSQL store")
                    results.append(r)
                    log(f"{name}: {r.rps:.0f} rps p99 {r.p99_ms:.1f} ms")
                facts.append(f"RSS after the (d) load: {gw.rss_mb:.0f} MB")
            if "e" in wanted:
                s = issue_script(work, gw, "e")
                wrk("warmup", gw.url, s, connections=C, duration=2)
                idle = against_bare("e-idle", gw.url, s)
                idle.notes.append(f"scenario (a) on the PostgreSQL store ({args.leases:,} leases), reaper idle")
                results.append(idle)
                insert_expired_revocable(store_url, N_EXPIRED)
                time.sleep(1.5)  # let the reaper's next tick pick them up
                before = count_reap_pending(store_url)
                busy = wrk("e-reaping", gw.url, s, connections=C, duration=D)
                after = count_reap_pending(store_url)
                busy.notes.append(f"same, while the reaper revokes {N_EXPIRED:,} expired postgres leases "
                                  f"({before - after:,} revoked during the window)")
                results.append(busy)
                rss_e = gw.rss_mb
                t0 = time.monotonic()
                while count_reap_pending(store_url) and time.monotonic() - t0 < 200:
                    time.sleep(1)
                left = count_reap_pending(store_url)
                facts.append(f"(e) reaper: {before:,} pending when the load started, {after:,} after {D}s of load; "
                             f"all done {time.monotonic() - t0:.0f}s later" + (f" ({left} left at the 200s bound)" if left else ""))
                facts.append(f"RSS during/after (e): {rss_e:.0f} MB at {args.leases:,}+{N_EXPIRED:,} leases")
            gw.stop()
    finally:
        for p in procs:
            p.stop()

    table = evaluate(results)
    print()
    print(table)
    print()
    for f in facts:
        print("- " + f)
    if args.write_results:
        write_results(table, facts, args)
    return 0


def evaluate(results: list[Result]) -> str:
    by = {r.name: r for r in results}
    base = by["bare"]
    for r in results:
        if r.name.startswith("bare"):
            r.target = "baseline" if r.name == "bare" else "baseline of the next row"
            continue
        ref = by["c-psycopg"] if r.name == "c" and "c-psycopg" in by else (r.base or base)
        if r.name == "c-psycopg":
            r.target = "reference for (c)"
            continue
        r.ratio = r.rps / ref.rps
        r.baseline = ref.name
        ok: list[bool] = []
        if r.name == "a":
            r.target = ">= 0.5x bare, p99 < 15 ms"
            ok = [r.ratio >= 0.5, r.p99_ms < 15]
        elif r.name == "b":
            r.target = ">= 0.5x bare"
            ok = [r.ratio >= 0.5]
        elif r.name == "c":
            r.target = ">= 0.7x plain psycopg"
            ok = [r.ratio >= 0.7]
        elif r.name.startswith("d-"):
            r.target = "p99 < 20 ms"
            ok = [r.p99_ms < 20]
        elif r.name == "e-reaping" and "e-idle" in by:
            r.target = f"p99 <= 2x idle ({2 * by['e-idle'].p99_ms:.1f} ms)"
            ok = [r.p99_ms <= 2 * by["e-idle"].p99_ms]
        if ok:
            r.verdict = "met" if all(ok) else "MISSED"
    head = "| scenario | req/s | p50 ms | p99 ms | ratio | target | verdict | errors |"
    rows = [head, "|---|---:|---:|---:|---:|---|---|---|"]
    for r in results:
        ratio = f"{r.ratio:.2f}x {r.baseline.partition('@')[0]}" if r.ratio is not None else ""
        rows.append(f"| {r.name} | {r.rps:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {ratio} | {r.target} | {r.verdict} | {r.errors} |")
    rows.append("")
    for r in results:
        if r.notes:
            rows.append(f"- {r.name}: {'; '.join(r.notes)}")
    return "\n".join(rows)


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = subprocess.run(["free", "-h"], capture_output=True, text=True).stdout.rstrip()
    wrkv = subprocess.run(["wrk", "-v"], capture_output=True, text=True)
    return (f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}\n- CPU: {cpu}, nproc {os.cpu_count()}\n"
            f"- Python {platform.python_version()}, {(wrkv.stdout + wrkv.stderr).splitlines()[0]}\n"
            f"- memory (free -h):\n\n```\n{mem}\n```")


def write_results(table: str, facts: list[str], args) -> None:
    p = ROOT / "bench" / "RESULTS.md"
    head = "# Benchmark results\n\n(Generated by bench/run.py --write-results; analysis below the table is written by hand.)\n\n"
    p.write_text(head + machine() + f"\n\nCommand: `.venv/bin/python bench/run.py --duration {args.duration} "
                 f"--connections {args.connections} --pg-connections {args.pg_connections} --scenarios {args.scenarios}`\n\n"
                 + table + "\n\n" + "\n".join("- " + f for f in facts) + "\n")


if __name__ == "__main__":
    sys.exit(main())
