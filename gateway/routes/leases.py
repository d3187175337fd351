from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Response
from pydantic import AwareDatetime

from gateway import audit
from gateway.auth import Principal
from gateway.credentials import lease_view
from gateway.deps import RuntimeDep, requires
from gateway.errors import BadRequest, Forbidden
from gateway.leases import EXPIRED, REVOKED
from gateway.schemas import (
    BulkRevokeIn,
    BulkRevokeOut,
    LeaseList,
    LeaseOut,
    LeaseSummary,
    RenewIn,
)

router = APIRouter(prefix="/v1/leases", tags=["leases"])

State = Literal["pending", "active", "revoking", "revoked", "expired"]


def _out(row) -> LeaseOut:
    return LeaseOut(**lease_view(row))


@router.get("", summary="List leases")
async def list_leases(
    runtime: RuntimeDep,
    principal: Annotated[Principal, requires("leases:read")],
    connector: Annotated[str | None, Query(max_length=64)] = None,
    principal_filter: Annotated[str | None, Query(alias="principal", max_length=200)] = None,
    state: State | None = None,
    expiring_before: AwareDatetime | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    page_token: Annotated[str | None, Query(max_length=64)] = None,
) -> LeaseList:
    if page_token is not None and not page_token.startswith("lease_"):
        raise BadRequest("The page_token is not one this gateway issued.", code="invalid_page_token")
    items, after = await runtime.leases.views(
        connector=connector, principal=principal_filter, state=state, expiring_before=expiring_before,
        after=page_token, limit=limit,
    )
    return LeaseList.model_validate({"items": items, "next_page_token": after})


@router.get("/summary", summary="Lease counts by state, stuck revocations, reaper leadership")
async def summary(runtime: RuntimeDep, principal: Annotated[Principal, requires("leases:read")]) -> LeaseSummary:
    counts = await runtime.leases.counts(stuck_after_attempts=runtime.settings.stuck_after_attempts)
    return LeaseSummary(**counts, reaper_leader=runtime.reaper.is_leader)


@router.post("/revoke", summary="Revoke every live lease of a connector and/or principal")
async def bulk_revoke(body: BulkRevokeIn, runtime: RuntimeDep, principal: Annotated[Principal, requires("leases:revoke")]) -> BulkRevokeOut:
    if not body.connector and not body.principal:
        raise BadRequest("Name a connector, a principal, or both.", code="filter_required")
    ids = await runtime.leases.mark_revoking(connector=body.connector, principal=body.principal)
    still = await runtime.credentials.revoke(ids)
    return BulkRevokeOut(matched=len(ids), revoked=len(ids) - len(still), still_revoking=still)


@router.get("/{lease_id}", summary="Show a lease")
async def get_lease(lease_id: str, runtime: RuntimeDep, principal: Annotated[Principal, requires("leases:read")]) -> LeaseOut:
    return LeaseOut.model_validate(await runtime.leases.view(lease_id))


@router.post("/{lease_id}/renew", summary="Extend a renewable lease, never past its max")
async def renew(
    lease_id: str,
    runtime: RuntimeDep,
    principal: Annotated[Principal, requires("credentials:issue|leases:revoke")],
    body: RenewIn | None = None,
) -> LeaseOut:
    lease = await runtime.leases.view(lease_id)
    if not (principal.can("leases:revoke") or (principal.can("credentials:issue") and lease["principal"] == principal.subject)):
        raise Forbidden(f"{principal.subject} may not renew lease {lease_id}.", code="permission_denied")
    return _out(await runtime.credentials.renew(lease_id, body.ttl_seconds if body else None))


@router.post("/{lease_id}/revoke", summary="Revoke a lease (idempotent)")
async def revoke(lease_id: str, runtime: RuntimeDep, principal: Annotated[Principal, requires("leases:revoke")], response: Response) -> LeaseOut:
    audit.note(lease_id=lease_id)
    await runtime.leases.view(lease_id)
    await runtime.leases.mark_revoking(lease_ids=[lease_id])
    await runtime.credentials.revoke([lease_id])
    lease = await runtime.leases.view(lease_id)
    response.status_code = 200 if lease["state"] in (REVOKED, EXPIRED) else 202
    return LeaseOut.model_validate(lease)
