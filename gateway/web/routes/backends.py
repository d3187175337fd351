from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Response

from gateway.identity.principal import Principal
from gateway.web.deps import RuntimeDep, requires
from gateway.plugins.backends import MountInfo
from gateway.web.schemas import BackendList, BackendOut, BackendPut, HealthOut

router = APIRouter(prefix="/v1/backends", tags=["backends"])


def _out(info: MountInfo) -> BackendOut:
    return BackendOut(**info.__dict__)


@router.get("", summary="List backends")
async def list_backends(runtime: RuntimeDep, principal: Annotated[Principal, requires("backends:read")]) -> BackendList:
    return BackendList(items=[_out(i) for i in await runtime.mounts.list()])


@router.get("/{name}", summary="Show a backend")
async def get_backend(name: str, runtime: RuntimeDep, principal: Annotated[Principal, requires("backends:read")]) -> BackendOut:
    return _out(await runtime.mounts.info(name))


@router.put(
    "/{name}",
    responses={201: {"model": BackendOut, "description": "Created"}}, summary="Create or replace a backend")
async def put_backend(
    name: str, body: BackendPut, runtime: RuntimeDep, principal: Annotated[Principal, requires("backends:manage")], response: Response
) -> BackendOut:
    # A backend's configuration decides where the connectors drawing on it read their material:
    # replacing it needs connectors:manage on each of them, like rewriting the secret itself.
    await runtime.catalog.authorize_material(principal, name, None)
    info, created = await runtime.mounts.put(name, body.type, body.config)
    response.status_code = 201 if created else 200
    return _out(info)


@router.delete("/{name}", status_code=204, summary="Remove a backend (refused while it holds secrets)")
async def delete_backend(name: str, runtime: RuntimeDep, principal: Annotated[Principal, requires("backends:manage")]) -> Response:
    await runtime.mounts.delete(name)
    return Response(status_code=204)


@router.post("/{name}/check", summary="Check that a backend is reachable")
async def check_backend(name: str, runtime: RuntimeDep, principal: Annotated[Principal, requires("backends:read")]) -> HealthOut:
    h = await runtime.mounts.check(name)
    return HealthOut(backend=name, ok=h.ok, message=h.message, details=h.details)
