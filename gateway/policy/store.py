"""Stored policies and the compiled set every request is decided against.

The set is compiled once per change and swapped whole. Every replica hears
of a change through the change feed (:mod:`gateway.store.changes`) and recompiles
on its next request. While the feed is not live (its listener reconnecting),
a cheap fingerprint query (count and newest ``updated_at``), made at most once
per ``REFRESH_SECONDS``, stands in for it; if the store can't answer it, the
compiled set keeps serving for the feed's bounded staleness (``cache_stale_seconds``).
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

from sqlalchemy import func, select

from gateway.store import changes
from gateway.errors import BadRequest, StoreUnavailable, validate_model
from gateway.policy.rules import PolicyDocument, PolicySet
from gateway.store import Store
from gateway.store.models import PolicyRow, utcnow
from gateway.store.rows import delete_row, read_or_404

REFRESH_SECONDS = 0.5
NAME = r"^[a-z][a-z0-9_-]{0,62}$"

Policy = PolicyRow  # what this service returns: a policy document as stored


def parse_document(data: Any) -> PolicyDocument:
    return validate_model(PolicyDocument, data, "policy")


class Policies:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._set = PolicySet()
        self._checked = 0.0
        self._lock = asyncio.Lock()
        self._feed = store.changes
        self._generation = 0  # bumped by every change heard
        self._fresh_at = -1  # the generation the current set was compiled at
        self._known = False  # the set was once found current in the store
        self._feed.subscribe("policy", self._changed)
        self.compiles = 0

    def _changed(self, _key: str | None) -> None:
        self._generation += 1

    async def _fingerprint(self) -> tuple[int, Any]:
        async with self._store.read() as s:
            return tuple((await s.execute(select(func.count(), func.max(PolicyRow.updated_at)))).one())  # type: ignore[return-value]

    def _usable(self) -> bool:
        if self._feed.live:
            return self._fresh_at == self._generation
        return time.monotonic() - self._checked < REFRESH_SECONDS

    async def current(self) -> PolicySet:
        if self._usable():
            return self._set
        async with self._lock:
            if self._usable():
                return self._set
            generation = self._generation
            try:
                fp = await self._fingerprint()
                if fp != self._set.version or self._feed.live:
                    await self._compile(fp)
            except StoreUnavailable:
                if self._known and self._feed.serving:  # the store is away: what is held serves, bounded
                    return self._set
                raise
            self._checked = time.monotonic()
            self._known = True
            self._fresh_at = generation if self._feed.live else -1
        return self._set

    async def _compile(self, fp: Any) -> None:
        async with self._store.read() as s:
            rows = list((await s.execute(select(PolicyRow))).scalars())
        self._set = PolicySet(((r.name, PolicyDocument.model_validate(r.document)) for r in rows), version=fp)
        self.compiles += 1

    async def refresh(self) -> PolicySet:
        self._checked = 0.0
        self._generation += 1
        return await self.current()

    async def put(self, name: str, doc: PolicyDocument) -> tuple[PolicyRow, bool]:
        if not re.match(NAME, name):
            raise BadRequest("A policy name is 1-63 characters of a-z, 0-9, '_' and '-'.", code="invalid_policy_name")
        created = False
        async with self._store.write() as s:
            row = await s.get(PolicyRow, name, with_for_update=True)
            if row is None:
                row = PolicyRow(name=name, created_at=utcnow())
                s.add(row)
                created = True
            row.document = doc.model_dump(mode="json", exclude_none=True)
            row.updated_at = utcnow()
            await changes.note(s, "policy", name)
        await self.refresh()
        return row, created

    async def get(self, name: str) -> PolicyRow:
        return await read_or_404(self._store, PolicyRow, name, "Policy", "policy_not_found")

    async def list(self) -> list[PolicyRow]:
        async with self._store.read() as s:
            return list((await s.execute(select(PolicyRow).order_by(PolicyRow.name))).scalars())

    async def delete(self, name: str) -> None:
        await delete_row(self._store, PolicyRow, name, topic="policy", what="Policy", code="policy_not_found")
        await self.refresh()
