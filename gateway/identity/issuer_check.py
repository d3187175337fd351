"""Is a trusted issuer usable? Its JWK set is read (fetched from ``jwks_url``, or the
inline set) and each key is judged the way token verification would use it.

Used by ``POST /v1/issuers/{name}/check`` and ``PUT /v1/issuers/{name}?check=true``
(``credgate issuer add`` checks by default, ``credgate issuer check NAME``).

A check fetches exactly the configured ``jwks_url``: no redirect is followed, no proxy
from the environment is used, nothing a key or a document names (``jku``, ``x5u``) is
read, and at most ``MAX_JWKS_BYTES`` are read. It always fetches afresh and never
touches the verification cache (:class:`gateway.identity.issuers.TrustedIssuers`), so it tells
whether the issuer is reachable now, without dropping the keys live requests use.

The report says ``ok`` or names the failure with a stable ``code``: ``jwks_unavailable``
(can't be fetched), ``jwks_invalid`` (not a JWK set), ``jwks_no_usable_key`` (no key a
token could be verified with). ``POST .../check`` answers it with 200, like the other
checks (``backends/{name}/check``, ``connectors/{name}/verify``); ``PUT ...?check=true``
refuses a failing issuer with 422 and that code, saving nothing. Messages name the
issuer and the reason, never the document's content.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
from joserfc.errors import JoseError
from joserfc.jwk import JWKRegistry

from gateway.errors import ValidationFailed, field_path

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


class CheckFailed(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


async def fetch_jwks(url: str, issuer: str, *, http: httpx.AsyncClient | None = None) -> Any:
    """The JSON document at ``url`` now; CheckFailed ``jwks_unavailable``/``jwks_invalid`` naming why not."""
    def unavailable(why: str) -> CheckFailed:
        return CheckFailed("jwks_unavailable", f"The JWKS of issuer {issuer!r} can't be fetched: {why}.")

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
    except (httpx.HTTPError, httpx.InvalidURL, ValueError) as exc:
        raise unavailable(f"can't connect to {url} ({type(exc).__name__})") from None
    finally:
        if http is None:
            await client.aclose()
    try:
        return json.loads(bytes(body))
    except (ValueError, UnicodeDecodeError):
        raise CheckFailed("jwks_invalid", f"The JWKS of issuer {issuer!r} at {url} is not JSON.") from None


async def check_issuer(name: str, *, jwks_url: str | None, jwks: Any, algorithms: list[str],
                       http: httpx.AsyncClient | None = None) -> dict[str, Any]:
    """The report on an issuer's keys: ``{"name", "source", "ok", "code", "message", "keys",
    "usable_keys"}`` (``code`` and ``message`` say why not when it is not ok)."""
    source = jwks_url or "inline JWK set"
    report: dict[str, Any] = {"name": name, "source": source, "ok": False, "code": None, "message": None,
                              "keys": [], "usable_keys": 0}
    try:
        doc = await fetch_jwks(jwks_url, name, http=http) if jwks_url is not None else jwks
        keys = doc.get("keys") if isinstance(doc, dict) else None
        if not isinstance(keys, list):
            raise CheckFailed("jwks_invalid",
                              f"The JWKS of issuer {name!r} ({source}) is not a JWK set ({{\"keys\": [...]}}).")
        judged = report["keys"] = [judge(k, algorithms) for k in keys[:MAX_KEYS]]
        report["usable_keys"] = sum(1 for k in judged if k["usable"])
        if not report["usable_keys"]:
            first = f"; kid {judged[0]['kid'] or '-'}: {judged[0]['problem']}" if judged else ""
            raise CheckFailed("jwks_no_usable_key",
                              f"The JWKS of issuer {name!r} ({source}) has no key a token could be verified with "
                              f"({len(keys)} key(s) found{first}).")
    except CheckFailed as exc:
        report.update(code=exc.code, message=exc.message)
        return report
    report.update(ok=True, message=f"{report['usable_keys']} usable key(s) of {len(report['keys'])}")
    return report


def require_usable(report: dict[str, Any]) -> None:
    """422 with the report's code (saving nothing) unless the check passed."""
    if not report["ok"]:
        raise ValidationFailed(report["message"], code=report["code"], keys=report["keys"])
