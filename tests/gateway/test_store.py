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
