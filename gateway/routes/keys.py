from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter
from pydantic import BaseModel

from gateway.auth import Principal
from gateway.deps import RuntimeDep, requires
from gateway.rotation import KeyStatus
from gateway.schemas import KeyStatusOut

router = APIRouter(prefix="/v1/keys", tags=["keys"])


def _out(status: KeyStatus) -> KeyStatusOut:
    return KeyStatusOut.model_validate(asdict(status))


@router.get("/status", summary="KEK versions, what references each, and re-wrap progress")
async def key_status(runtime: RuntimeDep, principal: Annotated[Principal, requires("keys:read")]) -> KeyStatusOut:
    return _out(await runtime.keys.status())


@router.post("/rotate", status_code=202, summary="Add a KEK version and re-wrap every data key in the background")
async def rotate(runtime: RuntimeDep, principal: Annotated[Principal, requires("keys:manage")]) -> KeyStatusOut:
    return _out(await runtime.keys.rotate())


class SigningRotated(BaseModel):
    active_kid: str
    published_kids: list[str]


@router.post("/signing/rotate", summary="A new token-signing key; the old one stays published for the overlap window")
async def rotate_signing(
    runtime: RuntimeDep, principal: Annotated[Principal, requires("keys:manage")]
) -> SigningRotated:
    kid = await runtime.signing.rotate()
    return SigningRotated(active_kid=kid, published_kids=[k["kid"] for k in runtime.signing.jwks()["keys"]])
