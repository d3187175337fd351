"""identity policies runs

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 08:56:32.502588
"""

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table('clients',
    sa.Column('client_id', sa.String(length=64), nullable=False),
    sa.Column('secret_hash', sa.String(length=64), nullable=True),
    sa.Column('jwks', sa.JSON(), nullable=True),
    sa.Column('roles', sa.JSON(), nullable=False),
    sa.Column('token_ttl_seconds', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('client_id')
    )
    op.create_table('issuers',
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('issuer_url', sa.String(length=512), nullable=False),
    sa.Column('jwks_url', sa.String(length=1024), nullable=True),
    sa.Column('jwks', sa.JSON(), nullable=True),
    sa.Column('audiences', sa.JSON(), nullable=False),
    sa.Column('algorithms', sa.JSON(), nullable=False),
    sa.Column('leeway_seconds', sa.Integer(), nullable=False),
    sa.Column('claim_mapping', sa.JSON(), nullable=False),
    sa.Column('role_mapping', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('name'),
    sa.UniqueConstraint('issuer_url')
    )
    op.create_table('policies',
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('document', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('name')
    )
    op.create_table('runs',
    sa.Column('run_id', sa.String(length=128), nullable=False),
    sa.Column('created_by', sa.String(length=200), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('run_id')
    )
    op.create_table('signing_keys',
    sa.Column('kid', sa.String(length=64), nullable=False),
    sa.Column('alg', sa.String(length=16), nullable=False),
    sa.Column('public_jwk', sa.JSON(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('publish_until', sa.DateTime(timezone=True), nullable=True),
    sa.Column('kek_version', sa.Integer(), nullable=True),
    sa.Column('wrapped_dek', sa.LargeBinary(), nullable=True),
    sa.Column('ciphertext', sa.LargeBinary(), nullable=True),
    sa.PrimaryKeyConstraint('kid')
    )
    with op.batch_alter_table('signing_keys', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_signing_keys_kek_version'), ['kek_version'], unique=False)

    op.create_table('used_jtis',
    sa.Column('jti', sa.String(length=200), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('jti')
    )
    with op.batch_alter_table('used_jtis', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_used_jtis_expires_at'), ['expires_at'], unique=False)




def downgrade() -> None:

    with op.batch_alter_table('used_jtis', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_used_jtis_expires_at'))

    op.drop_table('used_jtis')
    with op.batch_alter_table('signing_keys', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_signing_keys_kek_version'))

    op.drop_table('signing_keys')
    op.drop_table('runs')
    op.drop_table('policies')
    op.drop_table('issuers')
    op.drop_table('clients')

