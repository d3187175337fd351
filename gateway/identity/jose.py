"""JOSE helpers every verifier here shares: an unverified peek to route a token, the
time and audience checks (joserfc's claims registry, its failures as stable 401 codes),
and a JOSE failure as a specific 401. Imports nothing of credgate but the error tree.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from joserfc import jws
from joserfc.errors import ExpiredTokenError, InvalidClaimError, JoseError, MissingClaimError
from joserfc.jwt import JWTClaimsRegistry

from gateway.errors import Unauthenticated

MAX_TOKEN_BYTES = 8192
ASYMMETRIC = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"]


def peek(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and claims of a compact JWT, *unverified*: only to route it to its verifier."""
    if len(token) > MAX_TOKEN_BYTES or token.count(".") != 2:
        raise Unauthenticated("The bearer token is not valid.", code="invalid_token")
    try:
        obj = jws.extract_compact(token.encode())
        claims = json.loads(obj.payload)
    except (JoseError, ValueError, TypeError):
        raise Unauthenticated("The token is malformed.", code="token_invalid") from None
    if not isinstance(claims, dict):
        raise Unauthenticated("The token is malformed.", code="token_invalid")
    return dict(obj.headers()), claims


_TIMES = ("exp", "nbf", "iat")


def check_times(claims: Mapping[str, Any], leeway: int, *, require_exp: bool = True) -> None:
    """``exp`` (required unless told otherwise), ``nbf`` and ``iat`` against now, with ``leeway``
    seconds of clock skew, through joserfc's registry: 401 ``token_claim_missing``,
    ``token_expired`` (also for an ``exp`` that is not a number) or ``token_not_yet_valid``."""
    registry = JWTClaimsRegistry(leeway=leeway, **({"exp": {"essential": True}} if require_exp else {}))
    try:
        registry.validate({k: claims[k] for k in _TIMES if claims.get(k) is not None})
    except MissingClaimError:
        raise Unauthenticated("The token has no expiry.", code="token_claim_missing") from None
    except ExpiredTokenError:
        raise Unauthenticated("The token has expired.", code="token_expired") from None
    except InvalidClaimError as exc:
        if exc.claim == "exp":
            raise Unauthenticated("The token has expired.", code="token_expired") from None
        raise Unauthenticated("The token is not valid yet.", code="token_not_yet_valid") from None


def check_audience(claims: Mapping[str, Any], accepted: list[str]) -> None:
    """One of ``accepted`` among the token's ``aud`` (a string or a list), else 401."""
    registry = JWTClaimsRegistry(aud={"essential": True, "values": list(accepted)})
    try:
        registry.validate({"aud": claims.get("aud")})
    except (MissingClaimError, InvalidClaimError):
        raise Unauthenticated("The token is not meant for this gateway (audience).", code="token_audience_invalid") from None


def token_error(exc: JoseError) -> Unauthenticated:
    """A JOSE failure as a specific, stable 401."""
    code = {
        "unsupported_algorithm": ("token_alg_not_allowed", "The token's algorithm is not allowed."),
        "invalid_key_id": ("token_kid_unknown", "The token is signed with a key this gateway doesn't know."),
        "bad_signature": ("token_signature_invalid", "The token's signature does not verify."),
        "expired_token": ("token_expired", "The token has expired."),
        "invalid_claim": ("token_claim_invalid", "A claim of the token is not acceptable."),
        "missing_claim": ("token_claim_missing", "The token lacks a required claim."),
    }.get(getattr(exc, "error", ""), ("token_invalid", "The token is malformed."))
    return Unauthenticated(code[1], code=code[0])
