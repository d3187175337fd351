from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header

from gateway.credentials import IssueParams
from gateway.deps import PrincipalDep, RuntimeDep
from gateway.errors import BadRequest
from gateway.schemas import CredentialOut, CredentialRequest, UnwrapIn

router = APIRouter(tags=["credentials"])


@router.post("/v1/credentials", summary="Issue a short-lived credential (or a wrap token for it)")
async def issue(
    body: CredentialRequest,
    runtime: RuntimeDep,
    principal: PrincipalDep,
    idempotency_key: Annotated[str | None, Header(max_length=128)] = None,
) -> CredentialOut:
    principal.require("credentials:wrap" if body.wrap else "credentials:issue")
    if idempotency_key is not None and not idempotency_key.strip():
        raise BadRequest("The Idempotency-Key header is empty.", code="invalid_idempotency_key")
    out = await runtime.credentials.issue(principal, IssueParams(**body.model_dump()), idempotency_key=idempotency_key)
    return CredentialOut(**out)


@router.post("/v1/unwrap", summary="Exchange a wrap token for its credential, exactly once")
async def unwrap(body: UnwrapIn, runtime: RuntimeDep) -> CredentialOut:
    # The wrap token is the capability: no other authentication is asked for.
    return CredentialOut(**await runtime.credentials.unwrap(body.wrap_token))
