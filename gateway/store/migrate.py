"""Run Alembic programmatically: ``credgate db upgrade`` and start-up both call :func:`upgrade`.

Rollbacks (an older release started on a store a newer one migrated). Migrations follow
expand/contract: a migration that only adds (a nullable column, a table, an index) and
leaves what the previous release reads and writes intact says so with
``runs_on_previous = True`` in its module. After every upgrade or downgrade the store
records, in the one-row table ``credgate_schema``, its revision and the oldest release
revision that may run on it (the revision before the newest unbroken run of expand-only
migrations). An older gateway that finds a revision it does not know reads that row: if
it knows the oldest compatible revision, it starts without migrating (a warning names
both revisions); otherwise it refuses in one line naming both, and the newer release's
``credgate db downgrade REVISION`` takes the schema back first.
"""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, create_engine, make_url, text
from sqlalchemy.pool import NullPool

from gateway.errors import ConfigurationError

log = logging.getLogger("credgate.store")

MIGRATIONS = Path(__file__).parent / "migrations"
COMPAT_TABLE = "credgate_schema"
# Replicas starting together take turns: one migrates, the others find it done.
_PG_LOCK_KEY = 0x6372656467617465  # "credgate"


def include_name(name: str | None, type_: str, parent_names: object) -> bool:
    """Autogenerate's filter: ``credgate_schema`` belongs to the migration machinery (as
    ``alembic_version`` does), not to the models."""
    return not (type_ == "table" and name == COMPAT_TABLE)


def alembic_config(migrations: Path = MIGRATIONS) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations))
    return cfg


def oldest_compatible(scripts: ScriptDirectory, revision: str) -> str:
    """The oldest release revision that may run on a store at ``revision``: walk down while
    each migration is expand-only (``runs_on_previous = True``)."""
    oldest = revision
    script = scripts.get_revision(revision)
    while script is not None and getattr(script.module, "runs_on_previous", False) and script.down_revision:
        oldest = str(script.down_revision)
        script = scripts.get_revision(oldest)
    return oldest


def _record(conn: Connection, scripts: ScriptDirectory) -> None:
    revision = MigrationContext.configure(conn).get_current_revision()
    conn.execute(text(f"CREATE TABLE IF NOT EXISTS {COMPAT_TABLE} "
                      "(id INTEGER PRIMARY KEY, revision VARCHAR(64) NOT NULL, oldest_compatible VARCHAR(64) NOT NULL)"))
    conn.execute(text(f"DELETE FROM {COMPAT_TABLE}"))
    if revision is not None:
        conn.execute(text(f"INSERT INTO {COMPAT_TABLE} (id, revision, oldest_compatible) VALUES (1, :r, :o)"),
                     {"r": revision, "o": oldest_compatible(scripts, revision)})


def _newer_store(conn: Connection, scripts: ScriptDirectory, revision: str) -> None:
    """The store is at a revision this release does not know: start on it if the store says
    this release may, else refuse in one line."""
    head = scripts.get_current_head()
    try:
        row = conn.execute(text(f"SELECT oldest_compatible FROM {COMPAT_TABLE} WHERE id = 1")).first()
    except Exception:  # noqa: BLE001 - no such table: a store written before the table existed
        conn.rollback()
        row = None
    oldest = row[0] if row is not None else None
    known = {s.revision for s in scripts.walk_revisions()}
    if oldest is not None and oldest in known:
        log.warning("the store's schema is at revision %s, newer than this release's %s, and compatible with it "
                    "(its oldest compatible release revision is %s): starting without migrating", revision, head, oldest)
        return
    needs = f"which needs a release at revision {oldest} or newer" if oldest else "which this release can't read"
    raise ConfigurationError(
        f"the store's schema is at revision {revision}, {needs}; this release knows revisions up to {head}: "
        f"run the newer release, or take the schema back with its `credgate db downgrade {head}` first"
    )


def upgrade(url: str, revision: str = "head", *, migrations: Path = MIGRATIONS) -> None:
    """Migrate to ``revision`` (or start on a newer, compatible schema: see the module's
    docstring). Raises ConfigurationError, in one line, for a newer incompatible one."""
    _migrate(url, migrations, lambda cfg: command.upgrade(cfg, revision))


def downgrade(url: str, revision: str, *, migrations: Path = MIGRATIONS) -> None:
    """Take the schema back to ``revision`` (before rolling back to an older release)."""
    _migrate(url, migrations, lambda cfg: command.downgrade(cfg, revision))


def _migrate(url: str, migrations: Path, run) -> None:
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _PG_LOCK_KEY})
                conn.commit()
            try:
                cfg = alembic_config(migrations)
                scripts = ScriptDirectory.from_config(cfg)
                at = MigrationContext.configure(conn).get_current_revision()
                if at is not None and at not in {s.revision for s in scripts.walk_revisions()}:
                    _newer_store(conn, scripts, at)
                    return
                cfg.attributes["connection"] = conn
                run(cfg)
                _record(conn, scripts)
                conn.commit()
            finally:
                if conn.dialect.name == "postgresql":
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_LOCK_KEY})
                    conn.commit()
    finally:
        engine.dispose()


def check_schema(url: str) -> None:
    """Before serving (``credgate serve``): refuse, in one line, a store whose schema a newer,
    incompatible release wrote (what start-up's :func:`upgrade` would refuse, said before the
    server starts). An empty, older or known store passes: start-up migrates it."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and (not parsed.database or not Path(parsed.database).exists()):
        return  # no store yet (start-up creates it, and its directory)
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            at = MigrationContext.configure(conn).get_current_revision()
            scripts = ScriptDirectory.from_config(alembic_config())
            if at is not None and at not in {s.revision for s in scripts.walk_revisions()}:
                _newer_store(conn, scripts, at)
    finally:
        engine.dispose()


def current(url: str) -> str | None:
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()
