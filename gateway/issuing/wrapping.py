"""Wrap tokens: single-use, short-lived handles that unwrap to a credential.

The metadata server can ask for a credential *wrapped* and pass the token to
a pipeline without ever seeing the credential. The token is stored only as
its SHA-256; the payload is sealed like any secret and destroyed the moment
it is unwrapped, when the token expires, or when its lease is revoked.
Unwrapping is a locked read-and-destroy in one transaction, so two
concurrent unwraps of one token can't both succeed.
"""

from __future__ import annotations

import json
import secrets
from datetime import datetime
from typing import Any

from sqlalchemy import Update, select, update

from gateway.identity.principal import hash_token
from gateway.crypto.envelope import Envelope
from gateway.errors import Gone, NotFound
from gateway.store import Store
from gateway.store.models import WrapRow, utcnow
from gateway.store.sealed import wrap_context

TOKEN_PREFIX = "cgw_"




class WrapTokens:
    def __init__(self, store: Store, envelope: Envelope) -> None:
        self._store = store
        self._envelope = envelope

    def new(self, lease_id: str, payload: dict[str, Any], expires_at: datetime) -> tuple[str, WrapRow]:
        """A new token and its (unsaved) row; the caller adds it in its own transaction."""
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        digest = hash_token(token)
        row = WrapRow(token_hash=digest, lease_id=lease_id, created_at=utcnow(), expires_at=expires_at)
        row.sealed = self._envelope.seal(json.dumps(payload).encode(), wrap_context(digest))
        return token, row

    async def unwrap(self, token: str) -> tuple[str, dict[str, Any]]:
        """Return (lease_id, payload) exactly once."""
        digest = hash_token(token)
        now = utcnow()
        async with self._store.write() as s:
            row = (
                await s.execute(select(WrapRow).where(WrapRow.token_hash == digest).with_for_update())
            ).scalar_one_or_none()
            if row is None:
                raise NotFound("This wrap token is not known.", code="wrap_token_not_found")
            if row.ended == "used" or row.consumed_at is not None:
                raise Gone("This wrap token has already been unwrapped.", code="wrap_token_used")
            if row.ended == "revoked":
                raise Gone("The lease behind this wrap token was revoked.", code="wrap_token_revoked")
            if row.ended == "expired" or row.expires_at <= now:
                row.ended = "expired"
                row.sealed = None
                error: Gone | None = Gone("This wrap token has expired.", code="wrap_token_expired")
            else:
                error = None
                payload = json.loads(self._envelope.open(row.sealed, wrap_context(digest)))
                row.consumed_at = now
                row.ended = "used"
                row.sealed = None
            lease_id = row.lease_id
        if error is not None:  # committed the payload's destruction first
            raise error
        return lease_id, payload

    async def end_for_lease(self, lease_id: str, reason: str) -> None:
        """Destroy any unconsumed payload of a lease (revoked or expired). One UPDATE that may run
        again: it joins the group commit, so concurrent revocations share a transaction."""
        statement = self.end_statement(lease_id, reason)
        await self._store.grouped(lambda s: s.execute(statement))

    @staticmethod
    def end_statement(lease_id: str, reason: str) -> Update:
        """The UPDATE of :meth:`end_for_lease`, for a caller that runs it in its own transaction."""
        return (
            update(WrapRow)
            .where(WrapRow.lease_id == lease_id, WrapRow.ended.is_(None))
            .values(ended=reason, kek_version=None, wrapped_dek=None, ciphertext=None)
            .execution_options(synchronize_session=False)
        )

    async def purge_expired(self, now: datetime) -> int:
        async with self._store.write() as s:
            res = await s.execute(
                update(WrapRow)
                .where(WrapRow.ended.is_(None), WrapRow.expires_at <= now)
                .values(ended="expired", kek_version=None, wrapped_dek=None, ciphertext=None)
            )
            return res.rowcount
