"""keyless connectors: a connector may name no secret

A connector whose auth method holds no secret (``web-identity``: the gateway is the OIDC
issuer the cloud trusts) names no backend secret: ``secret_backend`` and ``secret_path``
become nullable. Every connector of an earlier release names one, so nothing changes for
them.

Revision ID: 0015
Revises: 0014
Create Date: 2026-11-28 08:10:00.000000
"""

import sqlalchemy as sa
from alembic import op


revision = '0015'
down_revision = '0014'
branch_labels = None
depends_on = None
# Not expand-only: a release before this one would read a keyless connector's NULL secret.
runs_on_previous = False


def upgrade() -> None:
    with op.batch_alter_table('connectors', schema=None) as batch_op:
        batch_op.alter_column('secret_backend', existing_type=sa.String(length=64), nullable=True)
        batch_op.alter_column('secret_path', existing_type=sa.String(length=512), nullable=True)


def downgrade() -> None:
    keyless = op.get_bind().execute(sa.text("SELECT count(*) FROM connectors WHERE secret_backend IS NULL")).scalar()
    if keyless:
        raise RuntimeError(
            f"{keyless} connector(s) use a keyless auth method (web-identity), which the schema before "
            "0015 can't hold: remove them (credgate connector delete NAME) before downgrading."
        )
    with op.batch_alter_table('connectors', schema=None) as batch_op:
        batch_op.alter_column('secret_path', existing_type=sa.String(length=512), nullable=False)
        batch_op.alter_column('secret_backend', existing_type=sa.String(length=64), nullable=False)
