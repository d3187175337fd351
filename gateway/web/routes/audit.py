from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field

from gateway.audit.search import Filter
from gateway.identity.principal import Principal
from gateway.web.deps import RuntimeDep, requires

router = APIRouter(prefix="/v1/audit", tags=["audit"])


class AuditEvent(BaseModel):
    seq: int
    time: datetime
    request_id: str | None
    issuer: str | None
    subject: str | None
    action: str | None
    target: str | None
    decision: str | None
    rule: str | None
    outcome: str | None
    lease_id: str | None
    client_addr: str | None
    details: dict[str, Any] | None
    prev_hash: str
    hash: str


class AuditPage(BaseModel):
    items: list[AuditEvent]
    next_after: int | None


class Problem(BaseModel):
    seq: int
    problem: str


class Compared(BaseModel):
    checkpoints: int = 0
    events: int = 0


class VerifyOut(BaseModel):
    ok: bool
    events: int
    first_bad_seq: int | None
    problem: str | None
    checkpoints: int
    covered_to: int = Field(0, description="The last event an authentic checkpoint covers.")
    chain_from: int = Field(1, description="The first event of the keyed (HMAC) chain; earlier ones are plain SHA-256.")
    compared: Compared = Field(default_factory=Compared, description="Sink lines compared with the store.")
    problems: list[Problem] = Field(default_factory=list, description="Every break found, the first one first.")
    incremental: bool = Field(False, description="The walk started after a checkpoint an earlier verification marked clean.")
    from_seq: int = Field(1, description="The first event whose link this verification walked.")
    walked: int = Field(0, description="How many events this verification walked.")


_Text = Annotated[str | None, Field(max_length=4000)]


class AgainstCheckpoint(BaseModel):
    """A checkpoint line of a sink file."""

    type: Literal["audit-checkpoint"]
    seq: int = Field(..., ge=1)
    hash: str = Field(..., max_length=64)
    time: str = Field(..., max_length=64)
    chain_from: int = Field(..., ge=1)
    mac: str = Field(..., max_length=64)


class AgainstEvent(BaseModel):
    """An event line of a sink file (every chained field)."""

    seq: int = Field(..., ge=1)
    time: str = Field(..., max_length=64)
    request_id: _Text = None
    issuer: _Text = None
    subject: _Text = None
    action: _Text = None
    target: _Text = None
    decision: _Text = None
    rule: _Text = None
    outcome: _Text = None
    lease_id: _Text = None
    client_addr: _Text = None
    details: dict[str, Any] | None = None
    prev_hash: str = Field(..., max_length=64)
    hash: str = Field(..., max_length=64)


class VerifyAgainstIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: str = Field("FILE", max_length=200, pattern=r"^[^\x00-\x1f]*$", description="How problems name the file.")
    checkpoints: list[AgainstCheckpoint] = Field(default_factory=list, max_length=1000)
    events: list[AgainstEvent] = Field(default_factory=list, max_length=1000)


class HashIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    value: str = Field(..., min_length=1, max_length=4096)


class HashOut(BaseModel):
    hmac: str


@router.get("", summary="Query audit events (oldest first)")
async def query(
    runtime: RuntimeDep,
    principal: Annotated[Principal, requires("audit:read")],
    since: datetime | None = None,
    until: datetime | None = None,
    subject: Annotated[str | None, Query(max_length=256)] = None,
    action: Annotated[str | None, Query(max_length=64)] = None,
    connector: Annotated[str | None, Query(max_length=64)] = None,
    lease_id: Annotated[str | None, Query(max_length=40)] = None,
    decision: Annotated[str | None, Query(pattern="^(allow|deny)$")] = None,
    run: Annotated[str | None, Query(pattern=r"^[A-Za-z0-9._:-]{1,128}$", description=(
        "The events of one run id: those whose details.run_id names it (credentials issued for the run, "
        "its token minted, the run revoked) and every request made with its run token (subject run:RUN). "
        "Token and revocation events recorded before this release name the run only in their target "
        "and are not matched."
    ))] = None,
    hmac: Annotated[str | None, Query(pattern=r"^hmac-sha256:[0-9a-f]{64}$", description=(
        "The events whose details carry this keyed hash (from POST /v1/audit/hash) as details.wrap_token "
        "(an unwrap) or details.client_secret (a token request with a client secret). Indexed: not a scan."
    ))] = None,
    after: Annotated[int | None, Query(ge=0)] = None,
    before: Annotated[int | None, Query(ge=1, description="Only events before this sequence number (exclusive).")] = None,
    order: Annotated[Literal["asc", "desc"], Query(description=(
        "asc (the default): oldest first, the next page with after=next_after; desc: newest first, the next "
        "page with before=next_after."))] = "asc",
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> AuditPage:
    where = Filter(since=since, until=until, subject=subject, action=action, connector=connector,
                   lease_id=lease_id, decision=decision, run=run, hmac=hmac, after=after, before=before,
                   newest_first=order == "desc")
    page = await runtime.audit.search(where, limit)
    return AuditPage(items=[AuditEvent.model_validate(row, from_attributes=True) for row in page.items],
                     next_after=page.next_after)


@router.get("/verify", summary="Walk the keyed chain and the checkpoints; name every bad, missing or uncovered event")
async def verify(
    runtime: RuntimeDep, principal: Annotated[Principal, requires("audit:read")],
    full: Annotated[bool, Query(description="Walk the whole chain, not only what follows the last verified checkpoint.")] = False,
) -> VerifyOut:
    return VerifyOut(**await runtime.audit.verify(full=full))


@router.post("/verify", summary="Verify as GET does, and compare the store with the checkpoint and event lines of a sink file")
async def verify_against(
    body: VerifyAgainstIn, runtime: RuntimeDep, principal: Annotated[Principal, requires("audit:read")]
) -> VerifyOut:
    lines = [{**c.model_dump()} for c in body.checkpoints] + [e.model_dump() for e in body.events]
    return VerifyOut(**await runtime.audit.verify(lines, against_name=body.source, full=True))


@router.post("/hash", summary="The keyed hash under which a sensitive value (a wrap token, a client secret) is logged")
async def keyed(body: HashIn, runtime: RuntimeDep, principal: Annotated[Principal, requires("audit:read")]) -> HashOut:
    return HashOut(hmac=runtime.audit.hmac(body.value))
