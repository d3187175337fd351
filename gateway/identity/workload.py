"""The gateway as an OIDC issuer for keyless connectors (``web-identity``).

A cloud that trusts an OIDC issuer (AWS IAM OIDC providers, GCP workload identity
federation, Entra federated credentials) verifies a JWT against the issuer's discovery
document (``{issuer}/.well-known/openid-configuration``) and keys (``/v1/jwks``), then
trades it for its own short-lived credential. This module mints those JWTs with the
gateway's signing keys (:mod:`gateway.identity.signing`: sealed at rest, rotated with an
optional overlap, published at ``/v1/jwks``), so a connector using ``web-identity`` holds
no cloud secret anywhere.

A web-identity token is not a credgate token: its ``aud`` is the cloud's (never
``credgate``) and it carries no ``cg_kind``/``cg_src``, so :class:`gateway.identity.tokens.Tokens`
refuses it as a bearer token here. It lives minutes (at most :data:`MAX_TTL`) and names
who it is for: ``sub`` the principal of the issuance (``credgate/run:RUN``, ``ISSUER/SUBJECT``,
or ``connector:NAME`` for a connector's own checks), ``run`` the run, ``lease`` the lease,
``cg_connector`` the connector.

Owns: minting web-identity tokens. May import: gateway.identity.signing, gateway.errors.
"""

from __future__ import annotations

import secrets
import time
from datetime import timedelta

from gateway.identity.signing import SigningKeys

MAX_TTL = timedelta(hours=1)
TYP = "JWT"  # what AWS, GCP and Entra expect in the header


class WebIdentityTokens:
    """:class:`connectors.base.WorkloadIdentity` for one connector (its name goes in the token)."""

    def __init__(self, signing: SigningKeys, issuer: str, connector: str) -> None:
        self._signing = signing
        self._issuer = issuer
        self._connector = connector

    @property
    def issuer(self) -> str:
        return self._issuer

    async def token(
        self, *, audience: str, subject: str, run_id: str | None = None, lease_id: str | None = None,
        ttl: timedelta = timedelta(minutes=5),
    ) -> str:
        if not audience or not subject:
            raise ValueError("a web-identity token needs an audience and a subject")
        lifetime = int(min(max(ttl, timedelta(seconds=60)), MAX_TTL).total_seconds())
        now = int(time.time())
        claims: dict[str, object] = {
            "iss": self._issuer, "sub": subject, "aud": audience,
            "iat": now, "nbf": now, "exp": now + lifetime, "jti": secrets.token_urlsafe(12),
            "cg_connector": self._connector,
        }
        if run_id:
            claims["run"] = run_id
        if lease_id:
            claims["lease"] = lease_id
        await self._signing.fresh()
        return self._signing.sign(claims, typ=TYP)
