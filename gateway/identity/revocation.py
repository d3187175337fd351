"""Revocation that reaches what was issued.

Every gateway token names what its authority derives from, as *sources*
(the ``cg_src`` claim; a run token's delegator's are in ``act.src``), and
every request checks that each is still live:

=============================  ======================================================  =======================
source                         live while                                              refused with (401)
=============================  ======================================================  =======================
``client:<client id>``         the OAuth2 client exists and is not revoked             ``client_revoked``
``admin_key:<key id>``         the admin key exists and is not revoked                 ``admin_key_revoked``
``issuer:<name>:<fingerprint>``  the trusted issuer exists and its URL, claim mapping     ``issuer_changed``
                               and role mapping still have that fingerprint
``jti:<jti>``                  that gateway token was not revoked on its own           ``token_revoked``
=============================  ======================================================  =======================

A gateway token's own ``jti`` is always among its sources, so revoking a token
(RFC 7009, ``credgate logout``) also ends every run token delegated with it;
its row stays in ``revoked_tokens`` until those would have expired too.

Liveness is cached per replica (positive answers only, like live runs) and
dropped by the change feed (topics ``client``, ``admin_key``, ``issuer``,
``token``), so the hot path costs a few dictionary lookups and a revocation
is enforced on every replica as soon as its notification arrives.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from gateway.store import changes
from gateway.store.cache import Cache
from gateway.errors import Unauthenticated
from gateway.identity.issuers import issuer_source
from gateway.identity.signing import MAX_TOKEN_TTL
from gateway.store import Store
from gateway.store.models import AdminKeyRow, ClientRow, IssuerRow, RevokedTokenRow, utcnow

LIVE_SECONDS = 300.0
KEEP_PAST_EXP = MAX_TOKEN_TTL + timedelta(minutes=1)  # a derived run token lives at most this past its delegator
MAX_JTI = 64
KINDS = ("client", "admin_key", "issuer", "jti")


class Revocation:
    def __init__(self, store: Store) -> None:
        self._store = store
        feed = store.changes
        self.live: Cache[str, bool] = Cache("token_sources", feed, ttl=LIVE_SECONDS, max_entries=100_000)
        for topic, kind in (("client", "client"), ("admin_key", "admin_key"), ("token", "jti")):
            feed.subscribe(topic, lambda key, kind=kind: self.live.invalidate(f"{kind}:{key}" if key else None))
        feed.subscribe("issuer", self._issuer_changed)

    def _issuer_changed(self, name: str | None) -> None:
        if name is None:
            self.live.invalidate()
        else:
            self.live.invalidate_where(lambda key, _v: key.startswith(f"issuer:{name}:"))

    async def check(self, sources: Iterable[str]) -> None:
        """Raise 401 unless every source is live."""
        for source in sources:
            await self.live.get(source, lambda source=source: self._load(source))

    async def _load(self, source: str) -> bool:
        kind, _, key = source.partition(":")
        async with self._store.read() as s:
            if kind == "client":
                row = await s.get(ClientRow, key)
                if row is None or row.revoked_at is not None:
                    raise Unauthenticated(f"Client {key!r} has been revoked; its tokens are refused.", code="client_revoked")
            elif kind == "admin_key":
                key_row = await s.get(AdminKeyRow, key)
                if key_row is None or key_row.revoked_at is not None:
                    raise Unauthenticated("The admin key this token derives from has been revoked.", code="admin_key_revoked")
            elif kind == "issuer":
                name = key.split(":", 1)[0]
                issuer = await s.get(IssuerRow, name)
                if issuer is None or issuer_source(issuer) != source:
                    raise Unauthenticated(
                        f"Issuer {name!r} was removed or its mapping changed since this token was issued; sign in again.",
                        code="issuer_changed",
                    )
            elif kind == "jti":
                revoked = (await s.execute(select(RevokedTokenRow.jti).where(RevokedTokenRow.jti == key))).first()
                if revoked is not None:
                    raise Unauthenticated("The token (or the token it was delegated by) has been revoked.",
                                          code="token_revoked")
            else:
                raise Unauthenticated("The token names a source this gateway doesn't know.", code="token_invalid")
        return True

    async def revoke(self, jti: str, expires_at: datetime, *, by: str | None) -> bool:
        """Deny ``jti``; False if it already was. Durable, and noted on the change feed,
        before it returns. The row is kept until the token (``expires_at``) and any run
        token delegated with it (at most ``MAX_TOKEN_TTL`` later) would have expired."""
        if not jti or len(jti) > MAX_JTI:
            return False
        now = utcnow()
        try:
            async with self._store.write() as s:
                await s.execute(delete(RevokedTokenRow).where(RevokedTokenRow.expires_at < now))
                if await s.get(RevokedTokenRow, jti) is not None:
                    return False
                s.add(RevokedTokenRow(jti=jti, expires_at=max(expires_at, now) + KEEP_PAST_EXP, revoked_at=now,
                                      revoked_by=(by or "")[:200] or None))
                await changes.note(s, "token", jti)
        except IntegrityError:
            return False  # revoked at the same moment by another request
        return True
