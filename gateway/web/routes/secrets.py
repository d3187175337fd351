from __future__ import annotations

import asyncio
import base64
import binascii
from typing import Annotated

from fastapi import APIRouter, Query, Response

from backends.base import SecretMetadata
from gateway.audit import trail as audit
from gateway import paths
from gateway.identity.principal import Principal
from gateway.plugins.backends import require
from gateway.web.deps import RuntimeDep, requires
from gateway.errors import BadRequest, NotFound
from gateway.web.schemas import SecretList, SecretOut, SecretPut, VersionOut

router = APIRouter(prefix="/v1/secrets", tags=["secrets"])


def _out(meta: SecretMetadata, version: int | None = None, data: dict[str, str] | None = None) -> SecretOut:
    want = version if version is not None else meta.current_version
    described = next((v for v in meta.versions if v.version == want), None)
    if described is None:
        raise NotFound(f"Secret {meta.backend}/{meta.path} has no version {want}.", code="version_not_found")
    return SecretOut(
        backend=meta.backend,
        path=meta.path,
        version=want,
        current_version=meta.current_version,
        keys=list(described.keys),
        created_at=meta.created_at,
        updated_at=meta.updated_at,
        deleted_at=meta.deleted_at,
        versions=[VersionOut(version=v.version, keys=v.keys, created_at=v.created_at, created_by=v.created_by) for v in meta.versions],
        data=data,
    )


def _encode_token(after: str) -> str:
    return base64.urlsafe_b64encode(after.encode()).decode().rstrip("=")


def _decode_token(token: str) -> str:
    try:
        after = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        return paths.secret_path(after)
    except (binascii.Error, UnicodeDecodeError, ValueError, BadRequest):
        raise BadRequest("The page_token is not one this gateway issued.", code="invalid_page_token") from None


@router.get("/{backend}", summary="List secret paths in a backend")
async def list_secrets(
    backend: str,
    runtime: RuntimeDep,
    principal: Annotated[Principal, requires("secrets:read")],
    prefix: Annotated[str, Query(max_length=512)] = "",
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    page_token: Annotated[str | None, Query(max_length=2048)] = None,
    include_deleted: bool = False,
) -> SecretList:
    paths.secret_prefix(prefix)
    principal.require("secrets:read", resource=f"{backend}/{prefix}*")
    after = _decode_token(page_token) if page_token else None
    store = await runtime.mounts.get(backend)
    page = await store.list(prefix, after=after, limit=limit, include_deleted=include_deleted)
    token = _encode_token(page.next_after) if page.next_after else None
    return SecretList(backend=backend, prefix=prefix, items=page.items, next_page_token=token)


@router.put("/{backend}/{path:path}", summary="Write a new version of a secret")
async def put_secret(
    backend: str, path: str, body: SecretPut, runtime: RuntimeDep, principal: Annotated[Principal, requires("secrets:write")]
) -> SecretOut:
    paths.secret_path(path)
    principal.require("secrets:write", resource=f"{backend}/{path}")
    await runtime.catalog.authorize_material(principal, backend, path)  # connector material: connectors:manage too
    await runtime.mounts.authorize_credential_change(principal, backend, path)  # a backend's credentials: backends:manage
    store = await runtime.mounts.get(backend)
    require(store, "write", *(["check_and_set"] if body.cas is not None else []))  # its declared capabilities
    meta = await store.put(path, body.data, author=principal.subject, cas=body.cas)
    return _out(meta)


@router.get("/{backend}/{path:path}", summary="Read a secret's metadata; its values only with ?reveal=true")
async def get_secret(
    backend: str,
    path: str,
    runtime: RuntimeDep,
    principal: Annotated[Principal, requires("secrets:read")],
    reveal: bool = False,
    version: Annotated[int | None, Query(ge=1)] = None,
) -> SecretOut:
    paths.secret_path(path)
    # Only a value is fail-closed: metadata (names, versions, times) is served, and its event
    # is recorded as far as the sinks allow, as when the store is away and it is cached.
    audit.note(fail_closed=reveal, details={"reveal": reveal, "version": version})
    principal.require("secrets:read", resource=f"{backend}/{path}")
    if reveal:
        principal.require("secrets:reveal", resource=f"{backend}/{path}")
    store = await runtime.mounts.get(backend)
    if version is not None:
        require(store, "versions")
    if not reveal:
        return _out(await store.metadata(path), version)
    if store.capabilities.cacheable:  # held in this process: no round trip to overlap, no tasks to pay for
        value = await store.get(path, version)
        meta = await store.metadata(path)
    else:  # metadata and value at once: one backend round trip of latency, not two
        meta, value = await asyncio.gather(store.metadata(path), store.get(path, version))
    if value.version != (version or meta.current_version):  # a write landed between the two reads
        meta = await store.metadata(path)
    out = _out(meta, value.version)
    out.data = value.data
    return out


@router.delete("/{backend}/{path:path}", status_code=204, summary="Soft-delete a secret, or destroy it")
async def delete_secret(
    backend: str, path: str, runtime: RuntimeDep, principal: Annotated[Principal, requires("secrets:write")], destroy: bool = False
) -> Response:
    paths.secret_path(path)
    principal.require("secrets:write", resource=f"{backend}/{path}")
    await runtime.catalog.authorize_material(principal, backend, path)
    await runtime.mounts.authorize_credential_change(principal, backend, path)
    store = await runtime.mounts.get(backend)
    require(store, "write", *([] if destroy else ["soft_delete"]))
    await store.delete(path, author=principal.subject, destroy=destroy)
    return Response(status_code=204)


@router.post("/{backend}/{path:path}:restore", summary="Undo a soft delete")
async def restore_secret(backend: str, path: str, runtime: RuntimeDep, principal: Annotated[Principal, requires("secrets:write")]) -> SecretOut:
    paths.secret_path(path)
    principal.require("secrets:write", resource=f"{backend}/{path}")
    await runtime.catalog.authorize_material(principal, backend, path)
    await runtime.mounts.authorize_credential_change(principal, backend, path)
    store = await runtime.mounts.get(backend)
    require(store, "write", "soft_delete")
    return _out(await store.restore(path))
