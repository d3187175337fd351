"""OAuth2 clients: services (the metadata server) that get gateway access tokens.

A client authenticates at the token endpoint with a generated secret
(``client_secret_basic`` or ``client_secret_post``; stored as SHA-256 and
compared in constant time) or with a JWT signed by a key it registered
(``private_key_jwt``: ``iss`` = ``sub`` = client id, ``aud`` = the token
endpoint, short ``exp``, and a ``jti`` that is refused if seen again).
"""

from __future__ import annotations

import hmac
import re
import secrets
from datetime import timedelta
from typing import Any

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from gateway import changes
from gateway.auth import hash_token
from gateway.errors import BadRequest, Conflict, NotFound, Unauthenticated
from gateway.identity import ASYMMETRIC, check_audience, check_times, peek
from gateway.store import Store
from gateway.store.models import ClientRow, UsedJtiRow, utcnow

CLIENT_ID = re.compile(r"^[a-z][a-z0-9_.-]{0,62}$")
SECRET_PREFIX = "cgs_"
MAX_ASSERTION_LIFETIME = 300


class InvalidClient(Unauthenticated):
    code = "invalid_client"


class Clients:
    def __init__(self, store: Store) -> None:
        self._store = store

    async def create(
        self, client_id: str, *, roles: list[str], token_ttl: timedelta, jwks: dict[str, Any] | None
    ) -> tuple[ClientRow, str | None]:
        if not CLIENT_ID.match(client_id):
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
        async with self._store.read() as s:
            row = await s.get(ClientRow, client_id)
        if row is None:
            raise NotFound(f"Client {client_id!r} does not exist.", code="client_not_found")
        return row

    async def list(self) -> list[ClientRow]:
        async with self._store.read() as s:
            return list((await s.execute(select(ClientRow).order_by(ClientRow.client_id))).scalars())

    async def revoke(self, client_id: str) -> ClientRow:
        async with self._store.write() as s:
            row = await s.get(ClientRow, client_id, with_for_update=True)
            if row is None:
                raise NotFound(f"Client {client_id!r} does not exist.", code="client_not_found")
            if row.revoked_at is None:
                row.revoked_at = utcnow()
                await changes.note(s, "client", client_id)
            return row

    async def _active(self, client_id: str) -> ClientRow:
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
        _, unverified = peek(assertion)
        client_id = unverified.get("sub")
        if not isinstance(client_id, str):
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
        try:
            check_audience(claims, [token_endpoint])
            check_times(claims, 30)
        except Unauthenticated as exc:
            raise InvalidClient(f"The client assertion is not acceptable ({exc.code}).") from None
        exp, jti = claims.get("exp"), claims.get("jti")
        if not isinstance(jti, str) or not jti or exp - claims.get("iat", exp) > MAX_ASSERTION_LIFETIME:
            raise InvalidClient("The client assertion needs a jti and a lifetime of at most 5 minutes.")
        now = utcnow()
        try:
            async with self._store.write() as s:
                await s.execute(delete(UsedJtiRow).where(UsedJtiRow.expires_at < now))
                s.add(UsedJtiRow(jti=f"{client_id}:{jti}"[:200], expires_at=now + timedelta(seconds=MAX_ASSERTION_LIFETIME + 60)))
        except IntegrityError:
            raise InvalidClient("This client assertion was already used.") from None
        return row
