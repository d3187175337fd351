"""Credentials as the gateway hands them out: a base :class:`Credential` and typed views.

The view is chosen from the connector *type* the gateway reports (``connector_type``),
never from the connector's name; a type this client does not know is a plain
:class:`Credential`. The secret values are in :attr:`Credential.fields` (and the typed
properties); ``repr()`` and ``str()`` name the lease and the field names only.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any, ClassVar

__all__ = [
    "AWSCredential", "Credential", "MySQLCredential", "PostgresCredential", "RedisCredential", "StaticCredential",
    "credential_from",
]


def _when(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


@dataclass(frozen=True, repr=False, eq=False)
class Credential:
    """One lease's credential. ``fields`` maps the connector's field names to their values."""

    connector_type: ClassVar[str | None] = None

    lease_id: str
    connector: str
    resource: str
    expires_at: datetime
    renewable: bool
    fields: Mapping[str, str] = field(default_factory=dict)
    issued_at: datetime | None = None
    type: str | None = None
    revocability: str | None = None

    def __repr__(self) -> str:
        keys = ", ".join(sorted(self.fields))
        return (f"<{type(self).__name__} lease={self.lease_id} connector={self.connector} resource={self.resource} "
                f"expires_at={self.expires_at.isoformat()} fields=[{keys}] (values redacted)>")

    __str__ = __repr__

    def __getitem__(self, key: str) -> str:
        return self.fields[key]

    def get(self, key: str, default: str | None = None) -> str | None:
        return self.fields.get(key, default)

    def remaining(self, now: float | None = None) -> float:
        """Seconds until it expires (negative once expired)."""
        return self.expires_at.timestamp() - (time.time() if now is None else now)

    @property
    def lifetime(self) -> float:
        start = self.issued_at.timestamp() if self.issued_at is not None else time.time()
        return max(0.0, self.expires_at.timestamp() - start)

    def with_expiry(self, expires_at: datetime, issued_at: datetime | None = None) -> Credential:
        """The same credential, its lease renewed to ``expires_at``."""
        return replace(self, expires_at=expires_at, issued_at=issued_at or self.issued_at)


class _Connection(Credential):
    @property
    def username(self) -> str | None:
        return self.fields.get("username")

    @property
    def password(self) -> str | None:
        return self.fields.get("password")

    @property
    def host(self) -> str | None:
        return self.fields.get("host")

    @property
    def port(self) -> int | None:
        port = self.fields.get("port")
        return int(port) if port else None


class PostgresCredential(_Connection):
    connector_type = "postgres"

    @property
    def database(self) -> str | None:
        return self.fields.get("dbname") or self.fields.get("database")

    @property
    def dsn(self) -> str | None:
        """A libpq URL (holds the password)."""
        return self.fields.get("dsn")


class MySQLCredential(_Connection):
    connector_type = "mysql"

    @property
    def database(self) -> str | None:
        return self.fields.get("database")

    @property
    def dsn(self) -> str | None:
        return self.fields.get("dsn")


class RedisCredential(_Connection):
    connector_type = "redis"

    @property
    def url(self) -> str | None:
        return self.fields.get("url")


class AWSCredential(Credential):
    connector_type = "aws"

    @property
    def access_key_id(self) -> str | None:
        return self.fields.get("aws_access_key_id")

    @property
    def secret_access_key(self) -> str | None:
        return self.fields.get("aws_secret_access_key")

    @property
    def session_token(self) -> str | None:
        return self.fields.get("aws_session_token")

    @property
    def region(self) -> str | None:
        return self.fields.get("region")

    def boto3_kwargs(self) -> dict[str, str]:
        """Keyword arguments for ``boto3.client(...)`` / ``boto3.Session(...)``."""
        out = {"aws_access_key_id": self.access_key_id, "aws_secret_access_key": self.secret_access_key,
               "aws_session_token": self.session_token, "region_name": self.region,
               "endpoint_url": self.fields.get("endpoint_url")}
        return {k: v for k, v in out.items() if v}


class StaticCredential(Credential):
    """Stored material handed out as it is: its keys are the secret's keys."""

    connector_type = "static"


VIEWS: dict[str, type[Credential]] = {
    cls.connector_type: cls
    for cls in (PostgresCredential, MySQLCredential, RedisCredential, AWSCredential, StaticCredential)
    if cls.connector_type
}


def credential_from(body: Mapping[str, Any]) -> Credential:
    """The typed credential for a gateway's ``CredentialOut`` answer."""
    kind = body.get("connector_type")
    cls = VIEWS.get(kind, Credential) if isinstance(kind, str) else Credential
    return cls(
        lease_id=str(body["lease_id"]), connector=str(body["connector"]), resource=str(body["resource"]),
        expires_at=_when(body["expires_at"]), renewable=bool(body.get("renewable", False)),
        fields=MappingProxyType(dict(body.get("credential") or {})),
        issued_at=_when(body["issued_at"]) if body.get("issued_at") else None,
        type=kind if isinstance(kind, str) else None, revocability=body.get("revocability"),
    )
