"""keyed audit chain

(Placeholder reserved for issue 10's work; filled in by the change that needs it.)

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-27 16:30:00.000000
"""

from alembic import op  # noqa: F401


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
