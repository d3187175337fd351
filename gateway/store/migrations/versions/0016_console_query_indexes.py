"""console query indexes: leases by run and by hour, runs newest first, audit by run and keyed hash

- ``leases (run_id, id)``: keyset pages of ``GET /v1/leases?run=``; replaces the single-column
  ``ix_leases_run_id``, which it covers (revoking a run's leases reads the same range).
- ``leases (issued_at)``: ``GET /v1/leases/issuance`` counts the leases issued in the last hours
  with one GROUP BY over an index range.
- ``runs (created_at, run_id)`` and ``runs (created_by, created_at, run_id)``: keyset pages of
  ``GET /v1/runs``, newest first, for every run and for one delegator's runs.
- ``audit_events ((details.run_id), seq)``: ``GET /v1/audit?run=``, on the chained JSON as the
  connector index of 0013 is (nothing outside the chain to alter, nothing to backfill).
- ``audit_events ((details.wrap_token), seq)`` and ``((details.client_secret), seq)``:
  ``GET /v1/audit?hmac=``. Whole indexes, not partial ones (``WHERE ... IS NOT NULL``):
  PostgreSQL keeps statistics on a whole expression index, and without them it planned the
  rare match as a walk of the whole trail in seq order (measured: 0.5 s at 1,000,000 events,
  against 0.05 ms through the index).

Revision ID: 0016
Revises: 0015
Create Date: 2026-11-28 11:00:00.000000
"""

import sqlalchemy as sa
from alembic import op


revision = '0016'
down_revision = '0015'
branch_labels = None
depends_on = None
# Expand only: indexes; the one dropped (ix_leases_run_id) is covered by (run_id, id).
runs_on_previous = True

_DETAIL = {
    "postgresql": "(details ->> '{key}')",
    "sqlite": "json_extract(details, '$.{key}')",
}
_KEYED = ('wrap_token', 'client_secret')


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    with op.batch_alter_table('leases', schema=None) as batch_op:
        batch_op.create_index('ix_leases_run_id_id', ['run_id', 'id'], unique=False)
        batch_op.create_index('ix_leases_issued_at', ['issued_at'], unique=False)
        batch_op.drop_index(batch_op.f('ix_leases_run_id'))
    op.create_index('ix_runs_created_at_run_id', 'runs', ['created_at', 'run_id'], unique=False)
    op.create_index('ix_runs_created_by_created_at_run_id', 'runs', ['created_by', 'created_at', 'run_id'],
                    unique=False)
    detail = _DETAIL[dialect]
    op.create_index('ix_audit_events_run_id_seq', 'audit_events', [sa.text(detail.format(key='run_id')), 'seq'],
                    unique=False)
    for key in _KEYED:
        op.create_index(f'ix_audit_events_{key}_seq', 'audit_events', [sa.text(detail.format(key=key)), 'seq'],
                        unique=False)


def downgrade() -> None:
    for key in _KEYED:
        op.drop_index(f'ix_audit_events_{key}_seq', table_name='audit_events')
    op.drop_index('ix_audit_events_run_id_seq', table_name='audit_events')
    op.drop_index('ix_runs_created_by_created_at_run_id', table_name='runs')
    op.drop_index('ix_runs_created_at_run_id', table_name='runs')
    with op.batch_alter_table('leases', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_leases_run_id'), ['run_id'], unique=False)
        batch_op.drop_index('ix_leases_issued_at')
        batch_op.drop_index('ix_leases_run_id_id')
