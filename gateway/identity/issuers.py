"""Who is calling, from a bearer token: admin keys, gateway tokens, run tokens,
and JWTs from trusted issuers (Kubernetes service accounts, CI OIDC, an IdP).

Every JOSE operation goes through joserfc. What is refused, and how:

- the algorithm must be in the issuer's allow-list (asymmetric only by
  default): ``alg: none`` and HS256-signed-with-the-public-key both fail as
  ``token_alg_not_allowed``;
- keys come only from the issuer's configured JWKS (URL or inline) or, for
  gateway tokens, the gateway's own keys. ``jku``, ``x5u`` and embedded
  ``jwk`` headers are never read, let alone fetched;
- ``iss`` picks the issuer; its ``aud``, ``exp``, ``nbf`` and ``iat`` are checked
  with the issuer's leeway (at most 60 s); each failure has its own code.

JWKS documents are cached per issuer and fetched again on an unknown ``kid``,
at most once per ``JWKS_REFETCH_SECONDS``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any

import httpx
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from gateway.errors import Conflict, Unauthenticated, Unavailable
from gateway.identity.jose import check_audience, check_times, token_error
from gateway.store import Store, changes
from gateway.store.models import IssuerRow, utcnow
from gateway.store.rows import delete_row, read_or_404

Issuer = IssuerRow  # what this service returns: a trusted issuer as stored

JWKS_TTL_SECONDS = 300.0
JWKS_REFETCH_SECONDS = 30.0
@dataclass(frozen=True)
class VerifiedToken:
    issuer: str  # the trusted issuer's name
    subject: str
    claims: dict[str, Any]  # mapped claims (subject, groups, project, run, ...) over the raw ones
    roles: frozenset[str]
    source: tuple[str, ...] = ()  # what the principal derives from (gateway/identity/revocation.py): the issuer's mapping


def mapping_fingerprint(row: IssuerRow) -> str:
    """A short digest of what turns an issuer's token into a principal (its URL, claim
    mapping and role mapping). A token exchanged under one fingerprint is refused once
    the issuer's fingerprint is another (or the issuer is gone)."""
    doc = {"issuer_url": row.issuer_url, "claim_mapping": row.claim_mapping or {}, "role_mapping": row.role_mapping or {}}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def issuer_source(row: IssuerRow) -> str:
    return f"issuer:{row.name}:{mapping_fingerprint(row)}"


class TrustedIssuers:
    def __init__(self, store: Store, *, http: httpx.AsyncClient | None = None) -> None:
        self._store = store
        self._http = http or httpx.AsyncClient(timeout=5.0, follow_redirects=False, trust_env=False)
        self._jwks: dict[str, tuple[KeySet, float]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.fetches = 0
        store.changes.subscribe("issuer", lambda name: self.forget(name) if name else self._jwks.clear())

    async def by_issuer_url(self, url: str) -> IssuerRow | None:
        async with self._store.read() as s:
            return (await s.execute(select(IssuerRow).where(IssuerRow.issuer_url == url))).scalar_one_or_none()

    async def get(self, name: str) -> IssuerRow:
        return await read_or_404(self._store, IssuerRow, name, "Issuer", "issuer_not_found")

    async def list(self) -> list[IssuerRow]:
        async with self._store.read() as s:
            return list((await s.execute(select(IssuerRow).order_by(IssuerRow.name))).scalars())

    async def put(self, name: str, fields: dict[str, Any]) -> tuple[IssuerRow, bool]:
        """Create or replace issuer ``name`` with ``fields`` (its columns); True if created.
        Every replica forgets its cached JWK set (the ``issuer`` change). 409
        ``issuer_url_in_use`` if another issuer has the same ``issuer_url``."""
        try:
            async with self._store.write() as s:
                row = await s.get(IssuerRow, name, with_for_update=True)
                created = row is None
                if row is None:
                    row = IssuerRow(name=name, created_at=utcnow())
                    s.add(row)
                for field, value in fields.items():
                    setattr(row, field, value)
                row.updated_at = utcnow()
                await changes.note(s, "issuer", name)
        except IntegrityError:
            raise Conflict(f"Another issuer already uses {fields.get('issuer_url')}.", code="issuer_url_in_use") from None
        self.forget(name)
        return row, created

    async def delete(self, name: str) -> None:
        """Stop trusting issuer ``name`` (404 ``issuer_not_found``); every replica forgets it."""
        await delete_row(self._store, IssuerRow, name, topic="issuer", what="Issuer", code="issuer_not_found")
        self.forget(name)

    def forget(self, name: str) -> None:
        self._jwks.pop(name, None)

    async def _keys(self, row: IssuerRow, *, refresh: bool = False) -> KeySet:
        if row.jwks is not None:
            return KeySet.import_key_set(row.jwks)
        cached = self._jwks.get(row.name)
        now = time.monotonic()
        if cached and not refresh and now - cached[1] < JWKS_TTL_SECONDS:
            return cached[0]
        if cached and refresh and now - cached[1] < JWKS_REFETCH_SECONDS:
            return cached[0]  # rate limit: an unknown kid can't make us hammer the issuer
        lock = self._locks.setdefault(row.name, asyncio.Lock())
        async with lock:
            cached = self._jwks.get(row.name)
            if cached and time.monotonic() - cached[1] < JWKS_REFETCH_SECONDS:
                return cached[0]
            try:
                assert row.jwks_url is not None
                self.fetches += 1
                resp = await self._http.get(row.jwks_url)
                resp.raise_for_status()
                keys = KeySet.import_key_set(resp.json())
            except (httpx.HTTPError, ValueError, JoseError, AssertionError):
                if cached:
                    return cached[0]
                raise Unavailable(f"The JWKS of issuer {row.name!r} can't be fetched.", code="jwks_unavailable") from None
            self._jwks[row.name] = (keys, time.monotonic())
            return keys

    async def verify(self, token: str, row: IssuerRow) -> VerifiedToken:
        try:
            decoded = jwt.decode(token, await self._keys(row), algorithms=row.algorithms)
        except JoseError as exc:
            if getattr(exc, "error", "") != "invalid_key_id" or row.jwks is not None:
                raise token_error(exc) from None
            try:
                decoded = jwt.decode(token, await self._keys(row, refresh=True), algorithms=row.algorithms)
            except JoseError as again:
                raise token_error(again) from None
        claims = dict(decoded.claims)
        if claims.get("iss") != row.issuer_url:
            raise Unauthenticated("The token's issuer does not match.", code="token_issuer_invalid")
        check_audience(claims, row.audiences)
        check_times(claims, row.leeway_seconds)
        return replace(map_claims(row, claims), source=(issuer_source(row),))


# Subjects only the gateway vouches for: the prefix of each Principal.kind ("admin_key:x",
# "client:x", "run:x", "workload:x") and its issuer name. A trusted issuer's mapping may
# not produce one, so a policy rule naming e.g. subject "client:meta" without an issuer
# can't be met by a workload (ownership keys carry the issuer anyway: Principal.owner).
RESERVED_SUBJECT_PREFIXES = ("admin_key:", "client:", "run:", "workload:", "credgate:", "credgate/")
MAX_SUBJECT_CHARS = 512


def check_subject(subject: str) -> None:
    """A mapped subject a principal may have: 401 ``token_subject_reserved`` if it spells a
    gateway principal (any case, leading blanks ignored), ``token_subject_invalid`` if too long."""
    folded = subject.lstrip().casefold()
    if folded == "credgate" or folded.startswith(RESERVED_SUBJECT_PREFIXES):
        raise Unauthenticated(
            "The token's subject spells a principal only the gateway issues (client:, admin_key:, run:, "
            "workload:, credgate); a trusted issuer's mapping may not produce it.",
            code="token_subject_reserved",
        )
    if len(subject) > MAX_SUBJECT_CHARS:
        raise Unauthenticated(f"The token's subject is over {MAX_SUBJECT_CHARS} characters.", code="token_subject_invalid")


def map_claims(row: IssuerRow, claims: dict[str, Any]) -> VerifiedToken:
    mapping = {"subject": "sub", **(row.claim_mapping or {})}
    mapped: dict[str, Any] = dict(claims)
    for name, source in mapping.items():
        value: Any = claims
        for part in str(source).split("."):
            value = value.get(part) if isinstance(value, dict) else None
        mapped[name] = value
    subject = mapped.get("subject")
    if not isinstance(subject, str) or not subject:
        raise Unauthenticated("The token has no usable subject claim.", code="token_claim_missing")
    check_subject(subject)
    groups = mapped.get("groups") or []
    groups = groups if isinstance(groups, list) else [groups]
    roles = {role for g in groups if isinstance(g, str) for role in (row.role_mapping or {}).get(g, [])}
    return VerifiedToken(row.name, subject, mapped, frozenset(roles))


def utc_from_ts(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, timezone.utc)
