"""Runs: delegation of a subset of a service's rights to one pipeline run.

``mint`` checks every (connector, resource pattern) pair of the requested
scope against the delegator's own policy (a pattern is allowed only if a rule
covers all of it), records the run, and signs a run token. ``revoke`` marks
the run revoked (its token stops working at once: every request with a run
token checks the run) and revokes every lease issued under it.

A run token lives at most ``max_ttl`` (``CREDGATE_RUN_TOKEN_MAX_TTL_SECONDS``)
and carries its delegator's sources (gateway/identity/revocation.py): revoking the
client, admin key or token that delegated it, or changing the issuer mapping
its delegator came through, ends it too.
"""

from __future__ import annotations

import base64
import binascii
import re
from datetime import UTC, datetime, timedelta

from sqlalchemy import literal, select, tuple_

from gateway.identity.principal import Principal, RunScope
from gateway.store.cache import Cache
from gateway.errors import BadRequest, Forbidden, Unauthenticated, ValidationFailed
from gateway.store import Store
from gateway.store.models import RunRow, utcnow
from gateway.store.rows import revoke_row
from gateway.identity.tokens import Tokens

MAX_RUN_TOKEN_TTL = timedelta(hours=24)
RUN_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

RunsAfter = tuple[datetime, str]  # where a page of runs resumes: the last run's (created_at, run_id)


def encode_page_token(after: RunsAfter) -> str:
    """The opaque page token of ``GET /v1/runs``: the last run's creation time and id."""
    created_at, run_id = after
    raw = f"{created_at.astimezone(UTC).isoformat()}|{run_id}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_page_token(token: str) -> RunsAfter:
    """The (created_at, run_id) a page token names; 400 ``invalid_page_token`` for anything
    this gateway did not issue."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        when, run_id = raw.split("|", 1)
        created_at = datetime.fromisoformat(when)
        if created_at.tzinfo is None or not RUN_ID.match(run_id):
            raise ValueError(raw)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise BadRequest("The page_token is not one this gateway issued.", code="invalid_page_token") from None
    return created_at, run_id


class Runs:
    def __init__(self, store: Store, tokens: Tokens, *, max_ttl: timedelta = MAX_RUN_TOKEN_TTL) -> None:
        self._store = store
        self._tokens = tokens
        self.max_ttl = min(max_ttl, MAX_RUN_TOKEN_TTL)
        # Runs known to be live (never a negative answer): dropped on every replica when revoked.
        self.live: Cache[str, bool] = Cache("runs", store.changes, ttl=300.0, max_entries=100_000)
        store.changes.subscribe("run", self.live.invalidate)

    async def mint(
        self, delegator: Principal, run_id: str, connectors: list[str], resources: list[str], ttl: timedelta
    ) -> tuple[str, RunScope, timedelta]:
        if delegator.scope is not None:
            raise Forbidden("A run token can't delegate further.", code="permission_denied")
        delegator.require("runs:delegate")
        ttls = []
        for connector in connectors:
            for resource in resources:
                d = delegator.decide("credentials:issue", connector, resource)
                if not d.allowed:
                    d = delegator.decide("credentials:wrap", connector, resource)
                if not d.allowed:
                    raise Forbidden(
                        f"{delegator.subject} can't delegate {connector!r}/{resource!r}: {d.reason}.",
                        code="delegation_exceeds_caller",
                    )
                if d.max_ttl is not None:
                    ttls.append(d.max_ttl)
        ttl = min(ttl, self.max_ttl)
        scope = RunScope(run_id, tuple(connectors), tuple(resources), min(ttls) if ttls else None, delegator.as_subject)
        async with self._store.write() as s:
            row = await s.get(RunRow, run_id, with_for_update=True)
            if row is None:
                s.add(RunRow(run_id=run_id, created_by=delegator.owner, created_at=utcnow()))
            elif row.revoked_at is not None:
                raise ValidationFailed(f"Run {run_id} was revoked; use a new run id.", code="run_revoked")
            elif row.created_by != delegator.owner:
                raise Forbidden(f"Run {run_id} belongs to another principal.", code="run_not_yours")
        token = await self._tokens.mint_run(run_id=run_id, scope=scope, ttl=ttl, source=delegator.source)
        return token, scope, ttl

    async def check_live(self, run_id: str) -> None:
        await self.live.get(run_id, lambda: self._check_live(run_id))

    async def _check_live(self, run_id: str) -> bool:
        async with self._store.read() as s:
            revoked = (await s.execute(select(RunRow.revoked_at).where(RunRow.run_id == run_id))).first()
        if revoked is None or revoked[0] is not None:
            raise Unauthenticated(f"Run {run_id} has been revoked.", code="run_revoked")
        return True

    async def get(self, run_id: str) -> RunRow | None:
        async with self._store.read() as s:
            return await s.get(RunRow, run_id)

    async def page(
        self, *, created_by: str | None = None, state: str | None = None, after: RunsAfter | None = None,
        limit: int = 100,
    ) -> tuple[list[RunRow], RunsAfter | None]:
        """One page of runs, newest first (``ORDER BY created_at DESC, run_id DESC``; keyset:
        runs before ``after``), and where the next page resumes, or None on the last page.
        ``created_by``: only one delegator's runs (``Principal.owner``); ``state``: ``live``
        (not revoked) or ``revoked``. Served by the (created_at, run_id) index, or the
        (created_by, created_at, run_id) one (migration 0016); ``state`` filters along it."""
        q = select(RunRow)
        if created_by is not None:
            q = q.where(RunRow.created_by == created_by)
        if state == "live":
            q = q.where(RunRow.revoked_at.is_(None))
        elif state == "revoked":
            q = q.where(RunRow.revoked_at.is_not(None))
        if after is not None:
            q = q.where(tuple_(RunRow.created_at, RunRow.run_id) < tuple_(
                literal(after[0], RunRow.created_at.type), literal(after[1], RunRow.run_id.type)))
        q = q.order_by(RunRow.created_at.desc(), RunRow.run_id.desc()).limit(limit + 1)
        async with self._store.read() as s:
            rows = list((await s.execute(q)).scalars())
        more = len(rows) > limit
        rows = rows[:limit]
        return rows, ((rows[-1].created_at, rows[-1].run_id) if more else None)

    async def mark_revoked(self, run_id: str) -> bool:
        """Revoke run ``run_id`` (once; every replica hears it); False if there is no such run."""
        return await revoke_row(self._store, RunRow, run_id, topic="run") is not None
