"""From a bearer token to a :class:`~gateway.auth.Principal` (see gateway/auth.py for the shapes)."""

from __future__ import annotations

from dataclasses import replace

from gateway.auth import AdminKeys, Principal
from gateway.errors import Unauthenticated
from gateway.identity import TrustedIssuers, peek
from gateway.policies import Policies
from gateway.runs import Runs
from gateway.tokens import Tokens


class Authenticator:
    def __init__(
        self, admin_keys: AdminKeys, tokens: Tokens, issuers: TrustedIssuers, runs: Runs, policies: Policies
    ) -> None:
        self._admin_keys = admin_keys
        self._tokens = tokens
        self._issuers = issuers
        self._runs = runs
        self._policies = policies

    async def authenticate(self, token: str) -> Principal:
        if token.startswith("cgt_"):
            principal = await self._admin_keys.authenticate(token)
        elif "." not in token:
            # Wrap tokens and client secrets are not bearer credentials.
            raise Unauthenticated("The bearer token is not valid.", code="invalid_token")
        else:
            _, claims = peek(token)
            iss = claims.get("iss")
            if iss == self._tokens.issuer_url:
                principal = await self._tokens.verify(token)
                if principal.scope is not None:
                    await self._runs.check_live(principal.scope.run_id)
            else:
                row = await self._issuers.by_issuer_url(iss) if isinstance(iss, str) else None
                if row is None:
                    raise Unauthenticated("The token's issuer is not trusted here.", code="token_issuer_unknown")
                verified = await self._issuers.verify(token, row)
                principal = Principal(
                    "workload", str(claims.get("jti") or verified.subject), verified.subject, issuer=verified.issuer,
                    roles=verified.roles, claims=verified.claims,
                )
        return replace(principal, policy=await self._policies.current())
