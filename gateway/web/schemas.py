"""Request and response bodies. Input and output models are separate: an output
model can't leak a field it does not declare."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr, StringConstraints

from gateway.identity.principal import AdminKeyInfo

KeyName = Annotated[StrictStr, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$")]
Value = Annotated[StrictStr, StringConstraints(max_length=65536)]


class Input(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- secrets ---------------------------------------------------------------


class SecretPut(Input):
    data: dict[KeyName, Value] = Field(
        ..., min_length=1, max_length=256, description="Keys (A-Z a-z 0-9 . _ -, at most 128 characters) to string values."
    )
    cas: int | None = Field(None, ge=0, description="Write only if the current version equals this (0: must not exist).")


class VersionOut(BaseModel):
    version: int
    keys: list[str]
    created_at: datetime
    created_by: str | None


class SecretOut(BaseModel):
    backend: str
    path: str
    version: int = Field(description="The version this response describes.")
    current_version: int
    keys: list[str]
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None
    versions: list[VersionOut]
    data: dict[str, str] | None = Field(None, description="Only with ?reveal=true and permission secrets:reveal.")


class SecretList(BaseModel):
    backend: str
    prefix: str
    items: list[str]
    next_page_token: str | None


# --- backends --------------------------------------------------------------


class BackendPut(Input):
    type: Annotated[str, StringConstraints(min_length=1, max_length=32)]
    config: dict[str, Any] = Field(default_factory=dict)


class HealthReport(BaseModel):
    ok: bool
    message: str
    problem: str | None = Field(
        None, description="unreachable | auth_refused | permission_missing | expiring | misconfigured (when not ok)."
    )
    details: dict[str, str] = Field(default_factory=dict)
    checked_at: datetime | None = Field(None, description="When the check ran (absent for a status).")


class BackendHealth(BaseModel):
    status: HealthReport | None = Field(
        None, description="The live backend's own view, without I/O (absent: not started on this replica)."
    )
    last_check: HealthReport | None = Field(
        None, description="The last `POST /v1/backends/NAME/check` on this replica, if any."
    )


class BackendOut(BaseModel):
    name: str
    type: str
    config: dict[str, Any] = Field(description="Non-secret settings; secret fields are masked.")
    builtin: bool
    created_at: datetime
    updated_at: datetime
    capabilities: dict[str, Any] | None = Field(None, description="What the type can do (absent: type not installed).")
    health: BackendHealth | None = None


class BackendList(BaseModel):
    items: list[BackendOut]


class HealthOut(BaseModel):
    backend: str
    ok: bool
    message: str
    details: dict[str, str]
    problem: str | None = None
    checked_at: datetime | None = None


# --- keys ------------------------------------------------------------------


class KekVersionOut(BaseModel):
    version: int
    state: Literal["current", "in_use", "retired"]
    fingerprint: str
    references: int
    created_at: datetime
    retired_at: datetime | None


class KeyStatusOut(BaseModel):
    source: str
    current_version: int
    rewrap_pending: int
    rotating: bool
    versions: list[KekVersionOut]


# --- admin keys ------------------------------------------------------------


class AdminKeyCreate(Input):
    name: Annotated[str, StringConstraints(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9._@-]+$")]
    role: Literal["admin", "operator", "auditor"] = "admin"


AdminKeyOut = AdminKeyInfo  # one shape: what the service returns is what the API shows


class AdminKeyCreated(AdminKeyOut):
    token: str = Field(description="Shown once; the gateway keeps only its hash.")


class AdminKeyList(BaseModel):
    items: list[AdminKeyOut]


# --- connectors ------------------------------------------------------------

ResourcePattern = Annotated[str, StringConstraints(min_length=1, max_length=256)]


class ConnectorPut(Input):
    type: Annotated[str, StringConstraints(min_length=1, max_length=32)]
    auth_method: Annotated[str, StringConstraints(min_length=1, max_length=32)]
    secret: Annotated[str, StringConstraints(min_length=3, max_length=600)] | None = Field(
        None,
        description="The backend secret holding the material, as BACKEND/PATH; none for a keyless auth method "
        "(web-identity), which draws on no secret at all.",
    )
    config: dict[str, Any] = Field(default_factory=dict, description="Non-secret settings of the connector type.")
    resources: list[ResourcePattern] = Field(..., min_length=1, max_length=100, description="Allowed resource patterns (globs).")
    default_ttl_seconds: int | None = Field(None, ge=1)
    max_ttl_seconds: int | None = Field(None, ge=1)


class ConnectorOut(BaseModel):
    name: str
    type: str
    auth_method: str
    secret: str | None = Field(description="BACKEND/PATH of the secret it draws on; null when it holds none.")
    holds_secret: bool = Field(description="False for a keyless auth method (web-identity): no long-lived "
                                           "secret exists for this connector anywhere, here or in a backend.")
    config: dict[str, Any]
    resources: list[str]
    default_ttl_seconds: int
    max_ttl_seconds: int
    created_at: datetime
    updated_at: datetime


class ConnectorList(BaseModel):
    items: list[ConnectorOut]


class ConnectorTypeList(BaseModel):
    items: list[dict[str, Any]]


class BackendTypeOut(BaseModel):
    type: str
    available: bool = Field(description="False when the type's optional package is not installed.")
    reason: str | None = Field(None, description="Why the type is unavailable (how to install it).")
    config_schema: dict[str, Any] | None = Field(None, description="The JSON schema of the type's configuration.")
    capabilities: dict[str, Any] | None = Field(None, description="What the type can do (absent: not installed).")


class BackendTypeList(BaseModel):
    items: list[BackendTypeOut]


class VerificationOut(BaseModel):
    connector: str
    ok: bool
    message: str
    identity: str | None
    reachable: dict[str, list[str]]


class ResourceList(BaseModel):
    connector: str
    resource_type: str
    items: list[str]


# --- credentials and leases ------------------------------------------------


class CredentialRequest(Input):
    connector: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    resource: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    ttl_seconds: int | None = Field(None, ge=1, le=10 * 365 * 86400)
    wrap: bool = False
    wrap_ttl_seconds: int | None = Field(None, ge=1, le=86400)


class CredentialOut(BaseModel):
    lease_id: str
    connector: str
    connector_type: str | None = None
    resource: str
    issued_at: datetime
    expires_at: datetime
    ttl_seconds: int
    ttl_capped: bool
    requested_ttl_seconds: int | None = None
    renewable: bool
    revocability: str
    replayed: bool = False
    credential: dict[str, str] | None = Field(None, description="Absent when wrapped.")
    wrap_token: str | None = Field(None, description="Single-use; POST it to /v1/unwrap.")
    wrap_expires_at: datetime | None = None


class UnwrapIn(Input):
    wrap_token: Annotated[str, StringConstraints(min_length=1, max_length=256)]


class LeaseOut(BaseModel):
    lease_id: str
    connector: str
    connector_type: str
    resource: str
    principal: str
    run_id: str | None
    state: str
    revocability: str
    renewable: bool
    wrapped: bool
    issued_at: datetime
    expires_at: datetime
    max_expires_at: datetime
    revoked_at: datetime | None
    attempts: int
    last_error: str | None


class LeaseList(BaseModel):
    items: list[LeaseOut]
    next_page_token: str | None


class IssuanceBucket(BaseModel):
    start: datetime = Field(description="The beginning of the UTC hour.")
    count: int = Field(description="Leases issued in that hour.")


class LeaseIssuance(BaseModel):
    buckets: list[IssuanceBucket] = Field(description="One per hour, oldest first, the current hour last.")


class LeaseSummary(BaseModel):
    pending: int
    active: int
    revoking: int
    revoked: int
    expired: int
    stuck_revoking: int = Field(description="Revocations that failed at least stuck_after_attempts times.")
    reaper_leader: bool


class RenewIn(Input):
    ttl_seconds: int | None = Field(None, ge=1, le=10 * 365 * 86400)


class BulkRevokeIn(Input):
    connector: str | None = Field(None, max_length=64)
    principal: str | None = Field(
        None, max_length=600, description="An owner, ISSUER/SUBJECT; a bare gateway subject (client:x) means credgate/client:x."
    )
    dry_run: bool = Field(False, description="Only count what would be revoked (matched), revoking nothing.")


class BulkRevokeOut(BaseModel):
    matched: int
    revoked: int
    still_revoking: list[str]
