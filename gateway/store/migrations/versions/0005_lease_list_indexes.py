"""lease list indexes

Keyset pages of ``GET /v1/leases`` are ``WHERE <filter> AND id > :after ORDER BY
id LIMIT n``: an index on (filter column, id) serves each page from one index
range. The composite indexes replace the single-column connector and principal
indexes, which they cover.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26 11:30:00.000000
"""

from alembic import op


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:

    with op.batch_alter_table('leases', schema=None) as batch_op:
        batch_op.create_index('ix_leases_connector_id', ['connector', 'id'], unique=False)
        batch_op.create_index('ix_leases_principal_id', ['principal', 'id'], unique=False)
        batch_op.create_index('ix_leases_state_id', ['state', 'id'], unique=False)
        batch_op.drop_index(batch_op.f('ix_leases_connector'))
        batch_op.drop_index(batch_op.f('ix_leases_principal'))


def downgrade() -> None:

    with op.batch_alter_table('leases', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_leases_principal'), ['principal'], unique=False)
        batch_op.create_index(batch_op.f('ix_leases_connector'), ['connector'], unique=False)
        batch_op.drop_index('ix_leases_state_id')
        batch_op.drop_index('ix_leases_principal_id')
        batch_op.drop_index('ix_leases_connector_id')
