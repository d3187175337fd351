"""Rollbacks: this release started on a store a newer release migrated (issue 14, item 7).

The "newer release" is this tree's migrations plus revisions written here into a copy of
the migrations directory: an expand-only one (``runs_on_previous = True``: a nullable
column) that this release runs on, and a contracting one that it refuses in one line
naming both revisions, until the newer release's downgrade takes the schema back.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from gateway.errors import ConfigurationError
from gateway.store.database import sync_url
from gateway.store.migrate import MIGRATIONS, alembic_config, current, downgrade, oldest_compatible, upgrade
from gateway.web.app import create_app
from tests.conftest import ADMIN_TOKEN
from tests.gateway.test_cli import CREDGATE
from tests.services.waiting import clean_env

_SCRIPTS = ScriptDirectory.from_config(alembic_config())
# This release's head and the oldest release that may run on it (its expand-only tail).
OLDEST = oldest_compatible(_SCRIPTS, _SCRIPTS.get_current_head())
both_stores = pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)

EXPAND = '''"""next release: a nullable column (expand only)"""
import sqlalchemy as sa
from alembic import op

revision = "0100"
down_revision = "{down}"
branch_labels = None
depends_on = None
runs_on_previous = True  # the previous release reads and writes secrets as before


def upgrade() -> None:
    with op.batch_alter_table("secrets") as batch_op:
        batch_op.add_column(sa.Column("next_release_note", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("secrets") as batch_op:
        batch_op.drop_column("next_release_note")
'''

CONTRACT = '''"""next release: a table renamed (contract: the previous release can't run on it)"""
from alembic import op

revision = "0101"
down_revision = "0100"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.rename_table("policies", "policy_documents")


def downgrade() -> None:
    op.rename_table("policy_documents", "policies")
'''


def newer_release(tmp_path: Path, *, contract: bool) -> Path:
    migrations = tmp_path / "next-migrations"
    shutil.copytree(MIGRATIONS, migrations, ignore=shutil.ignore_patterns("__pycache__"))
    head = sorted(p.name[:4] for p in (MIGRATIONS / "versions").glob("0*.py"))[-1]
    (migrations / "versions" / "0100_next_expand.py").write_text(EXPAND.format(down=head))
    if contract:
        (migrations / "versions" / "0101_next_contract.py").write_text(CONTRACT)
    return migrations


async def put_and_read(settings) -> None:
    import httpx

    app = create_app(settings)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw",
                                     headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as c:
            assert (await c.put("/v1/secrets/local/rb/s", json={"data": {"v": "after-rollback"}})).status_code == 200
            r = await c.get("/v1/secrets/local/rb/s", params={"reveal": "true"})
            assert r.json()["data"]["v"] == "after-rollback", r.text


def store_row(url: str) -> tuple[str, str]:
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return tuple(conn.execute(text("SELECT revision, oldest_compatible FROM credgate_schema")).one())
    finally:
        engine.dispose()


@both_stores
async def test_this_release_runs_on_a_newer_expand_only_schema(settings_factory, store_url: str, tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    settings = settings_factory()
    url = sync_url(settings.store_url)
    upgrade(url)  # this release
    ours = current(url)
    assert store_row(url) == (ours, OLDEST)
    upgrade(url, migrations=newer_release(tmp_path, contract=False))  # the newer release migrates...
    assert current(url) == "0100" and store_row(url) == ("0100", OLDEST)
    with caplog.at_level("WARNING", logger="credgate.store"):
        await put_and_read(settings)  # ...and this release, rolled back to, starts and works on it
    assert any("revision 0100, newer than this release's" in r.getMessage() for r in caplog.records)
    assert current(url) == "0100"  # it did not touch the schema


@both_stores
async def test_a_contracted_schema_is_refused_in_one_line_until_downgraded(settings_factory, store_url: str,
                                                                          tmp_path: Path) -> None:
    settings = settings_factory()
    url = sync_url(settings.store_url)
    upgrade(url)
    ours = current(url)
    newer = newer_release(tmp_path, contract=True)
    upgrade(url, migrations=newer)
    assert store_row(url) == ("0101", "0101")
    with pytest.raises(ConfigurationError) as refused:
        upgrade(url)
    message = refused.value.message
    assert "\n" not in message and "revision 0101" in message and f"up to {ours}" in message
    assert f"credgate db downgrade {ours}" in message
    # The newer release takes the schema back; this one starts again.
    downgrade(url, ours, migrations=newer)
    assert current(url) == ours and store_row(url) == (ours, OLDEST)
    await put_and_read(settings)


def test_serve_and_db_upgrade_refuse_a_newer_schema_with_exit_2(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = clean_env()
    res = subprocess.run([CREDGATE, "db", "upgrade", "--data-dir", str(data)], capture_output=True, text=True,
                         env=env, timeout=60)
    assert res.returncode == 0, res.stderr
    url = f"sqlite:///{data / 'credgate.db'}"
    upgrade(url, migrations=newer_release(tmp_path, contract=True))
    for args in (["db", "upgrade"], ["serve", "--dev", "--port", "1"]):
        res = subprocess.run([CREDGATE, *args, "--data-dir", str(data)], capture_output=True, text=True,
                             env=env, timeout=60)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1, (args, res.stdout, res.stderr)
        assert "revision 0101" in lines[0] and "Traceback" not in res.stderr, lines


def test_db_downgrade_takes_the_schema_back_and_upgrade_returns(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = clean_env()

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([CREDGATE, "db", *args, "--data-dir", str(data)], capture_output=True, text=True,
                              env=env, timeout=60)

    head = _SCRIPTS.get_current_head()
    previous = str(_SCRIPTS.get_revision(head).down_revision)
    assert cli("upgrade").stdout.strip() == f"store at revision {head}"
    res = cli("downgrade", previous)
    assert res.returncode == 0 and res.stdout.strip() == f"store at revision {previous}", res.stderr
    assert store_row(f"sqlite:///{data / 'credgate.db'}")[0] == previous
    bad = cli("downgrade", "9999")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "9999" in bad.stderr, bad.stderr
    assert cli("upgrade").stdout.strip() == f"store at revision {head}"
