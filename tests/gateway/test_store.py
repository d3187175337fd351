"""The store: migrations match the models on both databases; every sealed table is rotated."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

from gateway.crypto.rotation import SEALED
from gateway.store.database import sync_url
from gateway.store.migrate import current, include_name, upgrade
from gateway.store.models import Base, SealedMixin


def test_migrations_reach_head_and_match_the_models(store_url: str) -> None:
    url = sync_url(store_url)
    upgrade(url)
    upgrade(url)  # idempotent
    assert current(url) is not None
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"include_name": include_name}), Base.metadata)
    finally:
        engine.dispose()
    assert diff == []


def test_every_sealed_table_is_covered_by_rotation() -> None:
    sealed_models = {m.class_ for m in Base.registry.mappers if issubclass(m.class_, SealedMixin)}
    assert sealed_models == {t.model for t in SEALED}


def test_migrated_indexes_are_the_models_expression_and_partial_ones_too(store_url: str, tmp_path) -> None:
    """Autogenerate can't compare expression indexes (the audit details ones): the migrated
    store's index definitions must equal those the models create, as the database states them."""
    import re

    from sqlalchemy import text

    url = sync_url(store_url)
    upgrade(url)
    tables = ("audit_events", "leases", "runs")

    def definitions(conn, schema: str | None) -> dict[str, str]:
        if conn.dialect.name == "postgresql":
            rows = conn.execute(text("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = :s AND tablename = ANY(:t)"),
                                {"s": schema or "public", "t": list(tables)}).all()
            return {n: d.replace(f"{schema}.", "public.") if schema else d for n, d in rows}
        rows = conn.execute(text("SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL "
                                 f"AND tbl_name IN {tables}")).all()
        return {n: re.sub(r"\s+", " ", d.replace('"', "")).strip() for n, d in rows}

    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.begin() as conn:
            migrated = definitions(conn, None)
            if conn.dialect.name == "postgresql":
                conn.execute(text("CREATE SCHEMA fresh"))
                fresh_conn = conn.execution_options(schema_translate_map={None: "fresh"})
                Base.metadata.create_all(fresh_conn)
                fresh = definitions(conn, "fresh")
            else:
                fresh_engine = create_engine(f"sqlite:///{tmp_path / 'fresh.db'}", poolclass=NullPool)
                Base.metadata.create_all(fresh_engine)
                with fresh_engine.connect() as other:
                    fresh = definitions(other, None)
                fresh_engine.dispose()
    finally:
        engine.dispose()
    for name in ("ix_audit_events_run_id_seq", "ix_audit_events_wrap_token_seq", "ix_audit_events_client_secret_seq",
                 "ix_audit_events_connector_seq", "ix_leases_run_id_id", "ix_leases_issued_at", "ix_runs_created_at_run_id"):
        assert name in migrated, name
    assert "ix_leases_run_id" not in migrated
    assert migrated == fresh
