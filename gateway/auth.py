"""Who is calling: admin API keys (bearer tokens) and the principal they become.

Tokens are 256-bit random strings shown once; the store keeps only their
SHA-256 (a fast hash is right for high-entropy tokens: there is nothing to
brute-force). Look-up is by hash, and the stored hash is compared again with
:func:`hmac.compare_digest`.

Roles are the coarse permission sets of admin keys until policies arrive:
``admin`` may do everything, ``operator`` may read and write secrets but not
reveal them or manage the gateway, ``auditor`` may read metadata only.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from sqlalchemy import select

from gateway.errors import Forbidden, NotFound, Unauthenticated, ValidationFailed
from gateway.store import Store
from gateway.store.models import AdminKeyRow, utcnow

Role = Literal["admin", "operator", "auditor"]
TOKEN_PREFIX = "cgt_"

ROLE_PERMISSIONS: dict[str, frozenset[str]] = {
    "admin": frozenset({"*"}),
    "operator": frozenset(
        {"secrets:read", "secrets:write", "backends:read", "connectors:read", "credentials:issue",
         "credentials:wrap", "leases:read"}
    ),
    "auditor": frozenset({"secrets:read", "backends:read", "keys:read", "connectors:read", "leases:read"}),
}


@dataclass(frozen=True)
class Principal:
    kind: str  # "admin_key"
    id: str
    name: str
    role: str

    @property
    def subject(self) -> str:
        return f"{self.kind}:{self.name}"

    def can(self, action: str) -> bool:
        perms = ROLE_PERMISSIONS.get(self.role, frozenset())
        return "*" in perms or action in perms

    def require(self, action: str) -> None:
        if not self.can(action):
            raise Forbidden(f"{self.subject} (role {self.role}) may not {action}.", code="permission_denied")


@dataclass(frozen=True)
class AdminKeyInfo:
    id: str
    name: str
    role: str
    created_at: datetime
    created_by: str | None
    revoked_at: datetime | None


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def _info(row: AdminKeyRow) -> AdminKeyInfo:
    return AdminKeyInfo(row.id, row.name, row.role, row.created_at, row.created_by, row.revoked_at)


class AdminKeys:
    def __init__(self, store: Store) -> None:
        self._store = store

    async def create(
        self, name: str, role: str, *, created_by: str | None, token: str | None = None
    ) -> tuple[AdminKeyInfo, str]:
        if role not in ROLE_PERMISSIONS:
            raise ValidationFailed(f"Unknown role {role!r}.", code="unknown_role")
        token = token or new_token()
        row = AdminKeyRow(
            id="ak_" + secrets.token_hex(8),
            name=name,
            role=role,
            token_hash=hash_token(token),
            created_at=utcnow(),
            created_by=created_by,
        )
        async with self._store.write() as s:
            s.add(row)
        return _info(row), token

    async def bootstrap(self, token: str | None) -> str | None:
        """Create the first admin key if there is none; return its token, or None if keys exist."""
        async with self._store.read() as s:
            exists = (await s.execute(select(AdminKeyRow.id).limit(1))).first()
        if exists:
            return None
        _, token = await self.create("bootstrap", "admin", created_by="credgate bootstrap", token=token)
        return token

    async def list(self) -> list[AdminKeyInfo]:
        async with self._store.read() as s:
            rows = (await s.execute(select(AdminKeyRow).order_by(AdminKeyRow.created_at))).scalars()
            return [_info(r) for r in rows]

    async def revoke(self, key_id: str) -> AdminKeyInfo:
        async with self._store.write() as s:
            row = await s.get(AdminKeyRow, key_id, with_for_update=True)
            if row is None:
                raise NotFound(f"Admin key {key_id!r} does not exist.", code="admin_key_not_found")
            if row.revoked_at is None:
                row.revoked_at = utcnow()
            return _info(row)

    async def authenticate(self, token: str) -> Principal:
        digest = hash_token(token)
        async with self._store.read() as s:
            row = (await s.execute(select(AdminKeyRow).where(AdminKeyRow.token_hash == digest))).scalar_one_or_none()
        if row is None or not hmac.compare_digest(row.token_hash, digest) or row.revoked_at is not None:
            raise Unauthenticated("The bearer token is not valid.", code="invalid_token")
        return Principal("admin_key", row.id, row.name, row.role)


def bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise Unauthenticated("This endpoint needs 'Authorization: Bearer <token>'.", code="missing_token")
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated("The Authorization header must be 'Bearer <token>'.", code="missing_token")
    if len(token) > 4096:
        raise Unauthenticated("The bearer token is not valid.", code="invalid_token")
    return token
