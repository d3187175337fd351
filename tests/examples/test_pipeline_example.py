"""examples/pipeline.py, run as the README tells a newcomer to: against a real `credgate
serve --dev` and a PostgreSQL server (the scram cluster, so a dropped or expired role is
refused), for more than three credential lifetimes, with the gateway restarted in the middle.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.client.common import start_server
from tests.gateway.test_cli import Server
from tests.services.waiting import clean_env

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "pipeline.py"
TTL = 8  # seconds: the credential lifetime the pipeline asks for
DURATION = 28  # > 3 lifetimes


@pytest.fixture
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from start_server(tmp_path_factory, "example")


def example(server: Server, *args: str, **popen) -> subprocess.Popen[str]:
    env = clean_env(CREDGATE_ADDR=server.addr, CREDGATE_TOKEN=server.token)
    return subprocess.Popen([sys.executable, str(EXAMPLE), *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def test_the_pipeline_example_outlives_three_lifetimes_and_a_gateway_restart(served: Server, pg_cluster) -> None:
    import psycopg

    db = "example_" + secrets.token_hex(3)
    with psycopg.connect(pg_cluster.dsn(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    setup = example(served, "setup", "--postgres-dsn", pg_cluster.dsn(), "--database", db, "--max-ttl", "20")
    out, err = setup.communicate(timeout=60)
    assert setup.returncode == 0, (out, err)

    started = time.monotonic()
    run = example(served, "run", "--resource", db, "--ttl", str(TTL), "--duration", str(DURATION),
                  "--every", "0.5", "--json")
    time.sleep(TTL * 1.2)  # the first lease renewed once; the restart lands in its second lifetime
    assert run.poll() is None
    served.restart()
    out, err = run.communicate(timeout=DURATION + 60)
    assert time.monotonic() - started >= 3 * TTL
    assert run.returncode == 0, (out, err)
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["errors"] == [] and summary["expired_when_handed_out"] == 0, summary
    assert summary["uses"] >= DURATION  # every half second, each a real login as the issued role
    # Leases are renewed up to their 20 s cap, then new ones issued: more than one lease seen.
    assert len(summary["leases"]) >= 2 and summary["renewals"] >= 1 and summary["reissues"] >= 1, summary
    assert summary["after_end"] == "run_revoked"  # the ended run's token is refused
    # Nothing the pipeline held is still live, and no issued role is left on the server.
    active = json.loads(served.cli("lease", "list", "--connector", "warehouse", "--state", "active", "--json").stdout)
    assert active["items"] == []
    with psycopg.connect(pg_cluster.dsn(), autocommit=True) as conn:
        left = conn.execute("SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)", (summary["acted_as"],)).fetchall()
    assert summary["acted_as"] and all(u.startswith("cg_") for u in summary["acted_as"]) and left == []
    assert "Application shutdown complete" in served.out.read_text()  # the restart happened, drained
