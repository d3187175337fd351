"""Single use of a token id across replicas: the ``used_jtis`` table remembers each id
until the token it names could no longer be accepted. Used by client assertions
(:mod:`.clients`) and the console's login cookie."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError

from gateway.store import Store
from gateway.store.models import UsedJtiRow, utcnow


async def use_once(store: Store, jti: str, expires_at: datetime) -> bool:
    """Record ``jti`` as used until ``expires_at``; False if it was already used. Ids past
    their expiry are forgotten in the same transaction. The store is shared, so a second
    use on another replica is refused too."""
    now = utcnow()
    try:
        async with store.write() as s:
            await s.execute(delete(UsedJtiRow).where(UsedJtiRow.expires_at < now))
            s.add(UsedJtiRow(jti=jti, expires_at=expires_at))
    except IntegrityError:
        return False
    return True
