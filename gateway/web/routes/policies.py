from __future__ import annotations

import json
from typing import Annotated, Any

import yaml
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from gateway.identity.principal import Principal
from gateway.web.deps import RuntimeDep, requires
from gateway.errors import BadRequest
from gateway.policy.store import Policy, parse_document
from gateway.policy.rules import Action, PolicyDocument, Subject

router = APIRouter(prefix="/v1/policies", tags=["policies"])


class PolicyOut(BaseModel):
    name: str
    document: dict[str, Any]
    created_at: Any
    updated_at: Any


class PolicyList(BaseModel):
    items: list[PolicyOut]


class ExplainPrincipal(BaseModel):
    model_config = ConfigDict(extra="forbid")
    issuer: str = Field("credgate", max_length=256)
    subject: str = Field(..., max_length=256)
    roles: list[str] = Field(default_factory=list, max_length=50)
    claims: dict[str, Any] = Field(default_factory=dict)


class ExplainIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    principal: ExplainPrincipal
    action: Action  # type: ignore[valid-type]
    connector: str | None = Field(None, max_length=64)
    resource: str | None = Field(None, max_length=256)


class ExplainOut(BaseModel):
    decision: str  # allow | deny
    rule: str | None
    reason: str
    max_ttl_seconds: int | None


def _out(row: Policy) -> PolicyOut:
    return PolicyOut(name=row.name, document=row.document, created_at=row.created_at, updated_at=row.updated_at)


_YAML = ("application/yaml", "application/x-yaml", "text/yaml")


@router.put(
    "/{name}",
    responses={201: {"model": PolicyOut, "description": "Created"}},
    summary="Create or replace a policy (JSON or YAML body)",
    openapi_extra={"requestBody": {"content": {
        "application/json": {"schema": PolicyDocument.model_json_schema()},
        "application/yaml": {"schema": {"type": "string"}},
    }, "required": True}},
)
async def put_policy(
    name: str, request: Request, runtime: RuntimeDep,
    principal: Annotated[Principal, requires("policies:manage")], response: Response,
) -> PolicyOut:
    raw = await request.body()
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    try:
        data = yaml.safe_load(raw) if media in _YAML else json.loads(raw)
    except (ValueError, yaml.YAMLError):
        raise BadRequest("The policy body is not valid JSON or YAML.", code="invalid_json") from None
    row, created = await runtime.policies.put(name, parse_document(data))
    response.status_code = 201 if created else 200
    return _out(row)


@router.get("", summary="List policies")
async def list_policies(runtime: RuntimeDep, principal: Annotated[Principal, requires("policies:read")]) -> PolicyList:
    return PolicyList(items=[_out(r) for r in await runtime.policies.list()])


@router.post("/explain", summary="Allow or deny, and the rule (or the absence of one) that decided")
async def explain(
    body: ExplainIn, runtime: RuntimeDep, principal: Annotated[Principal, requires("policies:read")]
) -> ExplainOut:
    who = Subject(body.principal.issuer, body.principal.subject, frozenset(body.principal.roles), body.principal.claims)
    d = (await runtime.policies.current()).decide(who, body.action, body.connector, body.resource)
    return ExplainOut(
        decision="allow" if d.allowed else "deny", rule=d.rule, reason=d.reason,
        max_ttl_seconds=int(d.max_ttl.total_seconds()) if d.max_ttl else None,
    )


@router.get("/{name}", summary="Show a policy")
async def get_policy(name: str, runtime: RuntimeDep, principal: Annotated[Principal, requires("policies:read")]) -> PolicyOut:
    return _out(await runtime.policies.get(name))


@router.delete("/{name}", status_code=204, summary="Remove a policy")
async def delete_policy(
    name: str, runtime: RuntimeDep, principal: Annotated[Principal, requires("policies:manage")]
) -> Response:
    await runtime.policies.delete(name)
    return Response(status_code=204)
