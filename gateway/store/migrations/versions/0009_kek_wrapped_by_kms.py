"""KEK versions wrapped by a KMS

A KMS-held KEK (CREDGATE_KEK_SOURCE=aws-kms or vault-transit) keeps each KEK
version in the store as the KMS wrapped it (``kek_versions.wrapped_key``), with the
version of the KMS key that wrapped it (``kms_key_version``). Both stay NULL for a
KEK file or CREDGATE_KEK.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-27 19:30:00.000000
"""

import sqlalchemy as sa
from alembic import op


revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('kek_versions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('wrapped_key', sa.LargeBinary(), nullable=True))
        batch_op.add_column(sa.Column('kms_key_version', sa.String(length=200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('kek_versions', schema=None) as batch_op:
        batch_op.drop_column('kms_key_version')
        batch_op.drop_column('wrapped_key')
