"""The backends API: register, list, show, check and remove secret backends.

Health, cheaply: a backend as listed or shown carries ``health.status`` (the live
backend's own ``status()``, no I/O; absent when it has not been started on this replica)
and ``health.last_check`` (the last ``POST /v1/backends/NAME/check`` answered by this
replica, and when). Listing never probes a store; only ``check`` does.

A backend whose configuration holds a :class:`backends.base.SecretRef` (a credential kept
in another backend) may be registered only by a caller allowed ``secrets:reveal`` on that
``backend/path`` (403 otherwise, audited, nothing saved), and never by a reference to
itself (422 ``backend_ref_cycle``): :meth:`gateway.plugins.backends.Mounts.authorize_refs`.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Request, Response

from backends.base import Health
from gateway import paths
from gateway.errors import CredgateError
from gateway.identity.principal import Principal
from gateway.plugins.backends import MountInfo, all_backend_type_info
from gateway.plugins.registry import backend_class
from gateway.web.deps import RuntimeDep, requires
from gateway.web.schemas import (
    BackendHealth,
    BackendList,
    BackendOut,
    BackendPut,
    BackendTypeList,
    HealthOut,
    HealthReport,
)

router = APIRouter(tags=["backends"])


def _checks(request: Request) -> dict[str, tuple[Health, datetime]]:
    """The last check of each backend answered by this replica (kept on the app)."""
    checks = getattr(request.app.state, "backend_checks", None)
    if checks is None:
        checks = request.app.state.backend_checks = {}
    return checks


def _report(h: Health, at: datetime | None = None) -> HealthReport:
    return HealthReport(ok=h.ok, message=h.message, problem=h.problem, details=dict(h.details), checked_at=at)


def _capabilities(type_name: str) -> dict[str, Any] | None:
    try:
        return dataclasses.asdict(backend_class(type_name).capabilities)
    except CredgateError:  # the type's package is not installed
        return None


def _out(info: MountInfo, runtime: Any, request: Request) -> BackendOut:
    live = runtime.mounts.live().get(info.name)
    checked = _checks(request).get(info.name)
    health = BackendHealth(
        status=_report(live.status()) if live is not None else None,
        last_check=_report(*checked) if checked is not None else None,
    )
    return BackendOut(**info.__dict__, capabilities=_capabilities(info.type), health=health)


@router.get("/v1/backend-types", summary="Backend types: availability, configuration schema, capabilities")
async def backend_types(principal: Annotated[Principal, requires("backends:read")]) -> BackendTypeList:
    """Every type of the registry (gateway/plugins/registry.py), as ``GET /v1/connector-types``
    describes connector types: ``available`` false, with a ``reason``, when its optional
    package is not installed; else its configuration's JSON schema and its capabilities."""
    return BackendTypeList.model_validate({"items": all_backend_type_info()})


@router.get("/v1/backends", summary="List backends, with their health as last known (no store is probed)")
async def list_backends(
    request: Request, runtime: RuntimeDep, principal: Annotated[Principal, requires("backends:read")]
) -> BackendList:
    return BackendList(items=[_out(i, runtime, request) for i in await runtime.mounts.list()])


@router.get("/v1/backends/{name}", summary="Show a backend, with its health as last known (no store is probed)")
async def get_backend(
    name: str, request: Request, runtime: RuntimeDep, principal: Annotated[Principal, requires("backends:read")]
) -> BackendOut:
    return _out(await runtime.mounts.info(name), runtime, request)


@router.put(
    "/v1/backends/{name}",
    responses={201: {"model": BackendOut, "description": "Created"}}, summary="Create or replace a backend")
async def put_backend(
    name: str,
    body: BackendPut,
    request: Request,
    runtime: RuntimeDep,
    principal: Annotated[Principal, requires("backends:manage")],
    response: Response,
) -> BackendOut:
    paths.backend_name(name)
    # A backend's configuration decides where the connectors drawing on it read their material:
    # replacing it needs connectors:manage on each of them, like rewriting the secret itself.
    await runtime.catalog.authorize_material(principal, name, None)
    runtime.mounts.authorize_refs(principal, name, body.type, body.config)
    info, created = await runtime.mounts.put(name, body.type, body.config)
    _checks(request).pop(name, None)  # a check of the old configuration says nothing of the new
    response.status_code = 201 if created else 200
    return _out(info, runtime, request)


@router.delete("/v1/backends/{name}", status_code=204, summary="Remove a backend (refused while it holds secrets)")
async def delete_backend(
    name: str, request: Request, runtime: RuntimeDep, principal: Annotated[Principal, requires("backends:manage")]
) -> Response:
    await runtime.mounts.delete(name)
    _checks(request).pop(name, None)
    return Response(status_code=204)


@router.post("/v1/backends/{name}/check", summary="Check a backend now: reachable, credentials accepted, list/read/write allowed")
async def check_backend(
    name: str, request: Request, runtime: RuntimeDep, principal: Annotated[Principal, requires("backends:read")]
) -> HealthOut:
    h = await runtime.mounts.check(name)
    at = datetime.now(UTC)
    _checks(request)[name] = (h, at)
    return HealthOut(backend=name, ok=h.ok, message=h.message, details=dict(h.details), problem=h.problem, checked_at=at)
