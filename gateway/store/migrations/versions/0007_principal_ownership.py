"""ownership by issuer and subject

Leases (``leases.principal``, also the scope of an Idempotency-Key) and runs
(``runs.created_by``) were owned by a subject string alone, so a workload from a
trusted issuer whose mapped subject spelled ``client:meta`` owned what the OAuth2
client ``meta`` owned. The owner is now ``ISSUER/SUBJECT`` (``Principal.owner``):
``credgate/client:meta``, ``k8s/system:serviceaccount:ml:trainer``. Issuer names
can't hold a '/', so no issuer can spell another's key.

Existing rows:

- a value that spells a gateway principal (``admin_key:``, ``client:``, ``run:``,
  ``workload:``) becomes ``credgate/<value>``. A row that a trusted issuer's
  workload made under such a spelled subject (the very attack this closes) can't
  be told apart and goes to the gateway principal: the workload loses it.
- any other value came from a trusted issuer that was not recorded and can't be
  attributed: it becomes ``?/<value>``. '?' is no issuer's name, so the row
  matches no principal any more (fail closed): its owner can no longer renew
  the lease, replay its Idempotency-Key, or mint for or revoke the run; an admin
  with ``leases:revoke`` still can, and ``GET /v1/leases?principal=?/<subject>``
  finds it.

Both columns widen to 600 characters (an issuer name, '/', a subject of at most
512). Downgrade keeps the subject alone again (everything after the first '/');
it drops the Idempotency-Keys of rows not owned by a gateway principal first, as
two issuers' subjects may then collide.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-27 16:30:00.000000
"""

import sqlalchemy as sa
from alembic import op


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None

GATEWAY_KINDS = ("admin_key:", "client:", "run:", "workload:")
OWNER_COLUMNS = (("leases", "principal"), ("runs", "created_by"))


def _gateway_subject(col: sa.ColumnClause) -> sa.ColumnElement[bool]:
    return sa.or_(*(col.startswith(kind, autoescape=True) for kind in GATEWAY_KINDS))


def upgrade() -> None:
    for table, column in OWNER_COLUMNS:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.alter_column(column, existing_type=sa.String(length=200), type_=sa.String(length=600),
                                  existing_nullable=False)
    for table, column in OWNER_COLUMNS:
        col = sa.column(column, sa.String)
        t = sa.table(table, col)
        # Unattributable first: a subject that spelled "credgate/client:x" must not meet the
        # rewritten "credgate/client:x" on the (principal, idempotency_key) unique constraint.
        op.execute(t.update().where(sa.not_(_gateway_subject(col))).values({column: sa.literal("?/") + col}))
        op.execute(t.update().where(_gateway_subject(col)).values({column: sa.literal("credgate/") + col}))


def downgrade() -> None:
    bind = op.get_bind()
    find = "instr" if bind.dialect.name == "sqlite" else "strpos"
    leases = sa.table("leases", sa.column("principal", sa.String), sa.column("idempotency_key", sa.String))
    op.execute(leases.update().where(~leases.c.principal.startswith("credgate/", autoescape=True))
               .values(idempotency_key=None))
    for table, column in OWNER_COLUMNS:
        col = sa.column(column, sa.String)
        t = sa.table(table, col)
        op.execute(t.update().where(col.contains("/", autoescape=True))
                   .values({column: sa.func.substr(col, getattr(sa.func, find)(col, "/") + 1)}))
    for table, column in OWNER_COLUMNS:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.alter_column(column, existing_type=sa.String(length=600), type_=sa.String(length=200),
                                  existing_nullable=False)
