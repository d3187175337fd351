"""keyed audit chain

Events from here on are linked by HMAC-SHA256 under a key derived from the
sealed audit key (gateway/audit/trail.py). ``audit_keys.chain_from`` records the
first keyed event: on an existing deployment, the one after the current head
(older events keep their plain SHA-256 links and stay verifiable). Checkpoints
get a MAC under the chain key (``mac``, ``chain_from``) instead of depending on
a token-signing key; ``signature`` stays for the checkpoints written before.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-27 16:30:00.000000
"""

import sqlalchemy as sa
from alembic import op


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('audit_checkpoints', schema=None) as batch_op:
        batch_op.add_column(sa.Column('mac', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('chain_from', sa.Integer(), nullable=True))
        batch_op.alter_column('signature', existing_type=sa.String(length=4000), nullable=True)
    with op.batch_alter_table('audit_keys', schema=None) as batch_op:
        batch_op.add_column(sa.Column('chain_from', sa.Integer(), nullable=True))
    op.execute("UPDATE audit_keys SET chain_from = (SELECT COALESCE(MAX(seq), 0) + 1 FROM audit_events)")


def downgrade() -> None:
    # Checkpoints written after the upgrade carry no signature: the old code can't use them.
    op.execute("DELETE FROM audit_checkpoints WHERE signature IS NULL")
    with op.batch_alter_table('audit_keys', schema=None) as batch_op:
        batch_op.drop_column('chain_from')
    with op.batch_alter_table('audit_checkpoints', schema=None) as batch_op:
        batch_op.alter_column('signature', existing_type=sa.String(length=4000), nullable=False)
        batch_op.drop_column('chain_from')
        batch_op.drop_column('mac')
