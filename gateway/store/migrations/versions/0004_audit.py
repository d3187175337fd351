"""audit

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26 09:28:39.906857
"""

from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table('audit_checkpoints',
    sa.Column('seq', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('hash', sa.String(length=64), nullable=False),
    sa.Column('time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('signature', sa.String(length=4000), nullable=False),
    sa.PrimaryKeyConstraint('seq')
    )
    op.create_table('audit_events',
    sa.Column('seq', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('request_id', sa.String(length=80), nullable=True),
    sa.Column('issuer', sa.String(length=256), nullable=True),
    sa.Column('subject', sa.String(length=256), nullable=True),
    sa.Column('action', sa.String(length=64), nullable=True),
    sa.Column('target', sa.String(length=700), nullable=True),
    sa.Column('decision', sa.String(length=16), nullable=True),
    sa.Column('rule', sa.String(length=200), nullable=True),
    sa.Column('outcome', sa.String(length=100), nullable=True),
    sa.Column('lease_id', sa.String(length=40), nullable=True),
    sa.Column('client_addr', sa.String(length=100), nullable=True),
    sa.Column('details', sa.JSON(), nullable=True),
    sa.Column('prev_hash', sa.String(length=64), nullable=False),
    sa.Column('hash', sa.String(length=64), nullable=False),
    sa.PrimaryKeyConstraint('seq')
    )
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_audit_events_action'), ['action'], unique=False)
        batch_op.create_index(batch_op.f('ix_audit_events_lease_id'), ['lease_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_audit_events_subject'), ['subject'], unique=False)
        batch_op.create_index(batch_op.f('ix_audit_events_time'), ['time'], unique=False)

    op.create_table('audit_keys',
    sa.Column('id', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('kek_version', sa.Integer(), nullable=True),
    sa.Column('wrapped_dek', sa.LargeBinary(), nullable=True),
    sa.Column('ciphertext', sa.LargeBinary(), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('audit_keys', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_audit_keys_kek_version'), ['kek_version'], unique=False)




def downgrade() -> None:

    with op.batch_alter_table('audit_keys', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_audit_keys_kek_version'))

    op.drop_table('audit_keys')
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_audit_events_time'))
        batch_op.drop_index(batch_op.f('ix_audit_events_subject'))
        batch_op.drop_index(batch_op.f('ix_audit_events_lease_id'))
        batch_op.drop_index(batch_op.f('ix_audit_events_action'))

    op.drop_table('audit_events')
    op.drop_table('audit_checkpoints')

