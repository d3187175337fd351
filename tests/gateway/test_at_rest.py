"""At rest: a planted value is nowhere in the store in plaintext, on SQLite and PostgreSQL.

The SQLite check reads every byte of the database file and its WAL; the
PostgreSQL check dumps every column of every table as text and bytes.
"""

from __future__ import annotations

import base64
from pathlib import Path

from sqlalchemy import text

from tests.conftest import Gateway

CANARY = "CANARY-at-rest-c4f1e9d2"


def forms(value: str) -> list[bytes]:
    raw = value.encode()
    return [raw, raw.hex().encode(), base64.b64encode(raw), value.encode("utf-16-le")]


async def plant(gw: Gateway) -> None:
    for i in range(3):
        r = await gw.client.put(f"/v1/secrets/local/plant/{i}", json={"data": {"password": f"{CANARY}-{i}", "user": "u"}})
        assert r.status_code == 200
    await gw.client.put("/v1/backends/second", json={"type": "local"})
    r = await gw.client.put("/v1/secrets/second/p", json={"data": {"token": CANARY}})
    assert r.status_code == 200


async def test_planted_values_are_not_in_plaintext(gateway: Gateway, store_url: str) -> None:
    await plant(gateway)
    # The values do round-trip, so the check below is not vacuous.
    got = (await gateway.client.get("/v1/secrets/local/plant/1", params={"reveal": "true"})).json()["data"]
    assert got["password"] == f"{CANARY}-1"
    needle = CANARY[: len(CANARY) - 2]
    if store_url.startswith("sqlite"):
        db = Path(store_url.split("///", 1)[1])
        blobs = [p.read_bytes() for p in db.parent.glob(db.name + "*")]
        assert any(b"secret_versions" in b for b in blobs)  # we are reading the right file
    else:
        blobs = []
        async with gateway.runtime.store.read() as s:
            tables = (await s.execute(text("SELECT tablename FROM pg_tables WHERE schemaname='public'"))).scalars().all()
            assert "secret_versions" in tables
            for table in tables:
                for row in (await s.execute(text(f'SELECT * FROM "{table}"'))).all():
                    for value in row:
                        blobs.append(bytes(value) if isinstance(value, (bytes, memoryview)) else str(value).encode())
    for blob in blobs:
        for form in forms(needle):
            assert form not in blob
