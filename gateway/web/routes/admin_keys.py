from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter

from gateway.identity.principal import Principal
from gateway.web.deps import RuntimeDep, requires
from gateway.web.schemas import AdminKeyCreate, AdminKeyCreated, AdminKeyList, AdminKeyOut

router = APIRouter(prefix="/v1/admin-keys", tags=["admin keys"])


@router.post("", status_code=201, summary="Create an admin API key; its token is shown once")
async def create_key(body: AdminKeyCreate, runtime: RuntimeDep, principal: Annotated[Principal, requires("admin_keys:manage")]) -> AdminKeyCreated:
    info, token = await runtime.admin_keys.create(body.name, body.role, created_by=principal.subject)
    return AdminKeyCreated(**info.model_dump(), token=token)


@router.get("", summary="List admin API keys (never their tokens)")
async def list_keys(runtime: RuntimeDep, principal: Annotated[Principal, requires("admin_keys:manage")]) -> AdminKeyList:
    return AdminKeyList(items=await runtime.admin_keys.list())


@router.post("/{key_id}/revoke", summary="Revoke an admin API key")
async def revoke_key(key_id: str, runtime: RuntimeDep, principal: Annotated[Principal, requires("admin_keys:manage")]) -> AdminKeyOut:
    return await runtime.admin_keys.revoke(key_id)
