"""The row operations the services share (gateway/store/rows.py): 404 in one shape,
revoke once under a lock with one change-feed note, delete with a note."""

from __future__ import annotations

import pytest

from gateway.errors import NotFound
from gateway.store import Store
from gateway.store.models import AdminKeyRow, PolicyRow, utcnow
from gateway.store.rows import delete_row, read_or_404, revoke_row


@pytest.fixture
async def store(store_url: str):
    s = Store(store_url)
    s.upgrade()
    try:
        yield s
    finally:
        await s.aclose()


async def test_read_or_404_names_what_is_missing(store: Store) -> None:
    with pytest.raises(NotFound) as err:
        await read_or_404(store, PolicyRow, "nope", "Policy", "policy_not_found")
    assert (err.value.code, err.value.message) == ("policy_not_found", "Policy 'nope' does not exist.")


async def test_revoke_row_revokes_once_and_notes_once(store: Store) -> None:
    heard: list[str | None] = []
    store.changes.subscribe("admin_key", heard.append)
    async with store.write() as s:
        s.add(AdminKeyRow(id="ak_1", name="k", role="admin", token_hash="h" * 64, created_at=utcnow()))

    first = await revoke_row(store, AdminKeyRow, "ak_1", topic="admin_key", what="Admin key", code="admin_key_not_found")
    again = await revoke_row(store, AdminKeyRow, "ak_1", topic="admin_key", what="Admin key", code="admin_key_not_found")
    assert first is not None and again is not None
    assert first.revoked_at is not None and again.revoked_at == first.revoked_at  # the first time is kept
    assert heard == ["ak_1"]  # the second revoke changed nothing, so told no one

    assert await revoke_row(store, AdminKeyRow, "ak_2", topic="admin_key") is None  # missing_ok without what/code
    with pytest.raises(NotFound) as err:
        await revoke_row(store, AdminKeyRow, "ak_2", topic="admin_key", what="Admin key", code="admin_key_not_found")
    assert err.value.code == "admin_key_not_found"


async def test_delete_row_deletes_and_notes(store: Store) -> None:
    heard: list[str | None] = []
    store.changes.subscribe("policy", heard.append)
    async with store.write() as s:
        s.add(PolicyRow(name="p", document={}, created_at=utcnow(), updated_at=utcnow()))
    await delete_row(store, PolicyRow, "p", topic="policy", what="Policy", code="policy_not_found")
    assert heard == ["p"]
    with pytest.raises(NotFound):
        await read_or_404(store, PolicyRow, "p", "Policy", "policy_not_found")
    with pytest.raises(NotFound):
        await delete_row(store, PolicyRow, "p", topic="policy", what="Policy", code="policy_not_found")
