"""Which Slack deliveries were handled already, shared by every replica (see handlers/dedupe.py)."""

from __future__ import annotations

from bot.store import repo
from bot.store.db import Database


class Deliveries:
    def __init__(self, *, db: Database) -> None:
        self._db = db

    async def claim(self, key: str) -> bool:
        """Record ``key``; False if this or another replica recorded it before."""
        return await repo.claim_delivery(self._db, key=key)
