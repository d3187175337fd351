"""audit query indexes and verification marks

Pages of ``GET /v1/audit`` are ``WHERE <filters> AND seq > :after ORDER BY seq LIMIT
n+1``: an index on (filter column, seq) serves each page from one index range. The
connector is ``details.connector`` (the chained JSON): its index is on that expression,
so no column outside the chain can be altered to hide an event from the query, events
the previous release appends are found too, and nothing needs backfilling. The
composite indexes replace the single-column subject, action and lease_id indexes.

``audit_checkpoints.verified``: the mark a verification leaves on the checkpoint it
walked up to (MAC'd under the chain key); the next verification starts there.

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-28 04:30:00.000000
"""

import sqlalchemy as sa
from alembic import op


revision = '0013'
down_revision = '0012'
branch_labels = None
depends_on = None
# Expand only: the previous release runs on this schema (it never reads the new column; its
# single-column indexes are covered by the composite ones).
runs_on_previous = True

_CONNECTOR = {
    "postgresql": "(details ->> 'connector')",
    "sqlite": "json_extract(details, '$.connector')",
}


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    with op.batch_alter_table('audit_checkpoints', schema=None) as batch_op:
        batch_op.add_column(sa.Column('verified', sa.String(length=200), nullable=True))
    for column in ('subject', 'action', 'lease_id', 'decision'):
        op.create_index(f'ix_audit_events_{column}_seq', 'audit_events', [column, 'seq'], unique=False)
    op.create_index('ix_audit_events_connector_seq', 'audit_events', [sa.text(_CONNECTOR[dialect]), 'seq'],
                    unique=False)
    for column in ('subject', 'action', 'lease_id'):
        op.drop_index(f'ix_audit_events_{column}', table_name='audit_events')


def downgrade() -> None:
    for column in ('subject', 'action', 'lease_id'):
        op.create_index(f'ix_audit_events_{column}', 'audit_events', [column], unique=False)
    op.drop_index('ix_audit_events_connector_seq', table_name='audit_events')
    for column in ('subject', 'action', 'lease_id', 'decision'):
        op.drop_index(f'ix_audit_events_{column}_seq', table_name='audit_events')
    with op.batch_alter_table('audit_checkpoints', schema=None) as batch_op:
        batch_op.drop_column('verified')
