"""Is a trusted issuer usable? Its JWK set is read (fetched from ``jwks_url``, or the
inline set) and each key is judged the way token verification would use it.

Used by ``POST /v1/issuers/{name}/check`` and ``PUT /v1/issuers/{name}?check=true``
(``credgate issuer add`` checks by default, ``credgate issuer check NAME``).

A check fetches exactly the configured ``jwks_url``: no redirect is followed, no proxy
from the environment is used, nothing a key or a document names (``jku``, ``x5u``) is
read, and at most ``MAX_JWKS_BYTES`` are read. It always fetches afresh and never
touches the verification cache (:class:`gateway.identity.TrustedIssuers`), so it tells
whether the issuer is reachable now, without dropping the keys live requests use.
Failures are ``503 jwks_unavailable`` (can't be fetched), ``422 jwks_invalid`` (not a
JWK set) and ``422 jwks_no_usable_key`` (no key tokens could be verified with); their
messages name the issuer and the reason, never the document's content.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
from joserfc.errors import JoseError
from joserfc.jwk import JWKRegistry

from gateway.errors import Unavailable, ValidationFailed, field_path

MAX_JWKS_BYTES = 1024 * 1024
MAX_KEYS = 100
TIMEOUT_SECONDS = 5.0
_FAMILIES = {"RSA": ("RS", "PS"), "EC": ("ES",), "OKP": ("EdDSA",)}


def _text(value: Any) -> str | None:
    """A value from the fetched document, as a report may repeat it (bounded, printable)."""
    return field_path([value]) if isinstance(value, (str, int)) else None


def judge(jwk: Any, algorithms: list[str]) -> dict[str, Any]:
    """One key of a set: its kid, kty, alg and use, whether a token could be verified
    with it under the issuer's ``algorithms``, and why not."""
    if not isinstance(jwk, dict):
        return {"kid": None, "kty": None, "alg": None, "usable": False, "problem": "not a JSON object"}
    out: dict[str, Any] = {"kid": _text(jwk.get("kid")), "kty": _text(jwk.get("kty")), "alg": _text(jwk.get("alg")),
                           "usable": False, "problem": None}
    try:
        key = JWKRegistry.import_key(jwk)
    except (JoseError, ValueError, TypeError, KeyError):
        out["problem"] = "not a valid JWK"
        return out
    kty, alg, use = key.key_type, jwk.get("alg"), jwk.get("use")
    if kty == "oct":
        out["problem"] = "a symmetric key: never accepted"
    elif key.is_private:
        out["problem"] = "holds private key material: a JWKS publishes public keys only"
    elif use not in (None, "sig"):
        out["problem"] = "not a signing key (use is not 'sig')"
    elif alg is not None and alg not in algorithms:
        out["problem"] = f"its alg is not one of the issuer's algorithms ({', '.join(algorithms)})"
    elif alg is None and not any(a.startswith(_FAMILIES.get(kty, ())) for a in algorithms):
        out["problem"] = f"no algorithm of the issuer ({', '.join(algorithms)}) uses a {kty} key"
    else:
        out["usable"] = True
    return out


async def fetch_jwks(url: str, issuer: str, *, http: httpx.AsyncClient | None = None) -> Any:
    """The JSON document at ``url`` now; 503 ``jwks_unavailable`` naming why not."""
    def unavailable(why: str) -> Unavailable:
        return Unavailable(f"The JWKS of issuer {issuer!r} can't be fetched: {why}.", code="jwks_unavailable")

    client = http or httpx.AsyncClient(timeout=TIMEOUT_SECONDS, follow_redirects=False, trust_env=False)
    try:
        async with client.stream("GET", url, headers={"Accept": "application/json"}) as resp:
            if resp.status_code != 200:
                raise unavailable(f"{url} answered HTTP {resp.status_code}")
            body = bytearray()
            async for chunk in resp.aiter_bytes():
                body += chunk
                if len(body) > MAX_JWKS_BYTES:
                    raise unavailable(f"{url} sent more than {MAX_JWKS_BYTES} bytes")
    except httpx.TimeoutException:
        raise unavailable(f"{url} did not answer within {TIMEOUT_SECONDS:g} s") from None
    except httpx.HTTPError as exc:
        raise unavailable(f"can't connect to {url} ({type(exc).__name__})") from None
    finally:
        if http is None:
            await client.aclose()
    try:
        return json.loads(bytes(body))
    except (ValueError, UnicodeDecodeError):
        raise ValidationFailed(f"The JWKS of issuer {issuer!r} at {url} is not JSON.", code="jwks_invalid") from None


async def check_issuer(name: str, *, jwks_url: str | None, jwks: Any, algorithms: list[str],
                       http: httpx.AsyncClient | None = None) -> dict[str, Any]:
    """The report on an issuer's keys: ``{"name", "source", "keys": [...], "usable_keys"}``;
    or 503/422 (see the module docstring), the 422s carrying the same ``keys`` list."""
    doc = await fetch_jwks(jwks_url, name, http=http) if jwks_url is not None else jwks
    source = jwks_url or "inline JWK set"
    keys = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(keys, list):
        raise ValidationFailed(f"The JWKS of issuer {name!r} ({source}) is not a JWK set ({{\"keys\": [...]}}).",
                               code="jwks_invalid")
    judged = [judge(k, algorithms) for k in keys[:MAX_KEYS]]
    usable = sum(1 for k in judged if k["usable"])
    if not usable:
        first = f"; kid {judged[0]['kid'] or '-'}: {judged[0]['problem']}" if judged else ""
        raise ValidationFailed(
            f"The JWKS of issuer {name!r} ({source}) has no key a token could be verified with "
            f"({len(keys)} key(s) found{first}).",
            code="jwks_no_usable_key", keys=judged,
        )
    return {"name": name, "source": source, "keys": judged, "usable_keys": usable}
