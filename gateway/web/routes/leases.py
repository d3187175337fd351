from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Response
from pydantic import AwareDatetime

from gateway.audit import trail as audit
from gateway.identity.principal import Principal
from gateway.issuing.service import lease_view, run_cap
from gateway.web.deps import RuntimeDep, requires
from gateway.errors import BadRequest, Forbidden
from gateway.issuing.leases import EXPIRED, REVOKED, owner_filter
from gateway.web.schemas import (
    BulkRevokeIn,
    BulkRevokeOut,
    IssuanceBucket,
    LeaseIssuance,
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
    principal_filter: Annotated[str | None, Query(
        alias="principal", max_length=600, description="An owner, ISSUER/SUBJECT; a bare gateway subject (client:x) means credgate/client:x.",
    )] = None,
    state: State | None = None,
    expiring_before: AwareDatetime | None = None,
    run: Annotated[str | None, Query(
        pattern=r"^[A-Za-z0-9._:-]{1,128}$", description="Only the leases issued for this run id.",
    )] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    page_token: Annotated[str | None, Query(max_length=64)] = None,
) -> LeaseList:
    if page_token is not None and not page_token.startswith("lease_"):
        raise BadRequest("The page_token is not one this gateway issued.", code="invalid_page_token")
    items, after = await runtime.leases.views(
        connector=connector, principal=owner_filter(principal_filter) if principal_filter else None, state=state, expiring_before=expiring_before,
        run_id=run, after=page_token, limit=limit,
    )
    # Only what the caller may read: a rule scoped to connector A does not show connector B's
    # leases (a page may come back shorter than ``limit``; the page token still goes on).
    # One policy decision per (connector, resource) of the page, not one per lease.
    may: dict[tuple[str, str], bool] = {}
    for i in items:
        key = (i["connector"], i["resource"])
        if key not in may:
            may[key] = principal.can("leases:read", *key)
    items = [i for i in items if may[(i["connector"], i["resource"])]]
    return LeaseList.model_validate({"items": items, "next_page_token": after})


@router.get("/summary", summary="Lease counts by state, stuck revocations, reaper leadership")
async def summary(runtime: RuntimeDep, principal: Annotated[Principal, requires("leases:read")]) -> LeaseSummary:
    counts = await runtime.leases.counts(stuck_after_attempts=runtime.settings.stuck_after_attempts)
    return LeaseSummary(**counts, reaper_leader=runtime.reaper.is_leader)


@router.get("/issuance", summary="Leases issued per hour over the last hours (every hour, zeros too)")
async def issuance(
    runtime: RuntimeDep, principal: Annotated[Principal, requires("leases:read")],
    hours: Annotated[int, Query(ge=1, le=168, description="How many hours back, the current (partial) hour last.")] = 24,
) -> LeaseIssuance:
    """Counted in the store with one GROUP BY over the issued_at index: each bucket is a UTC
    hour, ``start`` its beginning; every lease issued counts, whatever its state now."""
    buckets = await runtime.leases.issued_per_hour(hours)
    return LeaseIssuance(buckets=[IssuanceBucket(start=start, count=n) for start, n in buckets])


@router.post("/revoke", summary="Revoke every live lease of a connector and/or principal")
async def bulk_revoke(body: BulkRevokeIn, runtime: RuntimeDep, principal: Annotated[Principal, requires("leases:revoke")]) -> BulkRevokeOut:
    if not body.connector and not body.principal:
        raise BadRequest("Name a connector, a principal, or both.", code="filter_required")
    owner = owner_filter(body.principal) if body.principal else None
    # Only the leases whose connector and resource the caller may revoke (a rule scoped to
    # connector A does not revoke connector B's leases); the others are not matched.
    def permit(connector: str, resource: str) -> bool:
        return principal.can("leases:revoke", connector, resource)

    if body.dry_run:  # the console's confirmation: how many, before anything is revoked
        audit.note(details={"dry_run": True})
        matched = await runtime.leases.count_live(connector=body.connector, principal=owner, permit=permit)
        return BulkRevokeOut(matched=matched, revoked=0, still_revoking=[])
    ids = await runtime.leases.mark_revoking(connector=body.connector, principal=owner, permit=permit)
    audit.note(ended_leases=ids)  # one audit event per lease ended
    still = await runtime.credentials.revoke(ids)
    return BulkRevokeOut(matched=len(ids), revoked=len(ids) - len(still), still_revoking=still)


def _owned_or(principal: Principal, lease: dict[str, Any], action: str, verb: str) -> None:
    """A lease's owner may read and revoke it (revoking one's own credential only gives
    authority up); anyone else needs ``action`` on the lease's connector and resource."""
    if lease["principal"] == principal.owner:
        return
    decision = principal.require(action, lease["connector"], lease["resource"])
    if not decision.allowed:
        raise Forbidden(f"{principal.subject} may not {verb} lease {lease['lease_id']}: {decision.reason}.",
                        code="permission_denied")


@router.get("/{lease_id}", summary="Show a lease (its owner, or leases:read on its connector and resource)")
async def get_lease(
    lease_id: str, runtime: RuntimeDep,
    principal: Annotated[Principal, requires("credentials:issue|credentials:wrap|leases:read")],
) -> LeaseOut:
    lease = await runtime.leases.view(lease_id)
    _owned_or(principal, lease, "leases:read", "read")
    return LeaseOut.model_validate(lease)


@router.post("/{lease_id}/renew", summary="Extend a renewable lease within the caps issuance would apply now")
async def renew(
    lease_id: str,
    runtime: RuntimeDep,
    principal: Annotated[Principal, requires("credentials:issue|credentials:wrap|leases:revoke")],
    body: RenewIn | None = None,
) -> LeaseOut:
    """The lease's owner renews as it would issue now: the policy is decided afresh for the
    lease's connector and resource with the action that issued it (``credentials:wrap`` for a
    wrapped lease, else ``credentials:issue``; a run token through its scope and its delegator),
    and its max TTL and the run's cap apply; denied, it is a 403. Otherwise (another's lease,
    or one its policy no longer grants) the caller needs ``leases:revoke`` on that connector
    and resource, and renews within the caps recorded on the lease at issue
    (``max_expires_at - issued_at``): it can't give the owner more than its policy did."""
    audit.note(lease_id=lease_id)
    lease = await runtime.leases.view(lease_id)
    connector, resource = lease["connector"], lease["resource"]
    action = "credentials:wrap" if lease["wrapped"] else "credentials:issue"
    ttl_seconds = body.ttl_seconds if body else None
    own = lease["principal"] == principal.owner
    decision = principal.decide(action, connector, resource) if own else None
    if decision is not None:
        if decision.allowed:
            audit.note(action=action, decision="allow", rule=decision.rule)
            return _out(await runtime.credentials.renew(
                lease_id, ttl_seconds, policy_max=decision.max_ttl, run_max=run_cap(principal)
            ))
    admin = principal.decide("leases:revoke", connector, resource)
    if not admin.allowed:
        reason = decision.reason if decision is not None else "the lease is another principal's"
        audit.note(action=action if own else "leases:revoke", decision="deny")
        raise Forbidden(f"{principal.subject} may not renew lease {lease_id}: {reason}.", code="permission_denied")
    audit.note(action="leases:revoke", decision="allow", rule=admin.rule)
    recorded = lease["max_expires_at"] - lease["issued_at"]
    return _out(await runtime.credentials.renew(lease_id, ttl_seconds, policy_max=recorded))


@router.post("/{lease_id}/revoke", summary="Revoke a lease (idempotent; its owner, or leases:revoke on its connector and resource)")
async def revoke(
    lease_id: str, runtime: RuntimeDep,
    principal: Annotated[Principal, requires("credentials:issue|credentials:wrap|leases:revoke")], response: Response,
) -> LeaseOut:
    audit.note(lease_id=lease_id)
    _owned_or(principal, await runtime.leases.view(lease_id), "leases:revoke", "revoke")
    lease = await runtime.credentials.revoke_one(lease_id)
    response.status_code = 200 if lease["state"] in (REVOKED, EXPIRED) else 202
    return LeaseOut.model_validate(lease)
