"""Static material: a third-party API key, or anything that can't be made short-lived.

Nothing is created at a target: ``issue`` hands out the backend secret's keys
(all, or the configured ``keys``). Because the value outlives any lease, the
type is ``wrap_only``: the gateway only hands it out through a single-use wrap
token, and the TTL limits (5 min default, 1 h max) are the wrap token's
lifetime. ``revoke`` has nothing to remove; rotate the secret at its issuer to
cut off someone who unwrapped it.

Resources are labels (``default``, or any name of 1-64 characters of
``A-Z a-z 0-9 . _ -``) for policy and audit; they select nothing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from connectors.base import (
    PoolLimits,
    ConnectorBase,
    ConnectorCapabilities,
    IssueRequest,
    Issued,
    NotRenewable,
    ResourceNotSupported,
    Revocability,
    TargetError,
    TTLLimits,
    Verification,
)

__all__ = ["StaticConnector", "StaticConfig", "StaticMaterial", "LABEL"]

LABEL = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_KEY = re.compile(r"^[^\x00-\x1f\x7f]{1,128}$")


class StaticMaterial(BaseModel):
    """Any map of string keys to string values (kept as SecretStr)."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, SecretStr] = Field(init=False)

    def values(self) -> dict[str, SecretStr]:
        return dict(self.__pydantic_extra__ or {})


class StaticConfig(BaseModel):
    """``keys``: the material keys to hand out (default: all of them)."""

    model_config = ConfigDict(extra="forbid")

    keys: list[str] | None = Field(default=None, min_length=1, max_length=256)

    @field_validator("keys")
    @classmethod
    def _keys(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if any(not _KEY.match(k) for k in value):
            raise ValueError("a key name is 1-128 characters, no control characters")
        if len(set(value)) != len(value):
            raise ValueError("key names must be unique")
        return value


class StaticConnector(ConnectorBase):
    """Hands out stored material unchanged, only through wrap tokens."""

    type: ClassVar[str] = "static"
    auth_methods: ClassVar[Mapping[str, type[BaseModel]]] = MappingProxyType({"static": StaticMaterial})
    config_model: ClassVar[type[BaseModel]] = StaticConfig
    resource_types: ClassVar[tuple[str, ...]] = ("static",)
    # creates_at_target False: it hands out the backend secret's values as they are
    capabilities: ClassVar[ConnectorCapabilities] = ConnectorCapabilities(
        Revocability.EXPIRY_ONLY, renewable=False, wrap_only=True, creates_at_target=False
    )
    ttl: ClassVar[TTLLimits] = TTLLimits(default=timedelta(minutes=5), min=timedelta(seconds=1), max=timedelta(hours=1))

    def __init__(
        self, config: BaseModel, auth_method: str, material: BaseModel, *, name: str = "", pool: PoolLimits | None = None
    ) -> None:
        super().__init__(config, auth_method, material, name=name, pool=pool)
        self.config: StaticConfig
        self._material: StaticMaterial

    def __repr__(self) -> str:
        return f"<StaticConnector keys={self._selected()}>"

    def _selected(self) -> list[str]:
        return list(self.config.keys) if self.config.keys is not None else sorted(self._material.values())

    def _missing(self) -> list[str]:
        present = self._material.values()
        return [k for k in self._selected() if k not in present]

    def missing_keys(self) -> list[str]:
        """The configured ``keys`` the secret lacks (checked when the connector is added)."""
        return self._missing()

    def validate_resource(self, resource: str) -> str:
        if not isinstance(resource, str) or not LABEL.match(resource):
            raise ResourceNotSupported(
                "A static resource is a label of 1-64 characters of A-Z a-z 0-9 . _ - (e.g. 'default')."
            )
        return "static"

    def plan(self, lease_id: str, resource: str) -> dict[str, Any]:
        self.validate_resource(resource)
        return {}  # nothing is created, nothing to revoke

    async def issue(self, req: IssueRequest) -> Issued:
        self.validate_resource(req.resource)
        missing = self._missing()
        if missing:
            names = ", ".join(repr(k) for k in missing)
            noun = "key" if len(missing) == 1 else "keys"
            raise TargetError(
                f"The connector's secret lacks the configured {noun} {names}.", code="material_incomplete", missing=missing
            )
        values = self._material.values()
        if not values:
            raise TargetError("The connector's secret holds no keys.", code="material_incomplete")
        credential = {k: values[k].get_secret_value() for k in self._selected()}
        return Issued(credential=credential, expires_at=req.expires_at)

    async def renew(self, revoke_state: Mapping[str, Any], expires_at: datetime) -> datetime:
        raise NotRenewable("Static credentials can't be renewed; they are only handed out once.")

    async def revoke(self, revoke_state: Mapping[str, Any]) -> None:
        """Nothing to remove at any target."""
        return None

    async def verify(self) -> Verification:
        """Whether the secret holds every configured key (never their values)."""
        selected, missing = self._selected(), self._missing()
        if not selected:
            return Verification(ok=False, message="The secret holds no keys.")
        if missing:
            names = ", ".join(repr(k) for k in missing)
            return Verification(ok=False, message=f"The secret lacks {len(missing)} of {len(selected)} configured keys: {names}.")
        noun = "key" if len(selected) == 1 else "keys"
        which = "configured" if self.config.keys is not None else "all of the secret's"
        return Verification(ok=True, message=f"{len(selected)} {noun} to hand out ({which}).")

    async def list_resources(self, resource_type: str) -> list[str]:
        if resource_type != "static":
            raise ResourceNotSupported(f"Connector type static has no resource type {resource_type!r}; it has: static.")
        return ["default"]
