"""`credgate exec`: real consumers (psql on a scram cluster, redis-cli) run with credentials
in their environment, and no lease stays active after the command ends, fails, or is
interrupted (SIGINT/SIGTERM to the credgate exec process)."""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import time

import pytest

from tests.gateway.test_cli import CREDGATE, Server, server  # noqa: F401 - the served gateway fixture
from tests.services.waiting import clean_env

PG_CANARY = "CANARY-exec-static-" + secrets.token_hex(4)


@pytest.fixture(scope="module")
def pg(server: Server, pg_cluster) -> str:  # noqa: F811
    """A postgres connector ``pg`` on the scram cluster, serving database ``exec_<hex>``."""
    import psycopg

    db = "exec_" + secrets.token_hex(3)
    with psycopg.connect(pg_cluster.dsn(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    server.cli("secret", "put", "local/exec/pg", f"dsn={pg_cluster.dsn()}")
    server.cli("connector", "add", "pg", "--type", "postgres", "--auth-method", "password",
               "--secret", "local/exec/pg", "--resource", db)
    return db


def active(server: Server, connector: str) -> list[dict]:  # noqa: F811
    out = json.loads(server.cli("lease", "list", "--connector", connector, "--state", "active", "--json").stdout)
    return out["items"]


def all_leases(server: Server, connector: str) -> list[dict]:  # noqa: F811
    return json.loads(server.cli("lease", "list", "--connector", connector, "--json").stdout)["items"]


def test_psql_connects_with_the_issued_role_and_the_lease_is_revoked(server: Server, pg: str, pg_cluster) -> None:  # noqa: F811
    import psycopg

    before = len(all_leases(server, "pg"))
    res = server.cli("exec", f"pg:{pg}", "--", "psql", "-XtAc", "select current_user, current_database()")
    user, database = res.stdout.strip().split("|")
    assert user.startswith("cg_") and database == pg
    leases = all_leases(server, "pg")
    assert len(leases) == before + 1 and active(server, "pg") == []
    assert leases[-1]["state"] == "revoked"
    with psycopg.connect(pg_cluster.dsn(), autocommit=True) as conn:  # the role is gone from the server
        assert conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (user,)).fetchone() is None


def test_a_failing_command_gives_its_exit_code_and_leaves_no_lease(server: Server, pg: str) -> None:  # noqa: F811
    res = server.cli("exec", f"pg:{pg}", "--", "sh", "-c", 'test -n "$PGPASSWORD" && exit 3', check=False)
    assert res.returncode == 3, res.stderr
    assert active(server, "pg") == []
    assert server.cli("exec", f"pg:{pg}", "--", "no-such-program-xyz", check=False).returncode == 127
    assert active(server, "pg") == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_interrupted_exec_forwards_the_signal_and_revokes(server: Server, pg: str, sig: int) -> None:  # noqa: F811
    env = clean_env(CREDGATE_ADDR=server.addr, CREDGATE_TOKEN=server.token)
    proc = subprocess.Popen(
        [CREDGATE, "exec", f"pg:{pg}", "--", "sh", "-c", "echo ready; exec sleep 30"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        assert len(active(server, "pg")) == 1
        started = time.monotonic()
        proc.send_signal(sig)
        assert proc.wait(timeout=20) == 128 + sig, proc.stderr.read()
        assert time.monotonic() - started < 15  # the child was stopped, not waited out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert active(server, "pg") == []


def test_renewable_lease_is_renewed_while_the_command_runs(server: Server, pg: str) -> None:  # noqa: F811
    # issued for 3 s; psql connects at 5 s with the same password: only a renewal makes that work
    res = server.cli("exec", "--ttl", "3s", f"pg:{pg}", "--", "sh", "-c", "sleep 5; psql -XtAc 'select 1'", check=False)
    assert res.returncode == 0 and res.stdout.strip() == "1", res.stderr
    lease = all_leases(server, "pg")[-1]
    assert lease["state"] == "revoked"


def test_redis_cli_reads_with_the_issued_user(server: Server, redis_server: str) -> None:  # noqa: F811
    import redis

    server.cli("secret", "put", "local/exec/redis", f"url={redis_server}")
    server.cli("connector", "add", "xcache", "--type", "redis", "--auth-method", "password",
               "--secret", "local/exec/redis", "--resource", "feat", 'categories=["+@read","+@connection"]')
    key = "feat:exec-" + secrets.token_hex(4)  # the Redis server is shared: a key no other test writes
    script = ('u=${REDIS_URL#*://}; echo "user=${u%%:*}"; '
              f'redis-cli --no-auth-warning -u "$REDIS_URL" get {key}; '
              f'redis-cli --no-auth-warning -u "$REDIS_URL" set {key} v')
    res = server.cli("exec", "xcache:feat", "--", "sh", "-c", script)
    lines = res.stdout.splitlines()
    user = lines[0].removeprefix("user=")
    assert user.startswith("cg_"), (res.stdout, res.stderr)
    assert lines[1] == ""  # GET of a missing key: authenticated and allowed to read
    assert lines[2].startswith("NOPERM")  # the issued read-only user, not the default one
    assert user not in redis.Redis.from_url(redis_server, decode_responses=True).acl_users()
    assert active(server, "xcache") == []


def test_static_credential_goes_in_prefixed_variables_and_never_in_output(server: Server) -> None:  # noqa: F811
    server.cli("secret", "put", "local/exec/vendor", f"api_key={PG_CANARY}")
    server.cli("connector", "add", "xvendor", "--type", "static", "--auth-method", "static",
               "--secret", "local/exec/vendor", "--resource", "default")
    script = f'test "$CREDGATE_API_KEY" = "{PG_CANARY}" && test -z "$CREDGATE_TOKEN" && echo ok'
    res = server.cli("exec", "xvendor", "--", "sh", "-c", script)  # the one resource, wrap-only: unwrapped here
    assert res.stdout == "ok\n" and PG_CANARY not in res.stderr
    mine = server.cli("exec", "--prefix", "VENDOR_", "xvendor:default", "--", "sh", "-c",
                      f'test "$VENDOR_API_KEY" = "{PG_CANARY}" && echo ok')
    assert mine.stdout == "ok\n"
    assert active(server, "xvendor") == []


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["exec", "pg:x"], "give the command after --"),
        (["exec", "pg:", "--", "true"], "expected CONNECTOR or CONNECTOR:RESOURCE"),
        (["exec", "--ttl", "soon", "pg:x", "--", "true"], "is not a duration"),
    ],
)
def test_usage_errors_are_one_line_exit_2(server: Server, args: list[str], words: str) -> None:  # noqa: F811
    res = server.cli(*args, check=False)
    assert res.returncode == 2 and words in res.stderr and res.stderr.count("\n") == 1, res.stderr


def test_two_credentials_setting_one_variable_are_refused_and_revoked(server: Server, pg: str) -> None:  # noqa: F811
    res = server.cli("exec", f"pg:{pg}", f"pg:{pg}", "--", "sh", "-c", "echo ran", check=False)
    assert res.returncode == 2 and "two credentials set PGHOST" in res.stderr and res.stdout == ""
    assert active(server, "pg") == []


def test_mysql_client_reads_its_variables(server: Server, mariadb_server: dict) -> None:  # noqa: F811
    import pymysql

    db = "exec_" + secrets.token_hex(3)
    conn = pymysql.connect(**mariadb_server)
    try:
        conn.cursor().execute(f"CREATE DATABASE `{db}`")
        server.cli("secret", "put", "local/exec/maria", "host=127.0.0.1", f"port={mariadb_server['port']}",
                   f"username={mariadb_server['user']}", f"password={mariadb_server['password']}")
        server.cli("connector", "add", "xmaria", "--type", "mysql", "--auth-method", "password",
                   "--secret", "local/exec/maria", "--resource", db, "user_host=127.0.0.1")
        # the client reads MYSQL_HOST, MYSQL_TCP_PORT and MYSQL_PWD itself; the user is given on the line
        res = server.cli("exec", f"xmaria:{db}", "--", "sh", "-c",
                         'mysql --protocol=TCP -u "$MYSQL_USER" -N -B -e "select current_user(), database()" "$MYSQL_DATABASE"')
        user, database = res.stdout.strip().split("\t")
        assert user.startswith("cg_") and user.endswith("@127.0.0.1") and database == db
        assert active(server, "xmaria") == []
        cur = conn.cursor()
        cur.execute("SELECT COUNT(*) FROM mysql.user WHERE user = %s", (user.split("@")[0],))
        assert cur.fetchone()[0] == 0
    finally:
        conn.cursor().execute(f"DROP DATABASE IF EXISTS `{db}`")
        conn.close()
