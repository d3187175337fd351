"""Who is calling, and what they may do.

Bearer tokens come in four shapes, told apart before any is trusted:

- ``cgt_...``: an admin API key (256 random bits shown once; only its SHA-256
  is stored, looked up by hash and compared with :func:`hmac.compare_digest`);
- a JWT whose ``iss`` is this gateway: an access token it issued (to an OAuth2
  client, or in exchange for a workload's token) or a run token;
- a JWT from a trusted issuer (see :mod:`gateway.identity.issuers`);
- anything else: 401.

Each becomes a :class:`Principal`; :meth:`Principal.require` asks the
compiled policy set (deny by default, :mod:`gateway.policy.rules`) and raises 403
naming the reason. Run tokens are decided by their delegated scope *and* by
the delegator's policy as it stands now, so a run never holds more than the
server that delegated it.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict
from sqlalchemy import select

from gateway.audit import trail as audit
from gateway.errors import Forbidden, Unauthenticated, ValidationFailed
from gateway.policy.rules import Decision, PolicySet, Subject, glob_regex
from gateway.store import Store
from gateway.store.models import AdminKeyRow, utcnow
from gateway.store.rows import revoke_row

Role = Literal["admin", "operator", "auditor"]
TOKEN_PREFIX = "cgt_"
ROLES = ("admin", "operator", "auditor")
GATEWAY = "credgate"  # the issuer name of principals the gateway itself vouches for


@dataclass(frozen=True)
class RunScope:
    run_id: str
    connectors: tuple[str, ...]
    resources: tuple[str, ...]
    max_ttl: timedelta | None
    delegator: Subject


@dataclass(frozen=True)
class Principal:
    kind: str  # admin_key | client | workload | run
    id: str
    name: str
    issuer: str = GATEWAY
    roles: frozenset[str] = frozenset()
    claims: Mapping[str, Any] = field(default_factory=dict)
    scope: RunScope | None = None
    policy: PolicySet = field(default_factory=PolicySet, compare=False, repr=False)
    # What this principal's authority derives from, each of which must still be live at
    # every request (gateway/identity/revocation.py): e.g. ("client:meta", "jti:..."). A client or
    # an admin key is its own source when none is given.
    source: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.source and self.issuer == GATEWAY and self.kind in ("client", "admin_key"):
            object.__setattr__(self, "source", (f"{self.kind}:{self.name if self.kind == 'client' else self.id}",))

    @property
    def subject(self) -> str:
        return f"{self.kind}:{self.name}" if self.issuer == GATEWAY else self.name

    @property
    def owner(self) -> str:
        """The one ownership key (``ISSUER/SUBJECT``, e.g. ``credgate/client:meta``,
        ``k8s/system:serviceaccount:ml:trainer``): what leases, runs and Idempotency-Keys
        belong to. Issuer names never contain '/', so the key can't be spelled by another issuer."""
        return f"{self.issuer}/{self.subject}"

    @property
    def run_id(self) -> str | None:
        return self.scope.run_id if self.scope else None

    @property
    def as_subject(self) -> Subject:
        return Subject(self.issuer, self.subject, self.roles, self.claims)

    def decide(self, action: str, connector: str | None = None, resource: str | None = None) -> Decision:
        if self.scope is None:
            return self.policy.decide(self.as_subject, action, connector, resource)
        scope = self.scope
        if action not in ("credentials:issue", "credentials:wrap"):
            return Decision(False, None, f"a run token may not {action}")
        if connector is not None and not any(glob_regex(c).match(connector) for c in scope.connectors):
            return Decision(False, None, f"connector {connector!r} is outside run {scope.run_id}'s scope")
        if resource is not None and not any(glob_regex(r).match(resource) for r in scope.resources):
            return Decision(False, None, f"resource {resource!r} is outside run {scope.run_id}'s scope")
        # Never more than the delegator holds now.
        upstream = self.policy.decide(scope.delegator, action, connector, resource)
        if not upstream.allowed:
            return Decision(False, None, f"the delegator of run {scope.run_id} may no longer: {upstream.reason}")
        ttls = [t for t in (scope.max_ttl, upstream.max_ttl) if t is not None]
        return Decision(True, f"run/{scope.run_id}", f"delegated by {scope.delegator.subject} ({upstream.rule})",
                        min(ttls) if ttls else None)

    def can(self, action: str, connector: str | None = None, resource: str | None = None) -> bool:
        return self.decide(action, connector, resource).allowed

    def require(self, action: str, connector: str | None = None, resource: str | None = None) -> Decision:
        decision = self.decide(action, connector, resource)
        # The most specific decision of a request is the one its audit event records.
        audit.note(action=action, decision="allow" if decision.allowed else "deny", rule=decision.rule)
        if not decision.allowed:
            raise Forbidden(f"{self.subject} may not {action}: {decision.reason}.", code="permission_denied")
        return decision


class AdminKeyInfo(BaseModel):
    """An admin key as the service returns it and the API shows it (``AdminKeyOut``):
    never its token, nor the token's hash."""

    model_config = ConfigDict(frozen=True, from_attributes=True)
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
    return AdminKeyInfo.model_validate(row)


class AdminKeys:
    def __init__(self, store: Store) -> None:
        self.store = self._store = store

    async def create(
        self, name: str, role: str, *, created_by: str | None, token: str | None = None
    ) -> tuple[AdminKeyInfo, str]:
        if role not in ROLES:
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
        row = await revoke_row(self._store, AdminKeyRow, key_id, topic="admin_key", what="Admin key",
                               code="admin_key_not_found")
        return _info(row)

    async def authenticate(self, token: str) -> Principal:
        digest = hash_token(token)
        async with self._store.read() as s:
            row = (await s.execute(select(AdminKeyRow).where(AdminKeyRow.token_hash == digest))).scalar_one_or_none()
        if row is None or not hmac.compare_digest(row.token_hash, digest) or row.revoked_at is not None:
            raise Unauthenticated("The bearer token is not valid.", code="invalid_token")
        return Principal("admin_key", row.id, row.name, roles=frozenset({row.role}))


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
