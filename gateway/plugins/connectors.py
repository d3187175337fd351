"""The connector catalog: configured connectors, and live instances built on demand.

A connector row names the secret it draws on; the material is read from the
backend only when an instance is needed (to issue, renew, revoke, verify),
validated against the auth method's model, and never returned by any
endpoint.

Two caches keep the request path off the store: connector rows, until the
connector changes, and a connector's validated material, for
``material_seconds`` at most. Both are dropped on every replica when the
connector, its secret or its backend changes through the gateway
(:mod:`gateway.store.changes`); the time limit bounds a change made behind the
gateway's back (in a vendor's secret manager).

Lifecycle: a live connector is built as ``cls(config, auth_method, material, name=NAME)``
and its ``start()`` awaited before it serves; it is reused while its material (the same
cached, validated object) is, and its ``aclose()`` is awaited when it is dropped: replaced
by an instance built on newer material, its connector changed or removed, or at
:meth:`Catalog.aclose`. What a type can do is read from its ``capabilities``, never from
its name.

Binding a connector to a secret hands that secret's material to whoever may
use the connector (a ``static`` connector hands it out as it is), and a
connector's secret decides where its credentials point. So
:meth:`Catalog.authorize_material` is the one decision for both directions:
binding needs ``secrets:bind`` on the secret (resource ``BACKEND/PATH``,
connector the one being bound), and changing a secret that connectors draw on
needs ``connectors:manage`` on each of them.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
from dataclasses import dataclass
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from pydantic import BaseModel, ValidationError
from sqlalchemy import func, select

from connectors.base import RESOURCE, PoolLimits, ServiceConnector, WorkloadIdentity, is_keyless
from gateway.audit import trail as audit
from gateway.store import changes
from gateway import paths
from gateway.identity.principal import Principal
from gateway.store.cache import Cache
from gateway.errors import BadRequest, Conflict, Forbidden, NotFound, ValidationFailed, field_path, validate_model
from gateway.plugins.backends import Mounts
from gateway.plugins.registry import CONNECTOR_TYPES, connector_class
from gateway.store import Store
from gateway.store.models import ConnectorRow, utcnow
from gateway.store.rows import delete_row, read_or_404

log = logging.getLogger("credgate.connectors")

CONNECTOR_NAME = paths.BACKEND_NAME  # same grammar as backend names


@dataclass(frozen=True)
class ConnectorSpec:
    type: str
    auth_method: str
    secret: str | None  # "backend/path"; None for a keyless auth method
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
        "keyless_auth_methods": sorted(name for name, model in cls.auth_methods.items() if is_keyless(model)),
        "config_schema": cls.config_model.model_json_schema(),
        "resource_types": list(cls.resource_types),
        "revocability": str(cls.capabilities.revocability),
        "renewable": cls.capabilities.renewable,
        "wrap_only": cls.capabilities.wrap_only,
        "default_ttl_seconds": int(cls.ttl.default.total_seconds()),
        "min_ttl_seconds": int(cls.ttl.min.total_seconds()),
        "max_ttl_seconds": int(cls.ttl.max.total_seconds()),
    }


def all_type_info() -> list[dict[str, Any]]:
    return [type_info(t) for t in sorted(CONNECTOR_TYPES)]


def _key(name: str) -> str:
    # A secret's key names are the caller's input: bounded like every field path an error repeats.
    return field_path((name,))


def validate_material(cls: Any, auth_method: str, data: Any, ref: str) -> BaseModel:
    """The secret ``ref``'s values as auth method ``auth_method`` of connector type ``cls`` needs
    them, or 422 ``connector_material_invalid`` naming the keys at fault (missing, unexpected,
    invalid), never a value."""
    try:
        return cls.auth_methods[auth_method].model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_input=False, include_url=False)
    missing, unexpected, invalid = [], [], []
    for e in errors:
        key = _key(str(e["loc"][0])) if e["loc"] else "(the secret)"
        if e["type"] == "missing":
            missing.append(key)
        elif e["type"] == "extra_forbidden":
            unexpected.append(key)
        else:
            invalid.append({"key": key, "message": str(e["msg"])})
    parts = []
    if missing:
        parts.append("lacks " + ", ".join(repr(k) for k in missing))
    if unexpected:
        parts.append("has keys it does not take: " + ", ".join(repr(k) for k in unexpected))
    if invalid:
        parts.append("has invalid " + ", ".join(f"{i['key']!r} ({i['message']})" for i in invalid))
    raise ValidationFailed(
        f"Secret {ref} can't serve connector type {cls.type} (auth method {auth_method}): it {'; it '.join(parts)}.",
        code="connector_material_invalid",
        missing=missing,
        unexpected=unexpected,
        invalid=invalid,
    )


def _construct(
    cls: Any, name: str, config: Any, auth_method: str, material: Any, pool: PoolLimits | None = None,
    identity: Callable[[str], WorkloadIdentity] | None = None,
) -> ServiceConnector:
    try:
        connector = cls(config, auth_method, material, name=name, pool=pool)
        if identity is not None:
            connector.identity = identity(name)  # the gateway as its OIDC issuer (web-identity)
        return connector
    except ValueError as exc:
        # A plain ValueError carries a connector's own sentence; anything richer (a pydantic
        # error quotes its input, which may be material) is reduced to its type.
        why = str(exc) if type(exc) is ValueError else type(exc).__name__
        raise ValidationFailed(f"Connector {name!r} is misconfigured: {why}", code="connector_invalid") from None


def resource_allowed(row: ConnectorRow, resource: str) -> bool:
    return any(fnmatch.fnmatchcase(resource, pattern) for pattern in row.resources)


@dataclass(frozen=True)
class _Material:
    secret: str | None  # "backend/path" it was read from; None: keyless, nothing read
    config: Any
    material: Any


class Catalog:
    def __init__(
        self, store: Store, mounts: Mounts, *, material_seconds: float = 30.0, pool: PoolLimits | None = None,
        identity: Callable[[str], WorkloadIdentity] | None = None,
    ) -> None:
        self._store = store
        # connector name -> the gateway as its OIDC issuer, for keyless auth methods (web-identity)
        self._identity = identity
        self._pool = pool or PoolLimits()  # each live instance's bounds on admin connections to its target
        self._mounts = mounts
        feed = store.changes
        self.rows: Cache[str, ConnectorRow] = Cache("connectors", feed, ttl=300.0)
        # Keyed by (name, updated_at): a caller holding an older row never meets newer material, or the reverse.
        self.material: Cache[tuple[str, Any], _Material] | None = (
            Cache("connector_material", feed, ttl=material_seconds) if material_seconds > 0 else None
        )
        # name -> (the material it was built on, the started instance)
        self._live: dict[str, tuple[_Material, ServiceConnector]] = {}
        self._closing: set[asyncio.Task[None]] = set()
        feed.subscribe("connector", self._connector_changed)
        feed.subscribe("secret", self._secret_changed)
        feed.subscribe("backend", self._backend_changed)

    def _connector_changed(self, name: str | None) -> None:
        self.rows.invalidate(name)
        for dropped in [n for n in self._live if name is None or n == name]:
            self._drop(self._live.pop(dropped)[1])
        if self.material is not None:
            self.material.invalidate_where(lambda key, _m: name is None or key[0] == name)

    def _secret_changed(self, ref: str | None) -> None:
        if self.material is not None:
            self.material.invalidate_where(lambda _name, m: m.secret is not None and (ref is None or m.secret == ref))

    def _backend_changed(self, name: str | None) -> None:
        if self.material is not None:
            self.material.invalidate_where(
                lambda _n, m: m.secret is not None and (name is None or m.secret.partition("/")[0] == name)
            )

    async def get(self, name: str) -> ConnectorRow:
        """The connector's row (shared with other requests: read it, never change it)."""
        return await self.rows.get(name, lambda: self._load(name))

    async def _load(self, name: str) -> ConnectorRow:
        return await read_or_404(self._store, ConnectorRow, name, "Connector", "connector_not_found")

    async def list(self) -> list[ConnectorRow]:
        async with self._store.read() as s:
            return list((await s.execute(select(ConnectorRow).order_by(ConnectorRow.name))).scalars())

    async def count_using_backend(self, backend: str) -> int:
        async with self._store.read() as s:
            q = select(func.count()).where(ConnectorRow.secret_backend == backend)
            return (await s.execute(q)).scalar_one()

    async def using_secret(self, backend: str, path: str | None) -> list[str]:
        """The connectors that draw on secret ``backend/path`` (``path`` None: on any secret of ``backend``)."""
        async with self._store.read() as s:
            q = select(ConnectorRow.name).where(ConnectorRow.secret_backend == backend)
            if path is not None:
                q = q.where(ConnectorRow.secret_path == path)
            q = q.order_by(ConnectorRow.name)
            return list((await s.execute(q)).scalars())

    async def authorize_material(
        self, principal: Principal, backend: str, path: str | None, *, bind: str | None = None
    ) -> None:
        """May ``principal`` bind connector ``bind`` to secret ``backend/path`` (``bind`` given), or
        change that secret (``bind`` None)? The one decision on connector material; 403 if not.
        ``path`` None (with ``bind`` None) asks about replacing backend ``backend`` itself: its
        configuration decides where every connector drawing on it reads its material from.

        - Binding (creating or replacing a connector) needs ``secrets:bind`` on the secret, decided
          with ``resource="BACKEND/PATH"`` (the shape every secrets action uses) and
          ``connector=NAME``, so one rule can say which connectors may draw on which secrets.
        - Changing the secret (write, delete, destroy, restore) needs ``connectors:manage`` on
          every connector that draws on it: its values are those connectors' material.

        A refusal is recorded as the request's decision; an allow leaves the route's action in
        the audit event and adds what was decided to its details.
        """
        ref = f"{backend}/{path}"
        if bind is not None:
            checks = [("secrets:bind", bind, ref)]
        else:
            checks = [("connectors:manage", name, None) for name in await self.using_secret(backend, path)]
        for action, connector, resource in checks:
            if not principal.can(action, connector=connector, resource=resource):
                principal.require(action, connector=connector, resource=resource)  # records the deny, raises 403
        if bind is not None:
            audit.note(details={"secret": ref})
        elif checks:
            audit.note(details={"material_of": [c for _, c, _ in checks][:20]})

    async def put(self, name: str, spec: ConnectorSpec, *, principal: Principal) -> tuple[ConnectorRow, bool]:
        """Create or replace connector ``name``. The caller must be allowed to bind it to its secret
        (:meth:`authorize_material`), and the secret must hold what the auth method needs: both are
        decided here, at every create and replace, not at first use."""
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
        keyless = is_keyless(cls.auth_methods[spec.auth_method])
        if keyless and spec.secret is not None:
            raise BadRequest(
                f"Auth method {spec.auth_method} of connector type {spec.type} draws on no secret; omit secret.",
                code="secret_not_used",
            )
        if not keyless and spec.secret is None:
            raise BadRequest(
                f"Auth method {spec.auth_method} of connector type {spec.type} needs a secret (BACKEND/PATH).",
                code="secret_required",
            )
        backend = path = None
        if spec.secret is not None:
            backend, _, path = spec.secret.partition("/")
            paths.backend_name(backend)
            paths.secret_path(path)
            await self.authorize_material(principal, backend, path, bind=name)  # before the secret is touched
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
        # The material, checked now: a connector that can't work is refused when it is added.
        if backend is None or path is None:
            material = cls.auth_methods[spec.auth_method]()
        else:
            data = await self._secret_data(name, backend, path)
            material = validate_material(cls, spec.auth_method, data, f"{backend}/{path}")
        missing = _construct(cls, name, config, spec.auth_method, material, identity=self._identity).missing_keys()
        if missing:
            keys = [_key(k) for k in missing]
            raise ValidationFailed(
                f"Secret {spec.secret} lacks {'key' if len(keys) == 1 else 'keys'} "
                f"{', '.join(repr(k) for k in keys)} that connector {name!r} is configured to hand out.",
                code="connector_material_invalid",
                missing=keys,
                unexpected=[],
                invalid=[],
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
        await delete_row(self._store, ConnectorRow, name, topic="connector", what="Connector", code="connector_not_found")

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
        live = self._live.get(row.name)
        if live is not None and (live[0] is loaded or live[0] == loaded):
            # The same material, or the same values read again once the cache lapsed: the
            # instance (and its pool of admin connections) stays.
            return live[1]
        connector = _construct(cls, row.name, loaded.config, row.auth_method, loaded.material, self._pool, self._identity)
        await connector.start()
        old = self._live.get(row.name)
        self._live[row.name] = (loaded, connector)
        if old is not None and old[1] is not connector:
            self._drop(old[1])
        return connector

    def pools(self) -> list[tuple[str, Any]]:
        """(name, pool) of every live connector that keeps admin connections (its ``target_pool``)."""
        return [
            (name, pool) for name, (_, connector) in sorted(self._live.items())
            if (pool := getattr(connector, "target_pool", None)) is not None
        ]

    def _drop(self, connector: ServiceConnector) -> None:
        """Close a connector no longer handed out (calls in flight on it may finish)."""
        try:
            task = asyncio.get_running_loop().create_task(self._close(connector))
        except RuntimeError:  # no loop: nothing was started on one either
            return
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    @staticmethod
    async def _close(connector: ServiceConnector) -> None:
        try:
            await connector.aclose()
        except Exception as exc:  # noqa: BLE001 - a failed close is logged by its sanitised class only
            log.warning("closing connector %s failed: %s", getattr(connector, "name", "?"), type(connector).sanitize(exc))

    async def aclose(self) -> None:
        """Close every live connector (at shutdown)."""
        live, self._live = list(self._live.values()), {}
        for _, connector in live:
            await self._close(connector)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    async def _secret_data(self, name: str, backend_name: str, path: str) -> Any:
        backend = await self._mounts.get(backend_name)
        try:
            return (await backend.get(path)).data
        except NotFound as exc:
            raise Conflict(
                f"Connector {name!r} draws on {backend_name}/{path}, which is unavailable ({exc.code}).",
                code="connector_material_missing",
            ) from None

    async def _read_material(self, row: ConnectorRow) -> _Material:
        cls = connector_class(row.type)
        config = validate_model(cls.config_model, row.config, f"{row.type} config", "config.")
        if row.secret_backend is None or row.secret_path is None:  # keyless: nothing to read
            return _Material(None, config, cls.auth_methods[row.auth_method]())
        ref = f"{row.secret_backend}/{row.secret_path}"
        data = await self._secret_data(row.name, row.secret_backend, row.secret_path)
        return _Material(ref, config, validate_material(cls, row.auth_method, data, ref))
