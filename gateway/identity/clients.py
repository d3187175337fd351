"""OAuth2 clients: services (the metadata server) that get gateway access tokens.

A client authenticates at the token endpoint with a generated secret
(``client_secret_basic`` or ``client_secret_post``; stored as SHA-256 and
compared in constant time) or with a JWT signed by a key it registered
(``private_key_jwt``: ``iss`` = ``sub`` = client id, ``aud`` = the token
endpoint, ``iat`` and ``exp`` at most ``MAX_ASSERTION_LIFETIME`` apart, and a
``jti`` that is refused if seen again before the assertion expires: it is
remembered until its ``exp`` plus the leeway, as long as the assertion could
be accepted at all).

A client id is checked for shape (:func:`valid_client_id`) before it is used
for anything: looked up, logged or audited.
"""

from __future__ import annotations

import hmac
import secrets
from datetime import timedelta
from typing import Any

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from gateway.identity.principal import hash_token
from gateway.paths import CLIENT_ID
from gateway.errors import BadRequest, Conflict, Unauthenticated
from gateway.identity.issuers import utc_from_ts
from gateway.identity.jose import ASYMMETRIC, check_audience, check_times, peek
from gateway.store import Store
from gateway.identity.replay import use_once
from gateway.store.models import ClientRow, utcnow
from gateway.store.rows import read_or_404, revoke_row

SECRET_PREFIX = "cgs_"
MAX_ASSERTION_LIFETIME = 300
ASSERTION_LEEWAY = 30
MAX_JTI = 128

Client = ClientRow  # what this service returns: an OAuth2 client as stored


def valid_client_id(value: object) -> bool:
    return isinstance(value, str) and CLIENT_ID.fullmatch(value) is not None


class InvalidClient(Unauthenticated):
    code = "invalid_client"


class Clients:
    def __init__(self, store: Store) -> None:
        self._store = store

    async def create(
        self, client_id: str, *, roles: list[str], token_ttl: timedelta, jwks: dict[str, Any] | None
    ) -> tuple[ClientRow, str | None]:
        if not valid_client_id(client_id):
            raise BadRequest("A client id is 1-63 characters of a-z, 0-9, '_', '.' and '-'.", code="invalid_client_id")
        if jwks is not None:
            try:
                keys = KeySet.import_key_set(jwks)
            except (JoseError, ValueError, TypeError, KeyError):
                raise BadRequest("The client's jwks is not a valid JWK set.", code="invalid_jwks") from None
            if any(k.is_private for k in keys.keys):
                raise BadRequest("Register public keys only; the private key stays with the client.", code="invalid_jwks")
        secret = None if jwks is not None else SECRET_PREFIX + secrets.token_urlsafe(32)
        row = ClientRow(
            client_id=client_id,
            secret_hash=hash_token(secret) if secret else None,
            jwks=jwks,
            roles=roles,
            token_ttl_seconds=int(token_ttl.total_seconds()),
            created_at=utcnow(),
        )
        try:
            async with self._store.write() as s:
                s.add(row)
        except IntegrityError:
            raise Conflict(f"Client {client_id!r} exists.", code="client_exists") from None
        return row, secret

    async def get(self, client_id: str) -> ClientRow:
        return await read_or_404(self._store, ClientRow, client_id, "Client", "client_not_found")

    async def list(self) -> list[ClientRow]:
        async with self._store.read() as s:
            return list((await s.execute(select(ClientRow).order_by(ClientRow.client_id))).scalars())

    async def revoke(self, client_id: str) -> ClientRow:
        row = await revoke_row(self._store, ClientRow, client_id, topic="client", what="Client", code="client_not_found")
        assert row is not None
        return row

    async def _active(self, client_id: str) -> ClientRow:
        if not valid_client_id(client_id):
            raise InvalidClient("Client authentication failed.")
        async with self._store.read() as s:
            row = await s.get(ClientRow, client_id)
        if row is None or row.revoked_at is not None:
            raise InvalidClient("Client authentication failed.")
        return row

    async def with_secret(self, client_id: str, secret: str) -> ClientRow:
        row = await self._active(client_id)
        if row.secret_hash is None or not hmac.compare_digest(row.secret_hash, hash_token(secret)):
            raise InvalidClient("Client authentication failed.")
        return row

    async def with_assertion(self, assertion: str, token_endpoint: str) -> ClientRow:
        try:
            _, unverified = peek(assertion)
        except Unauthenticated:
            raise InvalidClient("The client assertion is not a JWT.") from None
        client_id = unverified.get("sub")
        if not valid_client_id(client_id):
            raise InvalidClient("Client authentication failed.")
        row = await self._active(client_id)
        if not row.jwks:
            raise InvalidClient("This client has no registered keys.")
        try:
            claims = jwt.decode(assertion, KeySet.import_key_set(row.jwks), algorithms=ASYMMETRIC).claims
        except JoseError:
            raise InvalidClient("Client authentication failed.") from None
        if claims.get("iss") != client_id or claims.get("sub") != client_id:
            raise InvalidClient("Client authentication failed.")
        exp, iat, jti = claims.get("exp"), claims.get("iat"), claims.get("jti")
        if not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in (exp, iat)):
            raise InvalidClient("The client assertion needs numeric exp and iat claims.")
        if not isinstance(jti, str) or not 1 <= len(jti) <= MAX_JTI:
            raise InvalidClient(f"The client assertion needs a jti of 1 to {MAX_JTI} characters.")
        if not 0 < exp - iat <= MAX_ASSERTION_LIFETIME:
            raise InvalidClient(f"The client assertion may live at most {MAX_ASSERTION_LIFETIME} seconds (exp - iat).")
        try:
            check_audience(claims, [token_endpoint])
            check_times(claims, ASSERTION_LEEWAY)
        except Unauthenticated as exc:
            raise InvalidClient(f"The client assertion is not acceptable ({exc.code}).") from None
        # Remembered as long as the assertion could be accepted: until exp plus the leeway.
        if not await use_once(self._store, f"{client_id}:{jti}", utc_from_ts(exp + ASSERTION_LEEWAY + 1)):
            raise InvalidClient("This client assertion was already used.")
        return row
