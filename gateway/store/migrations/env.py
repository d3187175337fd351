"""Alembic environment: always driven by gateway.store.migrate with a live connection."""

from alembic import context

from gateway.store.migrate import include_name
from gateway.store.models import Base

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    include_name=include_name,
)
with context.begin_transaction():
    context.run_migrations()
