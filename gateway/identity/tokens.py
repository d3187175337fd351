"""Tokens the gateway signs: access tokens (for OAuth2 clients and exchanged
workload identities) and run tokens (a delegated, run-bound scope).

Each names what its authority derives from (``cg_src``; for a run token, its
delegator's in ``act.src``), and the principal it becomes carries those
sources plus the token's own ``jti``: the authenticator checks every one is
still live at each request (:mod:`gateway.identity.revocation`). A token without
``cg_src`` is refused.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from gateway.identity.principal import GATEWAY, Principal, RunScope
from gateway.errors import Unauthenticated
from gateway.identity.issuers import check_audience, check_times
from gateway.policy.rules import Subject
from gateway.identity.signing import SigningKeys

AUDIENCE = "credgate"
LEEWAY = 30
SOURCE_KINDS = ("client:", "admin_key:", "issuer:", "jti:")


def _sources(value: Any) -> tuple[str, ...]:
    """A token's ``cg_src``: a non-empty list of known source strings, else 401."""
    if (not isinstance(value, list) or not value or len(value) > 8
            or not all(isinstance(v, str) and v.startswith(SOURCE_KINDS) and len(v) <= 300 for v in value)):
        raise Unauthenticated("The token does not say what it derives from; get a new one.", code="token_claim_missing")
    return tuple(value)


class Tokens:
    def __init__(self, signing: SigningKeys, issuer_url: str) -> None:
        self.signing = signing
        self.issuer_url = issuer_url

    def _base(self, subject: str, ttl: timedelta) -> dict[str, Any]:
        now = int(time.time())
        return {
            "iss": self.issuer_url,
            "aud": AUDIENCE,
            "sub": subject,
            "iat": now,
            "nbf": now,
            "exp": now + int(ttl.total_seconds()),
            "jti": secrets.token_urlsafe(12),
        }

    async def mint_access(
        self, *, kind: str, name: str, issuer: str, roles: frozenset[str], claims: dict[str, Any], ttl: timedelta,
        source: Sequence[str],
    ) -> str:
        """``source``: what the token derives from (the client, the issuer's mapping), never empty."""
        body = self._base(name, ttl)
        body.update(cg_kind=kind, cg_iss=issuer, cg_roles=sorted(roles), cg_claims=claims, cg_src=list(_sources(list(source))))
        await self.signing.fresh()
        return self.signing.sign(body)

    async def mint_run(self, *, run_id: str, scope: RunScope, ttl: timedelta, source: Sequence[str]) -> str:
        """``source``: the delegator principal's sources (its own token's ``jti`` among them)."""
        body = self._base(f"run:{run_id}", ttl)
        d = scope.delegator
        body.update(
            cg_kind="run",
            run=run_id,
            scope={
                "connectors": list(scope.connectors),
                "resources": list(scope.resources),
                "max_ttl_seconds": int(scope.max_ttl.total_seconds()) if scope.max_ttl else None,
            },
            act={"iss": d.issuer, "sub": d.subject, "roles": sorted(d.roles), "claims": dict(d.claims),
                 "src": list(_sources(list(source)))},
        )
        await self.signing.fresh()
        return self.signing.sign(body, typ="cg-run+jwt")

    async def verify(self, token: str) -> Principal:
        decoded = await self.signing.verify(token)
        claims = dict(decoded.claims)
        if claims.get("iss") != self.issuer_url:
            raise Unauthenticated("The token's issuer does not match.", code="token_issuer_invalid")
        check_audience(claims, [AUDIENCE])
        check_times(claims, LEEWAY)
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti:
            raise Unauthenticated("The token lacks a required claim.", code="token_claim_missing")
        kind = claims.get("cg_kind")
        if kind == "run":
            scope_claim = claims.get("scope") or {}
            act = claims.get("act") or {}
            max_ttl = scope_claim.get("max_ttl_seconds")
            scope = RunScope(
                run_id=str(claims.get("run")),
                connectors=tuple(scope_claim.get("connectors") or ()),
                resources=tuple(scope_claim.get("resources") or ()),
                max_ttl=timedelta(seconds=max_ttl) if max_ttl else None,
                delegator=Subject(act.get("iss", GATEWAY), act.get("sub", ""), frozenset(act.get("roles") or ()),
                                  act.get("claims") or {}),
            )
            return Principal("run", jti, scope.run_id, scope=scope, source=(f"jti:{jti}", *_sources(act.get("src"))))
        if kind in ("client", "workload", "admin_key"):  # admin_key: a console session signed in with a key
            issuer = claims.get("cg_iss") or GATEWAY
            sub = str(claims.get("sub"))
            name = sub.split(":", 1)[1] if issuer == GATEWAY and ":" in sub else sub
            return Principal(kind, jti, name, issuer=issuer, roles=frozenset(claims.get("cg_roles") or ()),
                             claims=claims.get("cg_claims") or {},
                             source=(*_sources(claims.get("cg_src")), f"jti:{jti}"))
        raise Unauthenticated("The token is not one this gateway issues.", code="token_invalid")
