"""The row operations every service repeats, written once: fetch a row by key or answer
404, revoke a row under a lock and tell the other replicas, delete a row under a lock and
tell them.

The 404 names what is missing the same way everywhere: ``NotFound("<What> 'key' does not
exist.", code="<what>_not_found")``; the service passes ``what`` and ``code``.
"""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession

from gateway.errors import NotFound
from gateway.store import changes
from gateway.store.database import Store
from gateway.store.models import utcnow

R = TypeVar("R")


def not_found(what: str, key: Any, code: str) -> NotFound:
    """The one shape of "no such row": ``<What> 'key' does not exist.``"""
    return NotFound(f"{what} {key!r} does not exist.", code=code)


async def get_or_404(session: AsyncSession, model: type[R], key: Any, what: str, code: str, *, lock: bool = False) -> R:
    """The row of ``model`` at primary key ``key`` (``SELECT ... FOR UPDATE`` with ``lock``,
    inside a write transaction), or :class:`~gateway.errors.NotFound` saying ``what`` is missing."""
    row = await session.get(model, key, with_for_update=lock)
    if row is None:
        raise not_found(what, key, code)
    return row


async def read_or_404(store: Store, model: type[R], key: Any, what: str, code: str) -> R:
    """:func:`get_or_404` in a read session of its own."""
    async with store.read() as s:
        return await get_or_404(s, model, key, what, code)


async def revoke_row(
    store: Store, model: type[R], key: Any, *, topic: str, what: str | None = None, code: str | None = None
) -> R | None:
    """Set ``revoked_at`` on the row at ``key`` under a row lock, once: a row already revoked
    keeps its time and notes no change. The change feed hears ``topic``/``key`` in the same
    transaction, so every replica's cache drops it when (and only if) it commits.

    A missing row is :class:`~gateway.errors.NotFound` when ``what`` and ``code`` are given,
    else None."""
    async with store.write() as s:
        row: Any = await s.get(model, key, with_for_update=True)
        if row is None:
            if what is not None and code is not None:
                raise not_found(what, key, code)
            return None
        if row.revoked_at is None:
            row.revoked_at = utcnow()
            await changes.note(s, topic, str(key))
        return row  # type: ignore[no-any-return]


async def delete_row(store: Store, model: type[Any], key: Any, *, topic: str, what: str, code: str) -> None:
    """Delete the row at ``key`` under a row lock (NotFound if there is none) and note
    ``topic``/``key`` on the change feed in the same transaction."""
    async with store.write() as s:
        row = await get_or_404(s, model, key, what, code, lock=True)
        await s.delete(row)
        await changes.note(s, topic, str(key))
