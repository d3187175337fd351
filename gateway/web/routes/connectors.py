from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Response

from gateway.identity.principal import Principal
from gateway.plugins.connectors import ConnectorSpec, all_type_info
from gateway.web.deps import RuntimeDep, requires
from gateway.errors import Conflict
from gateway.web.schemas import (
    ConnectorList,
    ConnectorOut,
    ConnectorPut,
    ConnectorTypeList,
    ResourceList,
    VerificationOut,
)

router = APIRouter(tags=["connectors"])


def _out(row: Any) -> ConnectorOut:
    """A connector as the catalog returns it (never its material)."""
    return ConnectorOut(
        name=row.name,
        type=row.type,
        auth_method=row.auth_method,
        secret=f"{row.secret_backend}/{row.secret_path}" if row.secret_backend is not None else None,
        holds_secret=row.secret_backend is not None,
        config=row.config,
        resources=row.resources,
        default_ttl_seconds=row.default_ttl_seconds,
        max_ttl_seconds=row.max_ttl_seconds,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


@router.get("/v1/connector-types", summary="Connector types: auth methods, resources, revocability, TTLs")
async def connector_types(principal: Annotated[Principal, requires("connectors:read")]) -> ConnectorTypeList:
    return ConnectorTypeList(items=all_type_info())


@router.get("/v1/connectors", summary="List connectors")
async def list_connectors(runtime: RuntimeDep, principal: Annotated[Principal, requires("connectors:read")]) -> ConnectorList:
    rows = await runtime.catalog.list()
    return ConnectorList(items=[_out(r) for r in rows if principal.can("connectors:read", connector=r.name)])


@router.put(
    "/v1/connectors/{name}",
    responses={201: {"model": ConnectorOut, "description": "Created"}}, summary="Create or replace a connector")
async def put_connector(
    name: str, body: ConnectorPut, runtime: RuntimeDep, principal: Annotated[Principal, requires("connectors:manage")], response: Response
) -> ConnectorOut:
    """Needs ``connectors:manage`` on the connector and ``secrets:bind`` on its secret (every time:
    a replace re-declares how the material is used), and a secret that holds what the type needs."""
    principal.require("connectors:manage", connector=name)
    row, created = await runtime.catalog.put(name, ConnectorSpec(**body.model_dump()), principal=principal)
    response.status_code = 201 if created else 200
    return _out(row)


@router.get("/v1/connectors/{name}", summary="Show a connector (never its material)")
async def get_connector(name: str, runtime: RuntimeDep, principal: Annotated[Principal, requires("connectors:read")]) -> ConnectorOut:
    principal.require("connectors:read", connector=name)
    return _out(await runtime.catalog.get(name))


@router.delete("/v1/connectors/{name}", status_code=204, summary="Remove a connector")
async def delete_connector(
    name: str, runtime: RuntimeDep, principal: Annotated[Principal, requires("connectors:manage")], revoke_leases: bool = False
) -> Response:
    principal.require("connectors:manage", connector=name)
    await runtime.catalog.get(name)
    if revoke_leases:
        ids = await runtime.leases.mark_revoking(connector=name)
        await runtime.credentials.revoke(ids)
    live = await runtime.leases.live_count(name)
    if live:
        raise Conflict(
            f"Connector {name!r} has {live} live lease(s); revoke them first or pass ?revoke_leases=true"
            + (" (some revocations are still being retried)" if revoke_leases else "")
            + ".",
            code="connector_has_leases",
        )
    await runtime.catalog.delete(name)
    return Response(status_code=204)


@router.post("/v1/connectors/{name}/verify", summary="Check the stored material against the target")
async def verify_connector(name: str, runtime: RuntimeDep, principal: Annotated[Principal, requires("connectors:manage")]) -> VerificationOut:
    principal.require("connectors:manage", connector=name)
    connector = await runtime.catalog.instance(await runtime.catalog.get(name))
    v = await connector.verify()
    return VerificationOut(connector=name, ok=v.ok, message=v.message, identity=v.identity, reachable=v.reachable)


@router.get("/v1/connectors/{name}/resources", summary="Resources of one type the connector can see")
async def list_resources(
    name: str,
    runtime: RuntimeDep,
    principal: Annotated[Principal, requires("connectors:read")],
    type: Annotated[str, Query(min_length=1, max_length=64)],
) -> ResourceList:
    principal.require("connectors:read", connector=name)
    connector = await runtime.catalog.instance(await runtime.catalog.get(name))
    return ResourceList(connector=name, resource_type=type, items=await connector.list_resources(type))
