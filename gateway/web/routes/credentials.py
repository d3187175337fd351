from __future__ import annotations

from typing import Annotated

import time

from fastapi import APIRouter, Header

from gateway.audit import trail as audit
from gateway.identity.principal import Principal
from gateway.issuing.plan import IssueParams
from gateway.web.deps import RuntimeDep, requires
from gateway.web.middleware import expect_delivery
from gateway.errors import BadRequest, Gone, NotFound, Unauthenticated
from gateway.runtime import Runtime
from gateway.web.schemas import CredentialOut, CredentialRequest, UnwrapIn

router = APIRouter(tags=["credentials"])


async def issue_for(
    runtime: Runtime, principal: Principal, body: CredentialRequest, idempotency_key: str | None, run_id: str | None
) -> CredentialOut:
    if idempotency_key is not None and not idempotency_key.strip():
        raise BadRequest("The Idempotency-Key header is empty.", code="invalid_idempotency_key")
    action = "credentials:wrap" if body.wrap else "credentials:issue"
    audit.note(action=action, fail_closed=True,
               details={"connector": body.connector, "resource": body.resource, "wrap": body.wrap, "run_id": run_id})
    decision = principal.require(action, body.connector, body.resource)
    audit.note(rule=decision.rule)
    started = time.perf_counter()
    plan = await runtime.credentials.plan(
        principal, IssueParams(**body.model_dump()), idempotency_key=idempotency_key, run_id=run_id,
        policy_max=decision.max_ttl, decided_by=decision.rule,
    )
    out = await runtime.credentials.issue(plan)
    audit.note(lease_id=out.lease_id, details={"replayed": out.replayed})
    if runtime.metrics is not None:
        runtime.metrics.issue_seconds.labels(out.connector_type).observe(time.perf_counter() - started)
    response = CredentialOut(**out.as_dict())
    if out.awaiting_delivery:
        expect_delivery(out.lease_id)  # the lease stays undelivered until this response has left
    return response


@router.post("/v1/credentials", summary="Issue a short-lived credential (or a wrap token for it)")
async def issue(
    body: CredentialRequest,
    runtime: RuntimeDep,
    principal: Annotated[Principal, requires("credentials:issue|credentials:wrap")],
    idempotency_key: Annotated[str | None, Header(max_length=128)] = None,
) -> CredentialOut:
    return await issue_for(runtime, principal, body, idempotency_key, principal.run_id)


@router.post("/v1/runs/{run_id}/credentials", summary="Issue a credential for one run (run token, or its delegator)")
async def issue_for_run(
    run_id: str,
    body: CredentialRequest,
    runtime: RuntimeDep,
    principal: Annotated[Principal, requires("credentials:issue|credentials:wrap")],
    idempotency_key: Annotated[str | None, Header(max_length=128)] = None,
) -> CredentialOut:
    if principal.scope is not None:
        if principal.run_id != run_id:
            raise Unauthenticated(f"This run token is bound to another run, not {run_id}.", code="token_run_mismatch")
    else:
        # The delegating service asks on the run's behalf (e.g. wrapped, for the pipeline to unwrap).
        principal.require("runs:delegate")
        run = await runtime.runs.get(run_id)
        if run is None or run.created_by != principal.owner:
            raise NotFound(f"Run {run_id} is not one of yours.", code="run_not_found")
        if run.revoked_at is not None:
            raise Gone(f"Run {run_id} has been revoked.", code="run_revoked")
    return await issue_for(runtime, principal, body, idempotency_key, run_id)


@router.post("/v1/unwrap", summary="Exchange a wrap token for its credential, exactly once")
async def unwrap(body: UnwrapIn, runtime: RuntimeDep) -> CredentialOut:
    # The wrap token is the capability: no other authentication is asked for.
    audit.note(action="credentials:unwrap", fail_closed=True, details={"wrap_token": runtime.audit.hmac(body.wrap_token)})
    out = await runtime.credentials.unwrap(body.wrap_token)
    audit.note(lease_id=out.get("lease_id"))
    return CredentialOut(**out)
