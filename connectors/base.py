"""The ServiceConnector protocol: how long-lived material becomes a short-lived credential.

A connector *type* (``postgres``, ``mysql``, ``redis``, ``aws``, ``static``)
is a class; a *connector* is a configured instance of it: its non-secret
``config``, one of its ``auth_methods``, and the ``material`` (a map of
strings read from a backend secret at the moment it is needed). The gateway
owns leases, TTLs, policy and audit; a connector only talks to its target.

The order of an issuance, and why:

1. ``plan(lease_id, resource)`` returns the **revoke state**: everything
   ``revoke`` will need (e.g. the deterministic role name ``cg_<lease>``).
   It is pure (no I/O) and the gateway commits it in a ``pending`` lease row
   *before* anything exists at the target.
2. ``issue(request)`` creates the credential at the target under exactly the
   planned names, and returns it with its expiry.
3. ``revoke(revoke_state)`` removes it. It must be **idempotent**: a user or
   role already gone counts as success, so a pending lease left by a crash
   between 1 and 2 can be revoked blindly by its planned name, as often as
   needed.

Rules for implementers:

- Vendor SDKs are imported inside methods (never at module import), so the
  type's metadata is listable without its SDK installed.
- Never put material, passwords or tokens in an exception message or a log
  line; raise :class:`TargetError` with a sentence of your own. Vendor error
  text can quote a statement or a credential: at most its class name and a
  vendor error *code* may be kept (see :func:`safe_vendor_error`).
- Every call to a target has a timeout (``timeout_seconds`` in the request or
  the connector's own default).
- A target refusing the *resource* (it doesn't exist there, or may not be
  granted) is :class:`ResourceRejected` (409), not a plain ``TargetError``
  (502): the caller asked for something the target can't give.
- Material the auth method's model can't check (a ``static`` connector's
  configured keys) is reported by :meth:`ConnectorBase.missing_keys`, so the
  gateway refuses a connector when it is added, not at first use.
- ``verify`` and ``list_resources`` use the material but never return it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from enum import StrEnum
from typing import Any, ClassVar, Protocol, runtime_checkable

from pydantic import BaseModel, ValidationError

from gateway.errors import (  # the plugin-facing errors a connector raises (see gateway/errors.py)
    BadRequest,
    CredgateError,
    ResourceNotSupported,
    ResourceRejected,
    TargetError,
    TargetUnreachable,
    ValidationFailed,
    field_errors,
)


class Revocability(StrEnum):
    REVOCABLE = "revocable"  # the gateway can remove it at the target (drop the role)
    EXPIRY_ONLY = "expiry-only"  # it can only be waited out (an STS token)
    EPOCH = "epoch"  # the target denies everything issued before a time


def safe_vendor_error(exc: BaseException) -> str:
    """A vendor exception reduced to what is safe to show: its class and its error code.

    Never the message: drivers quote statements (``CREATE ROLE ... PASSWORD '...'``)
    and cloud SDKs quote request parameters there.
    """
    code: object = getattr(exc, "sqlstate", None)
    if code is None:
        response = getattr(exc, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
    if code is None and exc.args and isinstance(exc.args[0], int):
        code = exc.args[0]  # PyMySQL and redis-style (errno, message) tuples
    return type(exc).__name__ + (f" ({code})" if code is not None else "")


@dataclass(frozen=True)
class IssueRequest:
    lease_id: str
    resource: str
    ttl: timedelta
    expires_at: datetime  # computed by the gateway: now + ttl
    revoke_state: Mapping[str, Any]  # what plan() returned, as committed
    timeout_seconds: float = 30.0


@dataclass(frozen=True)
class Issued:
    """A fresh credential. ``credential`` values are secret; ``expires_at`` is
    the target's own expiry (it may be earlier than requested, never later)."""

    credential: dict[str, str]
    expires_at: datetime

    def __repr__(self) -> str:
        return f"Issued(keys={sorted(self.credential)}, expires_at={self.expires_at.isoformat()})"


@dataclass(frozen=True)
class Verification:
    ok: bool
    message: str
    identity: str | None = None  # who the material authenticates as (an IAM ARN, a DB user)
    reachable: dict[str, list[str]] = field(default_factory=dict)  # resource type -> resources seen


@dataclass(frozen=True)
class TTLLimits:
    default: timedelta
    min: timedelta
    max: timedelta


@runtime_checkable
class ServiceConnector(Protocol):
    type: ClassVar[str]
    # auth method name -> pydantic model of the *material* it needs from the backend secret
    auth_methods: ClassVar[Mapping[str, type[BaseModel]]]
    config_model: ClassVar[type[BaseModel]]  # non-secret settings (host, port, region, grants...)
    resource_types: ClassVar[Sequence[str]]
    revocability: ClassVar[Revocability]
    renewable: ClassVar[bool]
    ttl: ClassVar[TTLLimits]
    wrap_only: ClassVar[bool]  # True: credentials are only ever handed out through a wrap token
    # False only if ``issue`` creates nothing anywhere (it hands out material it already has): then
    # the gateway records the lease once, active, instead of pending-then-active around the call.
    creates_at_target: ClassVar[bool]

    def __init__(self, config: BaseModel, auth_method: str, material: BaseModel) -> None: ...

    def validate_resource(self, resource: str) -> str:
        """Return the resource type of ``resource`` or raise ResourceNotSupported."""
        ...

    def plan(self, lease_id: str, resource: str) -> dict[str, Any]:
        """The revoke state for a lease, decided before anything is created. Pure."""
        ...

    async def issue(self, req: IssueRequest) -> Issued: ...

    async def renew(self, revoke_state: Mapping[str, Any], expires_at: datetime) -> datetime:
        """Move the target's own expiry to ``expires_at``; return the expiry now in force."""
        ...

    async def revoke(self, revoke_state: Mapping[str, Any]) -> None:
        """Remove the credential; already gone is success."""
        ...

    async def verify(self) -> Verification: ...

    async def list_resources(self, resource_type: str) -> list[str]: ...


def coerce(model: type[BaseModel], value: Any, what: str) -> Any:
    """``value`` (a model or a mapping) as an instance of ``model``; a validation
    error names the fields at fault, never their values (they may be material)."""
    if isinstance(value, model):
        return value
    data = value.model_dump() if isinstance(value, BaseModel) else value
    if not isinstance(data, Mapping):
        raise ValidationFailed(f"The {what} must be an object.", code="invalid_connector_config")
    try:
        return model.model_validate(dict(data))
    except ValidationError as exc:
        fields = ", ".join(e["field"] or what for e in field_errors(exc.errors()))
        raise ValidationFailed(f"Invalid {what} at: {fields}.", code="invalid_connector_config") from None


def as_utc(when: datetime) -> datetime:
    """A datetime in UTC (a naive one is taken to be UTC already)."""
    return when.replace(tzinfo=timezone.utc) if when.tzinfo is None else when.astimezone(timezone.utc)


class ConnectorBase:
    """The constructor every connector shares: the auth method must be one of
    the type's, and config and material are validated against their models
    (errors name fields, never values). Subclasses call it, then add their own."""

    type: ClassVar[str]
    auth_methods: ClassVar[Mapping[str, type[BaseModel]]]
    config_model: ClassVar[type[BaseModel]]
    creates_at_target: ClassVar[bool] = True

    def __init__(self, config: Any, auth_method: str, material: Any) -> None:
        if auth_method not in self.auth_methods:
            raise ValidationFailed(
                f"Connector type {self.type} has no auth method {auth_method!r}; "
                f"it has: {', '.join(sorted(self.auth_methods))}.",
                code="unknown_auth_method",
            )
        self.auth_method = auth_method
        self.config = coerce(self.config_model, config, f"{self.type} config")
        self._material = coerce(self.auth_methods[auth_method], material, f"{self.type} material")

    def missing_keys(self) -> list[str]:
        """Names of keys the configuration needs from the material that it lacks (never
        values). The auth method's model already checks its own fields; override only when
        the configuration names more (a ``static`` connector's ``keys``)."""
        return []


RESOURCE = re.compile(r"^[A-Za-z0-9._:/@*+=-]{1,256}$")


def role_name(lease_id: str, prefix: str = "cg_") -> str:
    """The deterministic target-side name of a lease's user or role."""
    return prefix + re.sub(r"[^a-z0-9]", "", lease_id.lower())[-24:]
