"""connectors leases wrap tokens

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 08:32:10.387435
"""

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table('leases',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('connector', sa.String(length=64), nullable=False),
    sa.Column('connector_type', sa.String(length=32), nullable=False),
    sa.Column('resource', sa.String(length=256), nullable=False),
    sa.Column('principal', sa.String(length=200), nullable=False),
    sa.Column('run_id', sa.String(length=128), nullable=True),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('revocability', sa.String(length=16), nullable=False),
    sa.Column('renewable', sa.Boolean(), nullable=False),
    sa.Column('wrapped', sa.Boolean(), nullable=False),
    sa.Column('issued_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('max_expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('revoke_state', sa.JSON(), nullable=False),
    sa.Column('idempotency_key', sa.String(length=128), nullable=True),
    sa.Column('request_hash', sa.String(length=64), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_error', sa.String(length=300), nullable=True),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('kek_version', sa.Integer(), nullable=True),
    sa.Column('wrapped_dek', sa.LargeBinary(), nullable=True),
    sa.Column('ciphertext', sa.LargeBinary(), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('principal', 'idempotency_key', name='uq_leases_idempotency')
    )
    with op.batch_alter_table('leases', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_leases_connector'), ['connector'], unique=False)
        batch_op.create_index(batch_op.f('ix_leases_kek_version'), ['kek_version'], unique=False)
        batch_op.create_index(batch_op.f('ix_leases_principal'), ['principal'], unique=False)
        batch_op.create_index(batch_op.f('ix_leases_run_id'), ['run_id'], unique=False)
        batch_op.create_index('ix_leases_state_expires', ['state', 'expires_at'], unique=False)
        batch_op.create_index('ix_leases_state_next_attempt', ['state', 'next_attempt_at'], unique=False)

    op.create_table('wrap_tokens',
    sa.Column('token_hash', sa.String(length=64), nullable=False),
    sa.Column('lease_id', sa.String(length=40), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('consumed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('ended', sa.String(length=16), nullable=True),
    sa.Column('kek_version', sa.Integer(), nullable=True),
    sa.Column('wrapped_dek', sa.LargeBinary(), nullable=True),
    sa.Column('ciphertext', sa.LargeBinary(), nullable=True),
    sa.PrimaryKeyConstraint('token_hash')
    )
    with op.batch_alter_table('wrap_tokens', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_wrap_tokens_expires_at'), ['expires_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_wrap_tokens_kek_version'), ['kek_version'], unique=False)
        batch_op.create_index(batch_op.f('ix_wrap_tokens_lease_id'), ['lease_id'], unique=False)

    op.create_table('connectors',
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('type', sa.String(length=32), nullable=False),
    sa.Column('auth_method', sa.String(length=32), nullable=False),
    sa.Column('secret_backend', sa.String(length=64), nullable=False),
    sa.Column('secret_path', sa.String(length=512), nullable=False),
    sa.Column('config', sa.JSON(), nullable=False),
    sa.Column('resources', sa.JSON(), nullable=False),
    sa.Column('default_ttl_seconds', sa.Integer(), nullable=False),
    sa.Column('max_ttl_seconds', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['secret_backend'], ['backends.name'], ),
    sa.PrimaryKeyConstraint('name')
    )
    with op.batch_alter_table('connectors', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_connectors_secret_backend'), ['secret_backend'], unique=False)




def downgrade() -> None:

    with op.batch_alter_table('connectors', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_connectors_secret_backend'))

    op.drop_table('connectors')
    with op.batch_alter_table('wrap_tokens', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_wrap_tokens_lease_id'))
        batch_op.drop_index(batch_op.f('ix_wrap_tokens_kek_version'))
        batch_op.drop_index(batch_op.f('ix_wrap_tokens_expires_at'))

    op.drop_table('wrap_tokens')
    with op.batch_alter_table('leases', schema=None) as batch_op:
        batch_op.drop_index('ix_leases_state_next_attempt')
        batch_op.drop_index('ix_leases_state_expires')
        batch_op.drop_index(batch_op.f('ix_leases_run_id'))
        batch_op.drop_index(batch_op.f('ix_leases_principal'))
        batch_op.drop_index(batch_op.f('ix_leases_kek_version'))
        batch_op.drop_index(batch_op.f('ix_leases_connector'))

    op.drop_table('leases')

