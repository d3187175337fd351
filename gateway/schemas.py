"""Request and response bodies. Input and output models are separate: an output
model can't leak a field it does not declare."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr, StringConstraints

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


class BackendOut(BaseModel):
    name: str
    type: str
    config: dict[str, Any] = Field(description="Non-secret settings; secret fields are masked.")
    builtin: bool
    created_at: datetime
    updated_at: datetime


class BackendList(BaseModel):
    items: list[BackendOut]


class HealthOut(BaseModel):
    backend: str
    ok: bool
    message: str
    details: dict[str, str]


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


class AdminKeyOut(BaseModel):
    id: str
    name: str
    role: str
    created_at: datetime
    created_by: str | None
    revoked_at: datetime | None


class AdminKeyCreated(AdminKeyOut):
    token: str = Field(description="Shown once; the gateway keeps only its hash.")


class AdminKeyList(BaseModel):
    items: list[AdminKeyOut]
