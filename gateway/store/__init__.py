"""The store: SQLAlchemy 2 models, the async engine, and Alembic migrations."""

from gateway.store.database import Store

__all__ = ["Store"]
