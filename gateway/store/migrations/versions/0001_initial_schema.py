"""initial schema

Revision ID: 0001
Revises: 
Create Date: 2026-11-26 08:12:28.703107
"""

import sqlalchemy as sa
from alembic import op

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    
    op.create_table('admin_keys',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('role', sa.String(length=32), nullable=False),
    sa.Column('token_hash', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('created_by', sa.String(length=200), nullable=True),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('token_hash')
    )
    op.create_table('backends',
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('type', sa.String(length=32), nullable=False),
    sa.Column('config_public', sa.JSON(), nullable=False),
    sa.Column('builtin', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('kek_version', sa.Integer(), nullable=True),
    sa.Column('wrapped_dek', sa.LargeBinary(), nullable=True),
    sa.Column('ciphertext', sa.LargeBinary(), nullable=True),
    sa.PrimaryKeyConstraint('name')
    )
    with op.batch_alter_table('backends', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_backends_kek_version'), ['kek_version'], unique=False)

    op.create_table('kek_versions',
    sa.Column('version', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('fingerprint', sa.String(length=32), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('retired_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('version')
    )
    op.create_table('secrets',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('backend', sa.String(length=64), nullable=False),
    sa.Column('path', sa.String(length=512).with_variant(sa.String(length=512, collation='C'), 'postgresql'), nullable=False),
    sa.Column('current_version', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('deleted_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('deleted_by', sa.String(length=200), nullable=True),
    sa.ForeignKeyConstraint(['backend'], ['backends.name'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('backend', 'path', name='uq_secrets_backend_path')
    )
    with op.batch_alter_table('secrets', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_secrets_backend'), ['backend'], unique=False)

    op.create_table('secret_versions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('secret_id', sa.Integer(), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('keys', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('created_by', sa.String(length=200), nullable=True),
    sa.Column('kek_version', sa.Integer(), nullable=True),
    sa.Column('wrapped_dek', sa.LargeBinary(), nullable=True),
    sa.Column('ciphertext', sa.LargeBinary(), nullable=True),
    sa.ForeignKeyConstraint(['secret_id'], ['secrets.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('secret_id', 'version', name='uq_secret_versions')
    )
    with op.batch_alter_table('secret_versions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_secret_versions_kek_version'), ['kek_version'], unique=False)
        batch_op.create_index(batch_op.f('ix_secret_versions_secret_id'), ['secret_id'], unique=False)




def downgrade() -> None:
    
    with op.batch_alter_table('secret_versions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_secret_versions_secret_id'))
        batch_op.drop_index(batch_op.f('ix_secret_versions_kek_version'))

    op.drop_table('secret_versions')
    with op.batch_alter_table('secrets', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_secrets_backend'))

    op.drop_table('secrets')
    op.drop_table('kek_versions')
    with op.batch_alter_table('backends', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_backends_kek_version'))

    op.drop_table('backends')
    op.drop_table('admin_keys')

