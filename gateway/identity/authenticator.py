"""From a bearer token to a :class:`~gateway.identity.principal.Principal` (see gateway/identity/principal.py for the shapes).

A token that verified is remembered by its SHA-256, with the principal it
became, for at most ``ADMIN_KEY_SECONDS``, never past the token's ``exp`` nor
past the end of its signing key's grace period after a rotation, so the next
request with it costs a hash and a dict lookup. The entry is dropped
on every replica when the admin key is revoked or an issuer, client or
signing key changes (:mod:`gateway.store.changes`). What can change per request is
not cached with the principal: every source it derives from (its client,
admin key, issuer mapping, its own and its delegator's token) is checked
every time through :class:`~gateway.identity.revocation.Revocation`'s cache of live
sources, a run token's run through the cache of live runs, and the policy is
the current compiled set.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import replace

from gateway.audit import trail as audit
from gateway.identity.principal import AdminKeys, Principal
from gateway.store.cache import MISSING, Cache
from gateway.errors import Unauthenticated
from gateway.identity.issuers import TrustedIssuers
from gateway.identity.jose import peek
from gateway.policy.store import Policies
from gateway.identity.revocation import Revocation
from gateway.identity.runs import Runs
from gateway.identity.tokens import Tokens

ADMIN_KEY_SECONDS = 300.0  # the longest any verified token is reused (admin keys have no exp)


class Authenticator:
    def __init__(
        self, admin_keys: AdminKeys, tokens: Tokens, issuers: TrustedIssuers, runs: Runs, policies: Policies
    ) -> None:
        self._admin_keys = admin_keys
        self._tokens = tokens
        self._issuers = issuers
        self._runs = runs
        self._policies = policies
        self.revocation = Revocation(admin_keys.store)
        feed = admin_keys.store.changes
        self.cache: Cache[bytes, Principal] = Cache("tokens", feed, ttl=ADMIN_KEY_SECONDS, max_entries=50_000)
        for topic in ("admin_key", "issuer", "client", "signing_key"):
            feed.subscribe(topic, lambda _key: self.cache.invalidate())

    async def authenticate(self, token: str) -> Principal:
        digest = hashlib.sha256(token.encode()).digest()
        principal, generation = self.cache.lookup(digest)
        if principal is MISSING:
            principal, expires = await self._verify(token)
            self.cache.store(digest, principal, generation, expires_at=expires)
        audit.note(issuer=principal.issuer, subject=principal.subject)  # a refusal below records who asked
        await self.revocation.check(principal.source)
        if principal.scope is not None:
            await self._runs.check_live(principal.scope.run_id)
        return replace(principal, policy=await self._policies.current())

    async def _verify(self, token: str) -> tuple[Principal, float | None]:
        """The principal, and until when (monotonic) it may be reused."""
        exp = grace_end = None
        if token.startswith("cgt_"):
            principal = await self._admin_keys.authenticate(token)
        elif "." not in token:
            # Wrap tokens and client secrets are not bearer credentials.
            raise Unauthenticated("The bearer token is not valid.", code="invalid_token")
        else:
            header, claims = peek(token)
            iss = claims.get("iss")
            if iss == self._tokens.issuer_url:
                principal = await self._tokens.verify(token)
                grace_end = self._tokens.signing.grace_end(header.get("kid"))
            else:
                row = await self._issuers.by_issuer_url(iss) if isinstance(iss, str) else None
                if row is None:
                    raise Unauthenticated("The token's issuer is not trusted here.", code="token_issuer_unknown")
                verified = await self._issuers.verify(token, row)
                principal = Principal(
                    "workload", str(claims.get("jti") or verified.subject), verified.subject, issuer=verified.issuer,
                    roles=verified.roles, claims=verified.claims, source=verified.source,
                )
            exp = claims.get("exp")  # verified above: present and in the future
        until = time.monotonic() + (exp - time.time()) if isinstance(exp, (int, float)) else None
        if grace_end is not None:  # its signing key is in a grace period: not past its end
            until = grace_end if until is None else min(until, grace_end)
        return principal, until
