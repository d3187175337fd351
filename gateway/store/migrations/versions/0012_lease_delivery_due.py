"""lease delivery deadline

A lease this release activates carries ``delivery_due_at`` (activation time + the
delivery deadline) until the response holding its credential or wrap token has been
handed to the server whole; then it is cleared. The reaper revokes active leases whose
deadline passed: credentials whose response never left the gateway (a crash between
activation and the response, a client gone before it). The partial index keeps the
reaper's search to the few rows that carry the marker.

Leases the previous release activates leave the column NULL and are never treated as
undelivered; it never reads the column (expand only).

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-28 01:30:00.000000
"""

import sqlalchemy as sa
from alembic import op


revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None
# Expand only: the previous release runs on this schema (it never reads the new column).
runs_on_previous = True

_MARKED = sa.text('delivery_due_at IS NOT NULL')


def upgrade() -> None:
    with op.batch_alter_table('leases', schema=None) as batch_op:
        batch_op.add_column(sa.Column('delivery_due_at', sa.DateTime(timezone=True), nullable=True))
    op.create_index('ix_leases_delivery_due', 'leases', ['delivery_due_at'], unique=False,
                    postgresql_where=_MARKED, sqlite_where=_MARKED)


def downgrade() -> None:
    op.drop_index('ix_leases_delivery_due', table_name='leases', postgresql_where=_MARKED, sqlite_where=_MARKED)
    with op.batch_alter_table('leases', schema=None) as batch_op:
        batch_op.drop_column('delivery_due_at')
