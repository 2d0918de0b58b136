"""An operation by its id, whatever its kind: a card's buttons carry only the id, and a modal
opened from one needs the operation's reference and channel before any kind's service is known."""

from __future__ import annotations

from bot.store import repo
from bot.store.db import Database
from bot.store.models import Operation


class OperationLookup:
    def __init__(self, *, db: Database) -> None:
        self._db = db

    async def by_id(self, operation_id: int) -> Operation | None:
        return await repo.get_operation(self._db, operation_id=operation_id)
