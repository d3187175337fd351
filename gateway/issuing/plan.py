"""One issuance, decided once: the typed plan carried from the route to the connector.

A request for a credential is checked in one place, :meth:`Credentials.plan
<gateway.issuing.service.Credentials.plan>`, after the policy decision: the
connector exists, the resource is well-formed and inside the connector's
patterns, a wrap-only type is asked for wrapped, and the TTL is decided under
every cap. What comes out is an :class:`IssuePlan`; nothing downstream looks at
the raw request again. The lease row and the connector's
:class:`~connectors.base.IssueRequest` (the plugin boundary) are both derived
from it, so they can't disagree about the resource or the TTL.

The shapes, in order: ``CredentialRequest`` (web schema) -> :class:`IssueParams`
(what was asked; its digest is the Idempotency-Key's request hash) ->
:class:`IssuePlan` (what was decided) -> ``IssueRequest`` (what the connector
sees; the plugin boundary) -> ``Issued`` (what it made) -> :class:`Issuance`
(what is handed back, also what a wrap token or an Idempotency-Key replay
gives) -> ``CredentialOut`` (web schema).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta
from typing import Any

from connectors.base import IssueRequest
from gateway.issuing.leases import PENDING, TTLDecision
from gateway.store.models import ConnectorRow, LeaseRow


@dataclass(frozen=True)
class IssueParams:
    """A credential request as the caller asked it (before any decision)."""

    connector: str
    resource: str
    ttl_seconds: int | None = None
    wrap: bool = False
    wrap_ttl_seconds: int | None = None

    def digest(self) -> str:
        """The request hash an Idempotency-Key is bound to (stored on the lease: keep it stable)."""
        return hashlib.sha256(json.dumps(self.__dict__, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class IssuePlan:
    """Everything decided about one issuance before the target is touched.

    ``row`` is the connector's cached row (shared: read it, never change it) and
    ``connector_type`` its class; ``resource`` has passed the gateway's grammar
    and the connector's patterns; ``ttl`` is the capped TTL decision.
    """

    row: ConnectorRow
    connector_type: Any  # the ServiceConnector class of row.type
    resource: str
    ttl: TTLDecision
    wrap: bool
    wrap_ttl: timedelta | None  # None: the wrap token lives as long as the credential
    owner: str  # the principal's owner: leases and Idempotency-Keys are theirs
    run_id: str | None
    idempotency_key: str | None
    request_hash: str
    decided_by: str | None = None  # the policy rule that allowed it

    @property
    def connector(self) -> str:
        return self.row.name

    @property
    def type(self) -> str:
        return self.row.type

    @property
    def creates_at_target(self) -> bool:
        return bool(self.connector_type.creates_at_target)

    def lease(self, lease_id: str, now: datetime, revoke_state: dict[str, Any]) -> LeaseRow:
        """The ``pending`` lease row this plan records before anything is created."""
        cls = self.connector_type
        return LeaseRow(
            id=lease_id,
            connector=self.row.name,
            connector_type=self.row.type,
            resource=self.resource,
            principal=self.owner,
            run_id=self.run_id,
            state=PENDING,
            revocability=str(cls.revocability),
            renewable=cls.renewable,
            wrapped=self.wrap,
            issued_at=now,
            expires_at=now + self.ttl.ttl,
            max_expires_at=now + self.ttl.cap,  # renewals never take it past the caps applied now
            revoke_state=revoke_state,
            idempotency_key=self.idempotency_key,
            request_hash=self.request_hash,
            attempts=0,
            updated_at=now,
        )

    def request(self, lease: LeaseRow, timeout_seconds: float) -> IssueRequest:
        """What the connector is asked to create, for ``lease`` (recorded from this plan)."""
        return IssueRequest(
            lease.id, self.resource, self.ttl.ttl, lease.expires_at, lease.revoke_state, timeout_seconds,
            principal=lease.principal, run_id=lease.run_id,
        )


@dataclass(frozen=True)
class Issuance:
    """What an issuance hands back: the route's ``CredentialOut``, field for field.

    ``credential`` (or ``wrap_token``) is secret: it never shows in ``repr``.
    ``awaiting_delivery`` is not part of the response: the lease is undelivered until
    this response has been handed to the server whole (the route asks for that to be
    confirmed, see gateway/web/middleware.py ``DeliveryConfirmation``).
    """

    lease_id: str
    connector: str
    connector_type: str
    resource: str
    issued_at: datetime
    expires_at: datetime
    ttl_seconds: int
    ttl_capped: bool
    renewable: bool
    revocability: str
    requested_ttl_seconds: int | None = None  # only when the request was capped
    replayed: bool = False
    credential: dict[str, str] | None = field(default=None, repr=False)
    wrap_token: str | None = field(default=None, repr=False)
    wrap_expires_at: datetime | None = None
    awaiting_delivery: bool = False

    @classmethod
    def of(
        cls, lease: LeaseRow, decision: TTLDecision, secret_part: dict[str, Any], *, replayed: bool = False,
        awaiting_delivery: bool = False,
    ) -> Issuance:
        """The response for ``lease``, its TTL ``decision`` and its secret part (``credential``, or
        ``wrap_token`` and ``wrap_expires_at`` as sealed for a replay)."""
        wrap_expires = secret_part.get("wrap_expires_at")
        return cls(
            lease_id=lease.id,
            connector=lease.connector,
            connector_type=lease.connector_type,
            resource=lease.resource,
            issued_at=lease.issued_at,
            expires_at=lease.expires_at,
            ttl_seconds=int((lease.expires_at - lease.issued_at).total_seconds()),
            ttl_capped=decision.capped,
            renewable=lease.renewable,
            revocability=lease.revocability,
            requested_ttl_seconds=(
                int(decision.requested.total_seconds()) if decision.capped and decision.requested is not None else None
            ),
            replayed=replayed,
            credential=secret_part.get("credential"),
            wrap_token=secret_part.get("wrap_token"),
            wrap_expires_at=datetime.fromisoformat(wrap_expires) if isinstance(wrap_expires, str) else wrap_expires,
            awaiting_delivery=awaiting_delivery,
        )

    def as_dict(self) -> dict[str, Any]:
        """The response's fields (for ``CredentialOut(**...)``)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "awaiting_delivery"}

    def wire(self) -> dict[str, Any]:
        """JSON-able, unset fields left out: what a wrap token unwraps to."""
        return {
            k: (v.isoformat() if isinstance(v, datetime) else v)
            for k, v in self.as_dict().items()
            if v is not None and not (k == "replayed" and not v)
        }
