"""FastAPI dependencies: the runtime and the authenticated principal."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from gateway.auth import Principal, bearer_token
from gateway.runtime import Runtime

_bearer = HTTPBearer(auto_error=False, description="An admin API key: `Authorization: Bearer cgt_...`")


def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


async def get_principal(
    request: Request,
    runtime: RuntimeDep,
    _creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    return await runtime.admin_keys.authenticate(bearer_token(request.headers.get("authorization")))


PrincipalDep = Annotated[Principal, Depends(get_principal)]
