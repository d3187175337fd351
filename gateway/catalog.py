"""The connector catalog: configured connectors, and live instances built on demand.

A connector row names the secret it draws on; the material is read from the
backend only when an instance is needed (to issue, renew, revoke, verify),
validated against the auth method's model, and never returned by any
endpoint.

Two caches keep the request path off the store: connector rows, until the
connector changes, and a connector's validated material, for
``material_seconds`` at most. Both are dropped on every replica when the
connector, its secret or its backend changes through the gateway
(:mod:`gateway.changes`); the time limit bounds a change made behind the
gateway's back (in a vendor's secret manager).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select

from connectors.base import RESOURCE, ServiceConnector
from gateway import changes, paths
from gateway.cache import Cache
from gateway.errors import BadRequest, Conflict, Forbidden, NotFound, ValidationFailed, validate_model
from gateway.mounts import Mounts
from gateway.registry import CONNECTOR_TYPES, connector_class
from gateway.store import Store
from gateway.store.models import ConnectorRow, utcnow

CONNECTOR_NAME = paths.BACKEND_NAME  # same grammar as backend names


@dataclass(frozen=True)
class ConnectorSpec:
    type: str
    auth_method: str
    secret: str  # "backend/path"
    config: dict[str, Any]
    resources: list[str]
    default_ttl_seconds: int | None
    max_ttl_seconds: int | None


def type_info(type_name: str) -> dict[str, Any]:
    """What `GET /v1/connector-types` says about one type."""
    try:
        cls = connector_class(type_name)
    except BadRequest as exc:
        return {"type": type_name, "available": False, "reason": exc.message}
    return {
        "type": type_name,
        "available": True,
        "auth_methods": {name: model.model_json_schema() for name, model in cls.auth_methods.items()},
        "config_schema": cls.config_model.model_json_schema(),
        "resource_types": list(cls.resource_types),
        "revocability": str(cls.revocability),
        "renewable": cls.renewable,
        "wrap_only": cls.wrap_only,
        "default_ttl_seconds": int(cls.ttl.default.total_seconds()),
        "min_ttl_seconds": int(cls.ttl.min.total_seconds()),
        "max_ttl_seconds": int(cls.ttl.max.total_seconds()),
    }


def all_type_info() -> list[dict[str, Any]]:
    return [type_info(t) for t in sorted(CONNECTOR_TYPES)]


def resource_allowed(row: ConnectorRow, resource: str) -> bool:
    return any(fnmatch.fnmatchcase(resource, pattern) for pattern in row.resources)


@dataclass(frozen=True)
class _Material:
    secret: str  # "backend/path" it was read from
    config: Any
    material: Any


class Catalog:
    def __init__(self, store: Store, mounts: Mounts, *, material_seconds: float = 30.0) -> None:
        self._store = store
        self._mounts = mounts
        feed = store.changes
        self.rows: Cache[str, ConnectorRow] = Cache("connectors", feed, ttl=300.0)
        # Keyed by (name, updated_at): a caller holding an older row never meets newer material, or the reverse.
        self.material: Cache[tuple[str, Any], _Material] | None = (
            Cache("connector_material", feed, ttl=material_seconds) if material_seconds > 0 else None
        )
        feed.subscribe("connector", self._connector_changed)
        feed.subscribe("secret", self._secret_changed)
        feed.subscribe("backend", self._backend_changed)

    def _connector_changed(self, name: str | None) -> None:
        self.rows.invalidate(name)
        if self.material is not None:
            self.material.invalidate_where(lambda key, _m: name is None or key[0] == name)

    def _secret_changed(self, ref: str | None) -> None:
        if self.material is not None:
            self.material.invalidate_where(lambda _name, m: ref is None or m.secret == ref)

    def _backend_changed(self, name: str | None) -> None:
        if self.material is not None:
            self.material.invalidate_where(lambda _n, m: name is None or m.secret.partition("/")[0] == name)

    async def get(self, name: str) -> ConnectorRow:
        """The connector's row (shared with other requests: read it, never change it)."""
        return await self.rows.get(name, lambda: self._load(name))

    async def _load(self, name: str) -> ConnectorRow:
        async with self._store.read() as s:
            row = await s.get(ConnectorRow, name)
        if row is None:
            raise NotFound(f"Connector {name!r} does not exist.", code="connector_not_found")
        return row

    async def list(self) -> list[ConnectorRow]:
        async with self._store.read() as s:
            return list((await s.execute(select(ConnectorRow).order_by(ConnectorRow.name))).scalars())

    async def count_using_backend(self, backend: str) -> int:
        async with self._store.read() as s:
            q = select(func.count()).where(ConnectorRow.secret_backend == backend)
            return (await s.execute(q)).scalar_one()

    async def put(self, name: str, spec: ConnectorSpec) -> tuple[ConnectorRow, bool]:
        if not CONNECTOR_NAME.match(name):
            raise BadRequest(
                "A connector name is 1-63 characters of a-z, 0-9, '_' and '-', starting with a letter.",
                code="invalid_connector_name",
            )
        cls = connector_class(spec.type)
        if spec.auth_method not in cls.auth_methods:
            raise ValidationFailed(
                f"Connector type {spec.type} has no auth method {spec.auth_method!r}; "
                f"it has: {', '.join(sorted(cls.auth_methods))}.",
                code="unknown_auth_method",
            )
        config = validate_model(cls.config_model, spec.config, f"{spec.type} config", "config.")
        backend, _, path = spec.secret.partition("/")
        paths.backend_name(backend)
        paths.secret_path(path)
        await self._mounts.info(backend)  # 404 backend_not_found
        for pattern in spec.resources:
            if not RESOURCE.match(pattern):
                raise ValidationFailed(
                    "A resource pattern is 1-256 characters of A-Z a-z 0-9 . _ : / @ * + = -.",
                    code="invalid_resource_pattern",
                )
        lo, hi, default = cls.ttl.min, cls.ttl.max, cls.ttl.default
        max_ttl = timedelta(seconds=spec.max_ttl_seconds) if spec.max_ttl_seconds is not None else hi
        default_ttl = timedelta(seconds=spec.default_ttl_seconds) if spec.default_ttl_seconds is not None else min(default, max_ttl)
        if not (lo <= default_ttl <= max_ttl <= hi):
            raise ValidationFailed(
                f"TTLs must satisfy {int(lo.total_seconds())} <= default_ttl_seconds <= max_ttl_seconds "
                f"<= {int(hi.total_seconds())} for connector type {spec.type}.",
                code="invalid_ttl",
            )
        created = False
        async with self._store.write() as s:
            row = await s.get(ConnectorRow, name, with_for_update=True)
            if row is None:
                row = ConnectorRow(name=name, created_at=utcnow())
                s.add(row)
                created = True
            elif row.type != spec.type:
                raise Conflict(
                    f"Connector {name!r} is of type {row.type}; remove it to change its type.",
                    code="connector_type_change",
                )
            row.type = spec.type
            row.auth_method = spec.auth_method
            row.secret_backend, row.secret_path = backend, path
            row.config = config.model_dump(mode="json")
            row.resources = list(spec.resources)
            row.default_ttl_seconds = int(default_ttl.total_seconds())
            row.max_ttl_seconds = int(max_ttl.total_seconds())
            row.updated_at = utcnow()
            await changes.note(s, "connector", name)
        return row, created

    async def delete(self, name: str) -> None:
        async with self._store.write() as s:
            row = await s.get(ConnectorRow, name, with_for_update=True)
            if row is None:
                raise NotFound(f"Connector {name!r} does not exist.", code="connector_not_found")
            await s.delete(row)
            await changes.note(s, "connector", name)

    @staticmethod
    def check_resource(row: ConnectorRow, resource: str) -> None:
        """The resource is well-formed and inside the connector's allowed patterns."""
        if not RESOURCE.match(resource) or "*" in resource:
            raise BadRequest("A resource is 1-256 characters of A-Z a-z 0-9 . _ : / @ + = -.", code="invalid_resource")
        if not resource_allowed(row, resource):
            raise Forbidden(
                f"Connector {row.name!r} may not reach resource {resource!r}.", code="resource_not_allowed"
            )

    async def instance(self, row: ConnectorRow) -> ServiceConnector:
        """A live connector with its material (read from the backend at most ``material_seconds`` ago)."""
        cls = connector_class(row.type)
        if self.material is None:
            loaded = await self._read_material(row)
        else:
            loaded = await self.material.get((row.name, row.updated_at), lambda: self._read_material(row))
        try:
            return cls(loaded.config, row.auth_method, loaded.material)
        except ValueError as exc:
            # A plain ValueError carries a connector's own sentence; anything richer (a pydantic
            # error quotes its input, which may be material) is reduced to its type.
            why = str(exc) if type(exc) is ValueError else type(exc).__name__
            raise ValidationFailed(f"Connector {row.name!r} is misconfigured: {why}", code="connector_invalid") from None

    async def _read_material(self, row: ConnectorRow) -> _Material:
        cls = connector_class(row.type)
        config = validate_model(cls.config_model, row.config, f"{row.type} config", "config.")
        backend = await self._mounts.get(row.secret_backend)
        try:
            value = await backend.get(row.secret_path)
        except NotFound as exc:
            raise Conflict(
                f"Connector {row.name!r} draws on {row.secret_backend}/{row.secret_path}, which is unavailable "
                f"({exc.code}).",
                code="connector_material_missing",
            ) from None
        material = validate_model(
            cls.auth_methods[row.auth_method], value.data, f"secret for auth method {row.auth_method}", "secret."
        )
        return _Material(f"{row.secret_backend}/{row.secret_path}", config, material)
