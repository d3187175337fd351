from __future__ import annotations

from dataclasses import asdict
from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from gateway.audit import trail as audit
from gateway.identity.principal import Principal
from gateway.web.deps import RuntimeDep, requires
from gateway.crypto.rotation import KeyStatus
from gateway.web.schemas import KeyStatusOut
from gateway.identity.signing import MAX_TOKEN_TTL

router = APIRouter(prefix="/v1/keys", tags=["keys"])


def _out(status: KeyStatus) -> KeyStatusOut:
    return KeyStatusOut.model_validate(asdict(status))


@router.get("/status", summary="KEK versions, what references each, and re-wrap progress")
async def key_status(runtime: RuntimeDep, principal: Annotated[Principal, requires("keys:read")]) -> KeyStatusOut:
    return _out(await runtime.keys.status())


@router.post("/rotate", status_code=202, summary="Add a KEK version and re-wrap every data key in the background")
async def rotate(runtime: RuntimeDep, principal: Annotated[Principal, requires("keys:manage")]) -> KeyStatusOut:
    return _out(await runtime.keys.rotate())


class SigningRotate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grace_seconds: int = Field(
        0, ge=0, le=int(MAX_TOKEN_TTL.total_seconds()),
        description="How long the key active until now keeps verifying the tokens it signed (a planned rotation). "
        "0, the default, refuses them at once (a rotation after a compromise).",
    )


class SigningRotated(BaseModel):
    active_kid: str
    published_kids: list[str]
    grace_seconds: int


@router.post("/signing/rotate", summary="A new token-signing key; tokens signed by the old one are refused at once, "
                                         "or after grace_seconds")
async def rotate_signing(
    runtime: RuntimeDep, principal: Annotated[Principal, requires("keys:manage")], body: SigningRotate | None = None,
) -> SigningRotated:
    grace = (body or SigningRotate()).grace_seconds
    audit.note(details={"grace_seconds": grace})
    kid = await runtime.signing.rotate(timedelta(seconds=grace) if grace else None)
    return SigningRotated(active_kid=kid, published_kids=[k["kid"] for k in runtime.signing.jwks()["keys"]],
                          grace_seconds=grace)
