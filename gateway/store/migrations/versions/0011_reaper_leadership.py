"""reaper leadership lease

The reaper's leader holds a lease row (holder, fencing epoch, renewed_until on the
database's clock) as well as the advisory lock, so a leader that stops without dying
(SIGSTOP, a stall, a partition) loses leadership when it stops renewing. A new table:
the previous release ignores it (expand only).

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-27 23:20:00.000000
"""

import sqlalchemy as sa
from alembic import op


revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None
# Expand only: the previous release runs on this schema (it never reads the new table).
runs_on_previous = True


def upgrade() -> None:
    op.create_table(
        'reaper_leadership',
        sa.Column('id', sa.Integer(), autoincrement=False, nullable=False),
        sa.Column('holder', sa.String(length=120), nullable=True),
        sa.Column('epoch', sa.Integer(), nullable=False),
        sa.Column('renewed_until', sa.DateTime(timezone=True), nullable=True),
        sa.Column('locked', sa.Boolean(), nullable=False),
        sa.Column('taken_at', sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint('id'),
    )


def downgrade() -> None:
    op.drop_table('reaper_leadership')
