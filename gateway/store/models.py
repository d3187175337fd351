"""Tables of the store. Credential-bearing data lives only in sealed columns
(:class:`SealedMixin`); everything else here is metadata."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.sql.expression import ColumnElement

from gateway.store.sealed import Sealed


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every database (SQLite keeps naive text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None:
            if value.tzinfo is None:
                raise ValueError("naive datetime")
            value = value.astimezone(timezone.utc)
            if dialect.name == "sqlite":
                value = value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value


PATH_TYPE = String(512).with_variant(String(512, collation="C"), "postgresql")


class Base(DeclarativeBase):
    pass


class SealedMixin:
    """Three columns that hold one envelope-encrypted record."""

    kek_version: Mapped[int | None] = mapped_column(Integer, index=True)
    wrapped_dek: Mapped[bytes | None] = mapped_column(LargeBinary)
    ciphertext: Mapped[bytes | None] = mapped_column(LargeBinary)

    @property
    def sealed(self) -> Sealed | None:
        if self.kek_version is None or self.wrapped_dek is None or self.ciphertext is None:
            return None
        return Sealed(self.kek_version, self.wrapped_dek, self.ciphertext)

    @sealed.setter
    def sealed(self, value: Sealed | None) -> None:
        self.kek_version = value.kek_version if value else None
        self.wrapped_dek = value.wrapped_dek if value else None
        self.ciphertext = value.ciphertext if value else None


class KekVersion(Base):
    """Which KEK versions the store has seen: ``active`` (current), ``retiring`` or ``retired``."""

    __tablename__ = "kek_versions"
    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    fingerprint: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    retired_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # A KMS-held KEK (gateway/crypto/kmsring.py): the version's 32 bytes as the KMS wrapped
    # them, and which version of the KMS key did. None for a KEK file or CREDGATE_KEK.
    wrapped_key: Mapped[bytes | None] = mapped_column(LargeBinary)
    kms_key_version: Mapped[str | None] = mapped_column(String(200))


class BackendRow(SealedMixin, Base):
    """A registered backend; its config is sealed, a redacted copy is kept for display."""

    __tablename__ = "backends"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    type: Mapped[str] = mapped_column(String(32))
    config_public: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    builtin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class SecretRow(Base):
    """A secret of the ``local`` backend type: metadata only, values live in versions."""

    __tablename__ = "secrets"
    __table_args__ = (UniqueConstraint("backend", "path", name="uq_secrets_backend_path"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    backend: Mapped[str] = mapped_column(ForeignKey("backends.name"), index=True)
    # Byte order on every database, so listing pages the same way everywhere.
    path: Mapped[str] = mapped_column(PATH_TYPE)
    current_version: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    deleted_by: Mapped[str | None] = mapped_column(String(200))
    versions: Mapped[list[SecretVersionRow]] = relationship(
        back_populates="secret", cascade="all, delete-orphan", order_by="SecretVersionRow.version"
    )


class SecretVersionRow(SealedMixin, Base):
    __tablename__ = "secret_versions"
    __table_args__ = (UniqueConstraint("secret_id", "version", name="uq_secret_versions"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    secret_id: Mapped[int] = mapped_column(ForeignKey("secrets.id", ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    keys: Mapped[list[str]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(200))
    secret: Mapped[SecretRow] = relationship(back_populates="versions")


class AdminKeyRow(Base):
    """An admin API key. Only the SHA-256 of the token is stored."""

    __tablename__ = "admin_keys"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    role: Mapped[str] = mapped_column(String(32))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(200))
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class ConnectorRow(Base):
    """A configured connector: its type, the secret it draws on, what it may reach.

    Holds no secret: the material stays in the backend and is read when needed.
    """

    __tablename__ = "connectors"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    type: Mapped[str] = mapped_column(String(32))
    auth_method: Mapped[str] = mapped_column(String(32))
    # None for a keyless auth method (web-identity): the connector draws on no secret at all.
    secret_backend: Mapped[str | None] = mapped_column(ForeignKey("backends.name"), index=True, nullable=True)
    secret_path: Mapped[str | None] = mapped_column(String(512), nullable=True)
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    resources: Mapped[list[str]] = mapped_column(JSON, default=list)
    default_ttl_seconds: Mapped[int] = mapped_column(Integer)
    max_ttl_seconds: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class LeaseRow(SealedMixin, Base):
    """One issued credential: ``pending -> active -> revoking -> revoked``, or ``expired``.

    ``revoke_state`` (what revoke needs: role names, never passwords) is
    committed while the lease is still ``pending``, before the target is
    touched. The sealed columns hold the response of an issuance made with an
    Idempotency-Key (so a retry gets the same credential), and are cleared when
    the lease ends.
    """

    __tablename__ = "leases"
    __table_args__ = (
        UniqueConstraint("principal", "idempotency_key", name="uq_leases_idempotency"),
        Index("ix_leases_state_expires", "state", "expires_at"),
        Index("ix_leases_state_next_attempt", "state", "next_attempt_at"),
        # Keyset pages of GET /v1/leases (ORDER BY id) under each equality filter.
        Index("ix_leases_connector_id", "connector", "id"),
        Index("ix_leases_principal_id", "principal", "id"),
        Index("ix_leases_state_id", "state", "id"),
        Index("ix_leases_run_id_id", "run_id", "id"),  # GET /v1/leases?run= (migration 0016)
        # Leases issued per hour (GET /v1/leases/issuance): one index range over issued_at.
        Index("ix_leases_issued_at", "issued_at"),
        # The reaper's search for undelivered leases: only rows with the marker are indexed.
        Index("ix_leases_delivery_due", "delivery_due_at", postgresql_where=text("delivery_due_at IS NOT NULL"),
              sqlite_where=text("delivery_due_at IS NOT NULL")),
    )
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    connector: Mapped[str] = mapped_column(String(64))
    connector_type: Mapped[str] = mapped_column(String(32))
    resource: Mapped[str] = mapped_column(String(256))
    principal: Mapped[str] = mapped_column(String(600))  # the owner: Principal.owner, ISSUER/SUBJECT
    run_id: Mapped[str | None] = mapped_column(String(128))
    state: Mapped[str] = mapped_column(String(16))
    revocability: Mapped[str] = mapped_column(String(16))
    renewable: Mapped[bool] = mapped_column(Boolean)
    wrapped: Mapped[bool] = mapped_column(Boolean, default=False)
    issued_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    max_expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    revoke_state: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    idempotency_key: Mapped[str | None] = mapped_column(String(128))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(String(300))
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Who is revoking the lease at the target right now, and until when the claim holds
    # (``Leases.claim``): one revocation of a lease at a time. NULL when nobody is.
    revoke_owner: Mapped[str | None] = mapped_column(String(80))
    revoke_claim_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Activated, but the response carrying its credential (or wrap token) not yet confirmed
    # handed to the server whole (gateway/web/middleware.py, DeliveryConfirmation): the reaper
    # revokes an active lease once this passes. NULL once delivered, once the lease left
    # ``active``, for types the gateway can't revoke, and for leases a release before
    # migration 0012 activated (never treated as undelivered).
    delivery_due_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class WrapRow(SealedMixin, Base):
    """A single-use wrap token (stored as its SHA-256) and its sealed payload,
    destroyed on unwrap, on expiry and when its lease is revoked."""

    __tablename__ = "wrap_tokens"
    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    lease_id: Mapped[str] = mapped_column(String(40), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    consumed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    ended: Mapped[str | None] = mapped_column(String(16))  # used | expired | revoked


class PolicyRow(Base):
    """A named policy document (validated rules); compiled into the decision set on change."""

    __tablename__ = "policies"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    document: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class IssuerRow(Base):
    """A trusted token issuer: whose JWTs become principals, and how their claims map."""

    __tablename__ = "issuers"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    issuer_url: Mapped[str] = mapped_column(String(512), unique=True)
    jwks_url: Mapped[str | None] = mapped_column(String(1024))
    jwks: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    audiences: Mapped[list[str]] = mapped_column(JSON)
    algorithms: Mapped[list[str]] = mapped_column(JSON)
    leeway_seconds: Mapped[int] = mapped_column(Integer)
    claim_mapping: Mapped[dict[str, Any]] = mapped_column(JSON)
    role_mapping: Mapped[dict[str, list[str]]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ClientRow(Base):
    """An OAuth2 client (a service such as the metadata server). Secrets are stored as SHA-256."""

    __tablename__ = "clients"
    client_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    secret_hash: Mapped[str | None] = mapped_column(String(64))
    jwks: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # public keys for private_key_jwt
    roles: Mapped[list[str]] = mapped_column(JSON, default=list)
    token_ttl_seconds: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class SigningKeyRow(SealedMixin, Base):
    """A gateway signing key; the private JWK is sealed. ``state``: active, previous (still
    published for the overlap window, no longer used to sign) or retired."""

    __tablename__ = "signing_keys"
    kid: Mapped[str] = mapped_column(String(64), primary_key=True)
    alg: Mapped[str] = mapped_column(String(16))
    public_jwk: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    publish_until: Mapped[datetime | None] = mapped_column(UTCDateTime)


class RunRow(Base):
    """A pipeline run that was delegated credentials; revoking it ends its token and leases."""

    __tablename__ = "runs"
    __table_args__ = (
        # Keyset pages of GET /v1/runs, newest first (ORDER BY created_at DESC, run_id DESC), for
        # every run and for one delegator's (migration 0016).
        Index("ix_runs_created_at_run_id", "created_at", "run_id"),
        Index("ix_runs_created_by_created_at_run_id", "created_by", "created_at", "run_id"),
    )
    run_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    created_by: Mapped[str] = mapped_column(String(600))  # the owner: Principal.owner, ISSUER/SUBJECT
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class UsedJtiRow(Base):
    """Client assertions seen (private_key_jwt): a replayed ``jti`` is refused until it expires."""

    __tablename__ = "used_jtis"
    jti: Mapped[str] = mapped_column(String(200), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class RevokedTokenRow(Base):
    """A gateway token revoked on its own (RFC 7009, ``credgate logout``): refused, and so is
    every token derived from it, until it would have expired anyway (then the row is purged)."""

    __tablename__ = "revoked_tokens"
    jti: Mapped[str] = mapped_column(String(64), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    revoked_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_by: Mapped[str | None] = mapped_column(String(200))


class AuditConnector(ColumnElement[str]):
    """``details.connector`` of an audit event, as SQL: the expression the connector index
    (migration 0013) is built on, rendered the same way in the index and in a query, so the
    planner matches them. Derived from the chained ``details``: nothing outside the chain to tamper with."""

    inherit_cache = True
    type = String()


@compiles(AuditConnector, "postgresql")
def _connector_pg(element: AuditConnector, compiler: Any, **kw: Any) -> str:
    return "(details ->> 'connector')"


@compiles(AuditConnector)
def _connector_sqlite(element: AuditConnector, compiler: Any, **kw: Any) -> str:
    return "json_extract(details, '$.connector')"


# Other keys of an audit event's ``details`` that GET /v1/audit filters on (migration 0016),
# each an expression rendered as the connector's is: the same text in the index and the query.
AUDIT_DETAIL_SQL = {
    "postgresql": "(details ->> '{key}')",
    "sqlite": "json_extract(details, '$.{key}')",
}


def _audit_detail(key: str, doc: str) -> type[ColumnElement[str]]:
    cls = type(f"AuditDetail_{key}", (ColumnElement,), {"inherit_cache": True, "type": String(), "__doc__": doc})

    @compiles(cls, "postgresql")
    def _pg(element: Any, compiler: Any, **kw: Any) -> str:
        return AUDIT_DETAIL_SQL["postgresql"].format(key=key)

    @compiles(cls)
    def _sqlite(element: Any, compiler: Any, **kw: Any) -> str:
        return AUDIT_DETAIL_SQL["sqlite"].format(key=key)

    return cls


AuditRunId = _audit_detail("run_id", "``details.run_id``: the run a request issued for, minted a token for or revoked.")
# The keyed hashes (gateway/audit/trail.py, ``AuditLog.hmac``) of sensitive values an event names.
AuditWrapToken = _audit_detail("wrap_token", "``details.wrap_token``: the keyed hash of the wrap token unwrapped.")
AuditClientSecret = _audit_detail("client_secret", "``details.client_secret``: the keyed hash of a client secret presented.")
HMAC_DETAILS = {"wrap_token": AuditWrapToken, "client_secret": AuditClientSecret}


class AuditEventRow(Base):
    """One audit event, hash-chained to the one before (see gateway/audit/trail.py)."""

    __tablename__ = "audit_events"
    __table_args__ = (
        # Keyset pages of GET /v1/audit (ORDER BY seq) under each equality filter (migration 0013).
        Index("ix_audit_events_subject_seq", "subject", "seq"),
        Index("ix_audit_events_action_seq", "action", "seq"),
        Index("ix_audit_events_lease_id_seq", "lease_id", "seq"),
        Index("ix_audit_events_decision_seq", "decision", "seq"),
        Index("ix_audit_events_connector_seq", AuditConnector(), "seq"),
        # GET /v1/audit?run= and ?hmac= (migration 0016). Whole, not partial (WHERE key IS NOT
        # NULL): PostgreSQL keeps statistics for them, so it plans the rare match through the
        # index rather than walking the trail in seq order.
        Index("ix_audit_events_run_id_seq", AuditRunId(), "seq"),
        Index("ix_audit_events_wrap_token_seq", AuditWrapToken(), "seq"),
        Index("ix_audit_events_client_secret_seq", AuditClientSecret(), "seq"),
    )
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    time: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    request_id: Mapped[str | None] = mapped_column(String(80))
    issuer: Mapped[str | None] = mapped_column(String(256))
    subject: Mapped[str | None] = mapped_column(String(256))
    action: Mapped[str | None] = mapped_column(String(64))
    target: Mapped[str | None] = mapped_column(String(700))
    decision: Mapped[str | None] = mapped_column(String(16))
    rule: Mapped[str | None] = mapped_column(String(200))
    outcome: Mapped[str | None] = mapped_column(String(100))
    lease_id: Mapped[str | None] = mapped_column(String(40))
    client_addr: Mapped[str | None] = mapped_column(String(100))
    details: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class AuditCheckpointRow(Base):
    """A statement of the chain's head at some sequence number, MAC'd under the chain key
    (``mac`` covers seq, hash, time and chain_from). ``signature``: the signing-key JWT of
    checkpoints written before migration 0008 (kept; no longer needed to verify)."""

    __tablename__ = "audit_checkpoints"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    hash: Mapped[str] = mapped_column(String(64))
    time: Mapped[datetime] = mapped_column(UTCDateTime)
    signature: Mapped[str | None] = mapped_column(String(4000))
    mac: Mapped[str | None] = mapped_column(String(64))
    chain_from: Mapped[int | None] = mapped_column(Integer)
    # Set by a verification that walked the whole chain up to this checkpoint and found it
    # clean: ``v1:<floor>:<events>:<MAC>`` (gateway/audit/trail.py, verified_mac). An
    # incremental verification starts after the newest checkpoint whose mark verifies.
    verified: Mapped[str | None] = mapped_column(String(200))


class AuditKeyRow(SealedMixin, Base):
    """The per-deployment HMAC key for sensitive identifiers in the audit log (sealed); the
    chain key is derived from it. ``chain_from``: the first event of the keyed chain."""

    __tablename__ = "audit_keys"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    chain_from: Mapped[int | None] = mapped_column(Integer)


class ReaperLeadershipRow(Base):
    """The reaper's leadership lease (one row, id 1; see gateway/issuing/reaper.py): who leads,
    the fencing ``epoch`` (incremented on every takeover; each reaper write is conditional on
    it), and ``renewed_until`` (the database's clock): past it another replica may take over.
    ``locked``: the holder also holds the advisory lock, so a free lock means its session died."""

    __tablename__ = "reaper_leadership"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    holder: Mapped[str | None] = mapped_column(String(120))
    epoch: Mapped[int] = mapped_column(Integer, default=0)
    renewed_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    locked: Mapped[bool] = mapped_column(Boolean, default=False)
    taken_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class ChangeLogRow(Base):
    """The change feed between the worker processes of one ``credgate serve`` on SQLite (see
    gateway/store/changes.py): one row per change noted, written in the changing transaction,
    read by the other workers' pollers, pruned after a minute. Unused on PostgreSQL (NOTIFY)."""

    __tablename__ = "change_log"
    __table_args__ = {"sqlite_autoincrement": True}  # ids never reused: a poller reads id > last
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    topic: Mapped[str] = mapped_column(String(32))
    key: Mapped[str | None] = mapped_column(String(512))
    writer: Mapped[str] = mapped_column(String(40))
    at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
