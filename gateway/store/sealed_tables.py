"""Every table with sealed columns, and how to get each row's context: the one list KEK
rotation walks (:mod:`gateway.crypto.rotation`), so it never needs to know the subsystems
that own the tables. A new sealed table must be added here (a test checks this list
against the models).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from gateway.store.models import (
    AuditKeyRow,
    BackendRow,
    LeaseRow,
    SecretRow,
    SecretVersionRow,
    SigningKeyRow,
    WrapRow,
)
from gateway.store.sealed import (
    AUDIT_KEY_CONTEXT,
    backend_config_context,
    lease_context,
    secret_context,
    signing_context,
    wrap_context,
)


@dataclass(frozen=True)
class SealedTable:
    model: Any
    # Build the select of (row, *context columns) for rows of this table, and
    # the function that turns those columns into the record's context.
    select_rows: Callable[[], Any]
    context_of: Callable[[Any], bytes]


SEALED: list[SealedTable] = [
    SealedTable(
        SecretVersionRow,
        lambda: select(SecretVersionRow, SecretRow.backend, SecretRow.path).join(SecretRow),
        lambda r: secret_context(r[1], r[2], r[0].version),
    ),
    SealedTable(
        LeaseRow,
        lambda: select(LeaseRow).where(LeaseRow.kek_version.is_not(None)),
        lambda r: lease_context(r[0].id),
    ),
    SealedTable(
        WrapRow,
        lambda: select(WrapRow).where(WrapRow.kek_version.is_not(None)),
        lambda r: wrap_context(r[0].token_hash),
    ),
    SealedTable(
        SigningKeyRow,
        lambda: select(SigningKeyRow).where(SigningKeyRow.kek_version.is_not(None)),
        lambda r: signing_context(r[0].kid),
    ),
    SealedTable(
        AuditKeyRow,
        lambda: select(AuditKeyRow).where(AuditKeyRow.kek_version.is_not(None)),
        lambda r: AUDIT_KEY_CONTEXT,
    ),
    SealedTable(
        BackendRow,
        lambda: select(BackendRow).where(BackendRow.kek_version.is_not(None)),
        lambda r: backend_config_context(r[0].name),
    ),
]
