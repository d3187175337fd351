"""The store: SQLAlchemy 2 models, the async engine, and Alembic migrations; the change
feed and caches; and the row operations every service shares (:mod:`.rows`: get-or-404,
revoke and delete under a lock with their change-feed note).

Services own their queries; routes never import the models or SQLAlchemy (the
``routes-call-services`` import contract)."""

from gateway.store.database import Store, as_store_unavailable

__all__ = ["Store", "as_store_unavailable"]
