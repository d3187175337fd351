"""Tokens the gateway signs: access tokens (for OAuth2 clients and exchanged
workload identities) and run tokens (a delegated, run-bound scope)."""

from __future__ import annotations

import secrets
import time
from datetime import timedelta
from typing import Any

from gateway.auth import GATEWAY, Principal, RunScope
from gateway.errors import Unauthenticated
from gateway.identity import check_audience, check_times
from gateway.policy import Subject
from gateway.signing import SigningKeys

AUDIENCE = "credgate"
LEEWAY = 30


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

    def mint_access(
        self, *, kind: str, name: str, issuer: str, roles: frozenset[str], claims: dict[str, Any], ttl: timedelta
    ) -> str:
        body = self._base(name, ttl)
        body.update(cg_kind=kind, cg_iss=issuer, cg_roles=sorted(roles), cg_claims=claims)
        return self.signing.sign(body)

    def mint_run(self, *, run_id: str, scope: RunScope, ttl: timedelta) -> str:
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
            act={"iss": d.issuer, "sub": d.subject, "roles": sorted(d.roles), "claims": dict(d.claims)},
        )
        return self.signing.sign(body, typ="cg-run+jwt")

    async def verify(self, token: str) -> Principal:
        decoded = await self.signing.verify(token)
        claims = dict(decoded.claims)
        if claims.get("iss") != self.issuer_url:
            raise Unauthenticated("The token's issuer does not match.", code="token_issuer_invalid")
        check_audience(claims, [AUDIENCE])
        check_times(claims, LEEWAY)
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
            return Principal("run", claims["jti"], scope.run_id, scope=scope)
        if kind in ("client", "workload"):
            issuer = claims.get("cg_iss") or GATEWAY
            sub = str(claims.get("sub"))
            name = sub.split(":", 1)[1] if issuer == GATEWAY and ":" in sub else sub
            return Principal(kind, claims["jti"], name, issuer=issuer, roles=frozenset(claims.get("cg_roles") or ()),
                             claims=claims.get("cg_claims") or {})
        raise Unauthenticated("The token is not one this gateway issues.", code="token_invalid")
