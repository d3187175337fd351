"""lease revoke claim

One revocation of a lease at a time: the actor about to call the target (an API
request, the reaper, another replica) first claims the ``revoking`` lease with a
conditional UPDATE that sets ``revoke_owner`` and ``revoke_claim_until``; the
others wait for, or report, its outcome. A claim whose holder died lapses at
``revoke_claim_until``. Both columns are NULL while nobody is revoking the lease
(an older release ignores them: expand only).

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-27 23:00:00.000000
"""

import sqlalchemy as sa
from alembic import op


revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None
# Expand only: the previous release runs on this schema (it never reads the new columns).
runs_on_previous = True


def upgrade() -> None:
    with op.batch_alter_table('leases', schema=None) as batch_op:
        batch_op.add_column(sa.Column('revoke_owner', sa.String(length=80), nullable=True))
        batch_op.add_column(sa.Column('revoke_claim_until', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('leases', schema=None) as batch_op:
        batch_op.drop_column('revoke_claim_until')
        batch_op.drop_column('revoke_owner')
