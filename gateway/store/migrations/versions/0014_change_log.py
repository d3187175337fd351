"""change log between the worker processes of one serve on SQLite

``credgate serve --workers N`` on SQLite: a change noted in one worker's transaction is
written as a row of ``change_log`` in the same transaction; the other workers poll the
table for rows past the last they saw and drop what their caches hold (PostgreSQL uses
NOTIFY instead and leaves the table empty). Rows are pruned after a minute.

Revision ID: 0014
Revises: 0013
Create Date: 2026-11-28 05:00:00.000000
"""

import sqlalchemy as sa
from alembic import op


revision = '0014'
down_revision = '0013'
branch_labels = None
depends_on = None
# Expand only: the previous release never reads or writes the table.
runs_on_previous = True


def upgrade() -> None:
    op.create_table(
        'change_log',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('topic', sa.String(length=32), nullable=False),
        sa.Column('key', sa.String(length=512), nullable=True),
        sa.Column('writer', sa.String(length=40), nullable=False),
        sa.Column('at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('id'),
        sqlite_autoincrement=True,
    )
    op.create_index('ix_change_log_at', 'change_log', ['at'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_change_log_at', table_name='change_log')
    op.drop_table('change_log')
