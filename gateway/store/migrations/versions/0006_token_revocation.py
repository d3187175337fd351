"""token revocation: revoked tokens and token sources

(Placeholder reserved for issue 10's work; filled in by the change that needs it.)

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27 16:30:00.000000
"""

from alembic import op  # noqa: F401


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
